"""The argument checks of every op, in one place: both the compiled kernels and the pure-PyTorch
fallback run behind them, so both fail the same way and before any kernel runs. Each message names
the argument and the bad value. (The C++ kernels only guard memory safety, tersely.)"""
from __future__ import annotations

import math

import torch

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

_CPU_FLOATS = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_FLOATS = _CPU_FLOATS + (torch.float16,)


def float_dtypes(device: torch.device) -> tuple:
    """The floating dtypes the kernels take on a device: float16 only on CUDA."""
    return _CUDA_FLOATS if device.type == "cuda" else _CPU_FLOATS


def reduction_code(reduction) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(name, t):
    allowed = float_dtypes(t.device)
    if t.dtype not in allowed:
        kinds = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be a floating tensor ({kinds} on {t.device.type}), got dtype {t.dtype}")


def check_same_dtype(name_a, a, name_b, b):
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} has dtype {b.dtype} but {name_a} has dtype {a.dtype}; they must match")


def check_same_device(**tensors):
    devices = {t.device for t in tensors.values() if t is not None}
    if len(devices) <= 1:
        return
    items = [(n, t) for n, t in tensors.items() if t is not None]
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; all inputs must share one device")


def alpha_tensor(alpha, device) -> torch.Tensor:
    """alpha as a 0-dim float64 tensor (CPU, or the inputs' device), validated where that costs no sync."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or alpha.dim() > 1:
            raise ValueError(f"alpha must be a float or a 0-dim tensor, got a tensor of shape {tuple(alpha.shape)}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating tensor, got dtype {alpha.dtype}")
        if alpha.requires_grad:
            raise ValueError("alpha must not require grad: fastadapt does not differentiate with respect to alpha")
        if alpha.device.type != "cpu" and alpha.device != device:
            raise ValueError(f"alpha is on {alpha.device} but the inputs are on {device}")
        if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
            check_alpha_value(float(alpha))
        return alpha.reshape(())
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or a 0-dim tensor, got {type(alpha).__name__}")
    check_alpha_value(float(alpha))
    if torch.compiler.is_compiling():
        return torch.tensor(float(alpha), dtype=torch.float64)
    # one tensor per value, made once: building it costs more than a small loss kernel (the ops never
    # write to it, and the autograd node saves its own copy)
    a = _ALPHA_TENSORS.get(float(alpha))
    if a is None:
        if len(_ALPHA_TENSORS) >= 4096:  # a schedule of floats: keep the cache bounded
            _ALPHA_TENSORS.clear()
        a = _ALPHA_TENSORS[float(alpha)] = torch.tensor(float(alpha), dtype=torch.float64)
    return a


_ALPHA_TENSORS: dict[float, torch.Tensor] = {}


def check_alpha_value(a: float):
    """A device-resident alpha cannot be checked without a host sync: the kernels then give NaN instead."""
    if math.isnan(a) or a < 0.0 or a > 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {a}")


def check_label_smoothing(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(eps).__name__}")
    if math.isnan(eps) or eps < 0.0 or eps > 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {eps}")


def check_ignore_index(ignore_index):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_class_dim(class_dim):
    if isinstance(class_dim, bool) or class_dim not in (1, -1):
        raise ValueError(f"class_dim must be 1 (F.cross_entropy's layout: (N, C, d1, ...)) or -1 (class-last: "
                         f"(..., C)), got {class_dim!r}")


def ce_side(side, logits, labels, class_dim):
    """One side's (logits, labels) with the class dimension last, after checking them (named
    ``{side}_logits`` and ``{side}_labels``, or ``logits`` and ``labels`` for side ``""``).

    class_dim=1 reads the logits as F.cross_entropy does: (C,), (N, C) or (N, C, d1, ...) with labels
    (), (N,) or (N, d1, ...). class_dim=-1 reads them class-last: (..., C) with labels (...). Labels are
    class indices (any integer dtype) or, as in F.cross_entropy, probability targets: a floating tensor
    of the logits' shape (and here also of their dtype), moved class-last with them.
    """
    # the usual case, settled with a few attribute reads: float logits of an accepted dtype with
    # int64 labels of the expected shape, (N, C) or class-last (..., C)
    if (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor) and logits.dtype in _CPU_FLOATS
            and labels.dtype == torch.int64 and (logits.dim() == 2 or (class_dim == -1 and logits.dim() >= 1))
            and labels.shape == logits.shape[:-1] and logits.shape[-1] > 0):
        return logits, labels
    ln, bn = (f"{side}_logits", f"{side}_labels") if side else ("logits", "labels")
    check_tensor(ln, logits)
    check_tensor(bn, labels)
    check_float_dtype(ln, logits)
    if labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{bn} must hold class indices (an integer dtype) or probability targets (the dtype of "
                        f"{ln}, {logits.dtype}), got dtype {labels.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{ln} must have a class dimension, got a 0-dim tensor")
    if labels.is_floating_point():
        return _probability_side(ln, bn, logits, labels, class_dim)
    if class_dim == 1 and logits.dim() >= 2:
        # (N, C) is already class-last: no view, so autograd hands the kernel's gradient over as it is
        expected = (logits.shape[0], *logits.shape[2:])
        logits_last = logits.movedim(1, -1) if logits.dim() >= 3 else logits
        layout = "class_dim=1 reads logits as F.cross_entropy does, (N, C, d1, ...) with labels (N, d1, ...)"
        hint = ("; for class-last logits (..., C), such as a language model's (batch, seq, vocab), pass "
                "class_dim=-1") if logits.dim() >= 3 else ""
    else:
        expected, logits_last = logits.shape[:-1], logits
        layout = ("class_dim=-1 reads logits class-last, (..., C) with labels (...)" if class_dim == -1
                  else "1-D logits are one row of C classes, with a 0-dim label")
        hint = ""
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(f"{bn} has shape {tuple(labels.shape)} but {ln} has shape {tuple(logits.shape)}; "
                         f"{layout}, so {bn} must have shape {tuple(expected)}{hint}")
    if logits_last.shape[-1] == 0 and labels.numel() > 0:
        raise ValueError(f"{ln} has 0 classes (shape {tuple(logits.shape)}) but {labels.numel()} labels")
    return logits_last, labels


def _probability_side(ln, bn, logits, labels, class_dim):
    """ce_side for probability targets: F.cross_entropy's rule (the logits' shape), plus the logits'
    dtype (F would promote; the kernels read both in one dtype)."""
    if labels.dtype != logits.dtype:
        raise TypeError(f"{bn} holds probability targets of dtype {labels.dtype} but {ln} has dtype {logits.dtype}; "
                        f"they must match (class indices need an integer dtype)")
    if labels.shape != logits.shape:
        raise ValueError(f"{bn} holds probability targets (dtype {labels.dtype}), so it must have the shape of {ln}, "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)} (class indices need an integer dtype)")
    moved = class_dim == 1 and logits.dim() >= 3
    logits_last, labels_last = (logits.movedim(1, -1), labels.movedim(1, -1)) if moved else (logits, labels)
    rows = math.prod(logits_last.shape[:-1])
    if logits_last.shape[-1] == 0 and rows > 0:
        raise ValueError(f"{ln} has 0 classes (shape {tuple(logits.shape)}) but {rows} rows of probability targets")
    return logits_last, labels_last


def check_soft_ignore_index(ignore_index, sides):
    """F.cross_entropy refuses ignore_index >= 0 with probability targets (it cannot apply there)."""
    for name, labels in sides:
        if ignore_index >= 0 and labels.is_floating_point():
            raise ValueError(f"ignore_index={ignore_index} does not apply to probability targets ({name} has dtype "
                             f"{labels.dtype}); F.cross_entropy refuses it too: leave it at a negative value")


def check_class_weight(name, weight, logits_name, logits_last):
    """A side's class weights: as F.cross_entropy's `weight`, a 1-D tensor with one value per class in the
    logits' dtype and on their device. fastadapt does not differentiate them (F does): one that requires
    grad is refused rather than silently given none."""
    if weight is None:
        return
    check_tensor(name, weight)
    if weight.dtype != logits_last.dtype:
        raise TypeError(f"{name} has dtype {weight.dtype} but {logits_name} has dtype {logits_last.dtype}; "
                        f"they must match (F.cross_entropy requires it too)")
    classes = logits_last.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != classes:
        raise ValueError(f"{name} must be 1-D with one weight per class of {logits_name} ({classes}), "
                         f"got shape {tuple(weight.shape)}")
    if weight.device != logits_last.device:
        raise ValueError(f"{name} is on {weight.device} but {logits_name} is on {logits_last.device}; "
                         f"they must share one device")
    if weight.requires_grad:
        raise ValueError(f"{name} requires grad, but fastadapt does not differentiate class weights "
                         f"(F.cross_entropy does); pass {name}.detach()")


def check_mse_side(side, pred, target):
    if (isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor) and pred.dtype in _CPU_FLOATS
            and target.dtype == pred.dtype and pred.shape == target.shape):
        return
    pn, tn = f"{side}_pred", f"{side}_target"
    check_tensor(pn, pred)
    check_tensor(tn, target)
    check_float_dtype(pn, pred)
    if target.dtype != pred.dtype:
        raise TypeError(f"{tn} has dtype {target.dtype} but {pn} has dtype {pred.dtype}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"{tn} has shape {tuple(target.shape)} but {pn} has shape {tuple(pred.shape)}; "
            f"shapes must match exactly (fastadapt does not broadcast)"
        )


def raise_named_label_error(sides, ignore_index):
    """After a kernel found a label out of range (IndexError): raises the error that names the argument.

    sides: (labels name, class-last logits, labels) for each side that was evaluated. Returns without
    raising when no label is out of range (the caller then re-raises the original error)."""
    for name, logits, labels in sides:
        if labels.is_floating_point():  # probability targets index nothing
            continue
        classes = logits.shape[-1]
        flat = labels.reshape(-1)
        bad = (flat != ignore_index) & ((flat < 0) | (flat >= classes))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise IndexError(f"{name} contains the label {int(flat[i])} (at flat position {i}), outside "
                             f"[0, {classes}) and not ignore_index ({ignore_index})") from None


def check_linear_relu_args(x, weight, bias):
    # On every forward of every fused layer: the usual case is settled with a few attribute reads
    # (BENCHMARKS.md, issue 10, has what a call costs); anything else takes the detailed checks below.
    if (isinstance(x, torch.Tensor) and isinstance(weight, torch.Tensor) and x.dtype in _CPU_FLOATS
            and weight.dtype == x.dtype and weight.dim() == 2 and x.dim() >= 1 and x.shape[-1] == weight.shape[1]
            and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == x.dtype and bias.dim() == 1
                                  and bias.shape[0] == weight.shape[0]))):
        device = x.device
        if weight.device == device and (bias is None or bias.device == device):
            return
    check_tensor("x", x)
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    check_float_dtype("x", x)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have shape (..., in_features), got a 0-dim tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x.shape[-1] is {x.shape[-1]} but weight has in_features={weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) = (out_features,), got shape {tuple(bias.shape)}")
    check_same_dtype("x", x, "weight", weight)
    if bias is not None:
        check_same_dtype("x", x, "bias", bias)
    check_same_device(x=x, weight=weight, bias=bias)


def check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite float > 0, got {temperature}")


def check_class_indices(name, labels):
    """The distillation op's cross-entropy reads class indices only (its kernels have no probability-target path)."""
    check_tensor(name, labels)
    if labels.is_floating_point():
        raise TypeError(f"{name} must hold class indices (an integer dtype), got dtype {labels.dtype}: "
                        f"alpha_weighted_distillation takes no probability targets")


def teacher_side(teacher_logits, logits, class_dim):
    """The teacher's logits with the class dimension last, after checking them against the student's
    (already checked) logits: same layout, dtype and device, K classes with 1 <= K <= C, no grad."""
    check_tensor("teacher_logits", teacher_logits)
    if teacher_logits.requires_grad:
        raise ValueError("teacher_logits requires grad, but the teacher is frozen and gets no gradient: compute it "
                         "under torch.no_grad() or pass teacher_logits.detach()")
    check_same_dtype("logits", logits, "teacher_logits", teacher_logits)
    check_same_device(logits=logits, teacher_logits=teacher_logits)
    cd = 1 if class_dim == 1 and logits.dim() >= 2 else logits.dim() - 1
    shape, tshape = tuple(logits.shape), tuple(teacher_logits.shape)
    if len(tshape) != len(shape) or tshape[:cd] + tshape[cd + 1:] != shape[:cd] + shape[cd + 1:]:
        raise ValueError(f"teacher_logits has shape {tshape} but logits has shape {shape}; they must match in "
                         f"every dimension but the class dimension (dim {cd})")
    k, c = tshape[cd], shape[cd]
    if not 1 <= k <= c:
        raise ValueError(f"teacher_logits has {k} classes (shape {tshape}) but logits has {c} (shape {shape}); the "
                         f"teacher covers the first K classes of the student's head, 1 <= K <= {c}")
    return teacher_logits.movedim(1, -1) if cd == 1 and teacher_logits.dim() >= 3 else teacher_logits


def check_linear_ce_args(source_hidden, source_labels, target_hidden, target_labels, weight, bias):
    """alpha_weighted_linear_cross_entropy's tensors: hidden (..., D) per side of a floating dtype, class
    indices of the hidden's shape without D, weight (V, D), bias (V,) or None, one dtype and one device."""
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (vocab, hidden) = (V, D), got shape {tuple(weight.shape)}")
    vocab, d = weight.shape
    for side, hidden, labels in (("source", source_hidden, source_labels), ("target", target_hidden, target_labels)):
        hn, ln = f"{side}_hidden", f"{side}_labels"
        check_tensor(hn, hidden)
        check_tensor(ln, labels)
        check_float_dtype(hn, hidden)
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{ln} must hold class indices (an integer dtype), got dtype {labels.dtype}")
        if hidden.dim() < 1 or hidden.shape[-1] != d:
            raise ValueError(f"{hn} has shape {tuple(hidden.shape)} but weight has shape {tuple(weight.shape)}; "
                             f"{hn} must be (..., {d}), its last dimension the weight's hidden size D")
        if tuple(labels.shape) != tuple(hidden.shape[:-1]):
            raise ValueError(f"{ln} has shape {tuple(labels.shape)} but {hn} has shape {tuple(hidden.shape)}; "
                             f"{ln} must have shape {tuple(hidden.shape[:-1])}, one label per row")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != vocab):
        raise ValueError(f"bias must have shape ({vocab},) = (V,), got shape {tuple(bias.shape)}")
    check_same_dtype("source_hidden", source_hidden, "target_hidden", target_hidden)
    check_same_dtype("source_hidden", source_hidden, "weight", weight)
    if bias is not None:
        check_same_dtype("source_hidden", source_hidden, "bias", bias)
    check_same_device(source_hidden=source_hidden, source_labels=source_labels, target_hidden=target_hidden,
                      target_labels=target_labels, weight=weight, bias=bias)


def check_linear_ce_labels(sides, weight, ignore_index):
    """Every label of the (name, labels) sides in [0, V) or ignore_index, V = weight.shape[0]: checked
    before any GEMM runs (the linear op's kernels never see an out-of-range label). weight.t() is a
    (D, V) view whose last dimension is the class count, as raise_named_label_error reads logits."""
    raise_named_label_error([(name, weight.t(), labels) for name, labels in sides], ignore_index)


def check_z_loss(z_loss):
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a float, got {type(z_loss).__name__}")
    if not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss}")


def check_softcap(softcap):
    if softcap is None:
        return
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be None or a float, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap}")


def check_chunk_size(chunk_size):
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be None or an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 rows, got {chunk_size}")
