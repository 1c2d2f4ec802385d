"""Independent cross-check of fastadapt against test inputs written outside the project.

Sources (inputs and grids only; no code copied):

* PyTorch's own OpInfo samples (``torch.testing._internal.common_methods_invocations.op_db``) for
  ``nn.functional.cross_entropy``, ``nn.functional.mse_loss`` and ``nn.functional.linear``, and its
  ModuleInfo samples (``torch.testing._internal.common_modules.module_db``) for ``nn.Linear``,
  ``nn.CrossEntropyLoss`` and ``nn.MSELoss``. They need the ``expecttest`` package.
* The test grid of Liger-Kernel's ``test/transformers/test_cross_entropy.py``
  (github.com/linkedin/Liger-Kernel, read at ead96b618e5c67bddc6a6e9bcb99bfe6b5ab661c; the logit scales
  0.1/1/10 come from the same file at 53d5934c796d7ecdcbdf9790dd9fec89a2205149): (B, T, V) shapes,
  scales, ignore_index values (inside and outside the class range), label smoothing, reductions,
  bf16/fp32 (fp16 forward-only), a random 1..B*T/2 rows set to ignore_index, and an upstream gradient
  other than 1. The shapes are scaled down for the CPU (the odd T=423 and V=32000 kept); the larger
  ones are behind ``@pytest.mark.slow``.

How a sample maps onto fastadapt:

* loss samples ``(input, target, kwargs)``: the sample is the target side with ``alpha=1.0`` (the source
  side is an unrelated NaN-filled tensor, which must not be read: its gradient must be None or zero and
  its ``reduction="none"`` losses zero), the source side with ``alpha=0.0`` (mirror image), and both
  sides with ``alpha=0.37`` (the result is F's answer). Each mapping is a subtest (``SUBFAILED[target-a1]``
  names it). Values and input gradients (after a backward with an upstream gradient other than 1) are
  compared with a float64 oracle: the same expression evaluated by ``F.*`` on the float64 copy of the
  (rounded) inputs. Tolerances: see ``check_close``.
* ``linear`` samples: ``fastadapt.linear_relu(x, w, b)`` against ``F.relu(F.linear(...))``.
* ModuleInfo: ``FusedLinearReLU`` loaded with the ``nn.Linear``'s state_dict against
  ``nn.Sequential(nn.Linear, nn.ReLU)``; ``AlphaWeightedLoss(alpha=1.0, kind=..., **ctor_kwargs)``
  against ``nn.CrossEntropyLoss(**ctor_kwargs)`` / ``nn.MSELoss(**ctor_kwargs)``.
* Cross-entropy's class ``weight=`` goes to the weight of each side the sample is on (``target_weight``,
  ``source_weight``, or both), in the logits' dtype as ``nn.CrossEntropyLoss`` casts it; probability
  targets are the side's labels (their gradient is checked too where they require grad).
* Inputs F accepts but fastadapt does not support (float16 on the CPU, F's broadcasting in mse_loss,
  mixed dtypes, a weight that is not 2-D, a bias that only broadcasts): fastadapt must raise a
  TypeError/ValueError whose message names the argument, never return a number. Inputs F itself
  rejects: fastadapt must raise too.

* Derived cases on the samples' shapes (a -inf logit with and without label smoothing, empty batches,
  all rows ignored, an out-of-range label, NaN/inf predictions and inputs): NaN and inf must land exactly
  where F puts them.

Every case runs through the compiled kernels and the pure-PyTorch fallback (the ``backend`` fixture), on
the CPU and, behind the ``cuda`` marker, on CUDA (float16 is then supported).
"""
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastadapt
from conftest import DEVICES
from helpers import TOLERANCES, CUDA_TOLERANCES


def _import_torch_test_db():
    """op_db and module_db, importing torch's internal test package once (about 7 s) and undoing the two
    process-wide side effects of that import (frozen torch.backends flags, TORCHINDUCTOR_CACHE_DIR)."""
    frozen = torch.backends.flags_frozen()
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db
    if not frozen:
        torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
    if env is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    return op_db, module_db


OP_DB, MODULE_DB = _import_torch_test_db()

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F64, F32, BF16, F16]
DTYPE_IDS = {F64: "f64", F32: "f32", BF16: "bf16", F16: "f16", torch.int64: "i64", torch.complex64: "c64"}
LOW_PRECISION = (BF16, F16)

# (mapping, alpha): the sample as the target side, as the source side, as both sides.
MAPPINGS = {"target": 1.0, "source": 0.0, "both": 0.37}

# Low precision is judged as PyTorch judges itself (see check_close).
LOWP_FACTOR = 2.0
LOWP_SLACK = 1e-5


def supported_dtype(device, dtype):
    return dtype in (F64, F32, BF16) or (dtype == F16 and torch.device(device).type == "cuda")


def dtype_param(dtypes):
    return pytest.mark.parametrize("dtype", dtypes, ids=[DTYPE_IDS[d] for d in dtypes])


@pytest.fixture(autouse=True)
def _one_intra_op_thread(request):
    """Runs the small samples on one intra-op thread: on a loaded 2-core machine each OpenMP region of an
    eager op on a tiny tensor otherwise waits milliseconds for a busy core (2-4 min for this file instead
    of ~30 s). The `slow` Liger shapes, large enough for the kernels to split their work, keep torch's
    default thread count (thread counts themselves are tested in test_determinism.py)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)




# --------------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------------

def _pattern(t):
    return torch.stack([t.isnan(), t == math.inf, t == -math.inf])


def _first_mismatch(pa, pb):
    idx = (pa != pb).any(0).nonzero()
    return tuple(idx[0].tolist()) if len(idx) else None


def check_close(actual, oracle, eager, dtype, what, scale=1.0):
    """``actual`` (fastadapt) against ``oracle`` (F on the float64 copy of the same rounded inputs).

    * Shape and dtype equal F's (dtype: the inputs' dtype).
    * NaN, +inf and -inf in exactly the oracle's positions (in low precision, the positions of eager F
      in that dtype are accepted too: that is where the dtype itself overflows).
    * float64 / float32: within ``helpers.TOLERANCES`` (``CUDA_TOLERANCES`` on CUDA), the absolute
      tolerance times ``scale`` (the magnitude of the terms that cancel, where that exceeds 1).
    * bfloat16 / float16, judged as PyTorch judges itself: ``err(x) = max |x - oracle|`` over the
      positions finite in both; ``eager`` is the same expression evaluated eagerly by ``F.*`` in the low
      dtype on the same inputs (for the losses, ``alpha * F(target) + (1 - alpha) * F(source)`` as eager
      PyTorch computes it, which is plain ``F(sample)`` for alpha 0 and 1); the rule is
      ``err(fastadapt) <= LOWP_FACTOR * err(eager) + LOWP_SLACK`` with ``LOWP_FACTOR = 2``,
      ``LOWP_SLACK = 1e-5``. A kernel that accumulates in float32 and rounds once is never farther than
      eager; rounding twice, or accumulating in the low dtype, can be.
    """
    assert tuple(actual.shape) == tuple(oracle.shape), \
        f"{what}: shape {tuple(actual.shape)}, F gives {tuple(oracle.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    a = actual.detach().cpu().double()
    o = oracle.detach().cpu().double()
    if dtype not in LOW_PRECISION:
        rtol, atol = (CUDA_TOLERANCES if actual.is_cuda else TOLERANCES)[dtype]
        # fast path first (these tensors reach 10^5 elements); assert_close for the message
        ok = (a == o) | ((a - o).abs() <= atol * scale + rtol * o.abs()) | (a.isnan() & o.isnan())
        if not bool(ok.all()):
            torch.testing.assert_close(a, o, rtol=rtol, atol=atol * scale, equal_nan=True,
                                       msg=lambda m: f"{what} (fastadapt vs float64 F): {m}")
            raise AssertionError(f"{what}: differs from float64 F")  # assert_close is looser on inf
        return
    e = eager.detach().cpu().double()
    finite = [math.isfinite(t.sum().item()) for t in (a, o, e)]  # one pass each; NaN/inf propagate
    if not (finite[0] and finite[1]):
        pa, po, pe = _pattern(a), _pattern(o), _pattern(e)
        if not (torch.equal(pa, po) or torch.equal(pa, pe)):
            i = _first_mismatch(pa, po)
            raise AssertionError(f"{what}: NaN/inf positions differ from F's; first at {i}: fastadapt {a[i].item()}, "
                                 f"float64 F {o[i].item()}, eager {dtype} F {e[i].item()}")
    err = (a - o).abs()
    eerr = (e - o).abs()
    if not all(finite):
        err = err.where(a.isfinite() & o.isfinite(), 0.0)
        eerr = eerr.where(e.isfinite() & o.isfinite(), 0.0)
    err_max = err.max().item() if err.numel() else 0.0
    eerr_max = eerr.max().item() if eerr.numel() else 0.0
    if err_max > LOWP_FACTOR * eerr_max + LOWP_SLACK:
        i = tuple(int(j) for j in torch.unravel_index(err.argmax(), err.shape)) if err.dim() else ()
        raise AssertionError(
            f"{what}: max error vs float64 F is {err_max:.6g}, more than {LOWP_FACTOR:g} x eager {dtype} F's "
            f"{eerr_max:.6g} + {LOWP_SLACK:g}; worst at {i}: fastadapt {a[i].item()!r}, float64 F {o[i].item()!r}, "
            f"eager {dtype} F {e[i].item()!r}")


CLEAR_ERRORS = (TypeError, ValueError)
F_REJECTIONS = (TypeError, ValueError, IndexError, RuntimeError, NotImplementedError)


def expect_clear_error(call, reasons):
    """``call`` raises a TypeError/ValueError whose message names the offending argument (matches one of
    the regular expressions in ``reasons``), and returns no number."""
    try:
        got = call()
    except CLEAR_ERRORS as exc:
        msg = str(exc)
        assert any(re.search(r, msg) for r in reasons), \
            f"{type(exc).__name__} does not name the argument ({' or '.join(reasons)}): {msg!r}"
        return
    except Exception as exc:  # noqa: BLE001
        raise AssertionError(f"expected a TypeError/ValueError naming {' or '.join(reasons)}, "
                             f"got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"expected a clear error naming {' or '.join(reasons)}, but fastadapt returned {_brief(got)}")


def expect_rejection(call, f_exc):
    """F rejects the input (it raised ``f_exc``): fastadapt must raise too, never return a number."""
    try:
        got = call()
    except F_REJECTIONS:
        return
    raise AssertionError(f"F raises {type(f_exc).__name__}({f_exc}) but fastadapt returned {_brief(got)}")


def _brief(x):
    if isinstance(x, tuple):
        return "(" + ", ".join(_brief(t) for t in x) + ")"
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {x.dtype} {x.detach().flatten()[:4].tolist()}"
    return repr(x)


def _raises(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001
        return exc
    return None


def _leaf(t, dtype=None):
    """A fresh leaf copy of ``t`` (cast to ``dtype`` if floating), requiring grad as ``t`` did."""
    if not isinstance(t, torch.Tensor):
        return t
    c = t.detach().clone()
    if dtype is not None and c.is_floating_point():
        c = c.to(dtype)
    return c.requires_grad_(t.requires_grad and c.is_floating_point())


def _grad(t):
    return t.grad if t.grad is not None else torch.zeros_like(t)


def _upstream(shapes, dtype, device, reduction):
    """The gradient fed to backward: 3.0 for a scalar loss (Liger's "not the last layer" check multiplies
    the loss by 3), fixed random values in [0, 3) per element otherwise. Exact in ``dtype``."""
    gen = torch.Generator().manual_seed(1234)
    return [(torch.rand(s, generator=gen, dtype=F64) * 3).to(dtype).to(device) if reduction == "none"
            else torch.tensor(3.0, dtype=dtype, device=device) for s in shapes]


def _backward(outs, upstream):
    pairs = [(o, g.to(o.dtype)) for o, g in zip(outs, upstream) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


# --------------------------------------------------------------------------------------------------
# The loss harness: one sample, one mapping
# --------------------------------------------------------------------------------------------------

def _dummy_side(kind, like):
    """An unrelated side full of NaN (valid shapes, valid labels): a side whose weight is 0 is not read."""
    first = torch.full((3, 5), math.nan, dtype=like.dtype, device=like.device, requires_grad=True)
    if kind == "ce":
        second = torch.tensor([0, 4, 2], device=like.device)
    else:
        second = torch.full((3, 5), math.nan, dtype=like.dtype, device=like.device)
    return first, second


def _formula(loss, mapping, reduction, unread_shape):
    """``alpha * L(target) + (1 - alpha) * L(source)`` for the mapping, as eager PyTorch computes it:
    ``loss()`` evaluates L on the sample, once per side that is read (two separate calls for "both", so
    that two gradients reach the sample, as they do from fastadapt's two sides); a side whose weight is 0
    contributes nothing (zeros where ``reduction="none"`` returns per-element losses)."""
    alpha = MAPPINGS[mapping]
    if mapping == "both":
        f_s, f_t = loss(), loss()
        return ((1.0 - alpha) * f_s, alpha * f_t) if reduction == "none" else alpha * f_t + (1.0 - alpha) * f_s
    f = loss()
    if reduction != "none":
        return f
    zeros = f.new_zeros(unread_shape)
    return (zeros, f) if mapping == "target" else (f, zeros)


def _side_weights(kw, mapping, dtype):
    """F's class ``weight`` as fastadapt's class weights of the side(s) the sample is on, in ``dtype``."""
    kw = dict(kw)
    w = kw.pop("weight", None)
    if w is not None:
        w = w.detach().to(dtype)
        if mapping != "source":
            kw["target_weight"] = w
        if mapping != "target":
            kw["source_weight"] = w
    return kw


def _call_mapped(fa_fn, a, b, dummy, mapping, kw):
    alpha = MAPPINGS[mapping]
    if mapping == "target":
        return fa_fn(dummy[0], dummy[1], a, b, alpha, **kw)
    if mapping == "source":
        return fa_fn(a, b, dummy[0], dummy[1], alpha, **kw)
    return fa_fn(a, b, a, b, alpha, **kw)


def run_loss_case(kind, leaves, build, kw, mapping, *, fa_fn, f_fn, fa_kw=None, grad=True):
    """Runs one loss sample through fastadapt under ``mapping`` and checks it against the float64 oracle.

    ``leaves`` are the sample's tensors; ``build(leaves) -> (input, target)`` makes the two sides from
    them (a view, for layouts); ``kw`` go to both F and fastadapt, ``fa_kw`` to fastadapt only;
    ``f_fn(input, target, **kw)`` is F (or the nn module). ``kind`` is "ce" or "mse".
    """
    fa_kw = dict(fa_kw or {})
    x0 = leaves[0]
    dtype, device = x0.dtype, x0.device
    reduction = kw.get("reduction", "mean")

    # What fastadapt must refuse: features it lacks, inputs F accepts but it does not support.
    reasons = []
    sample_in, sample_tg = build(leaves)
    if not supported_dtype(device, dtype):
        reasons.append(r"logits" if kind == "ce" else r"pred|target")
    if kind != "ce":
        if tuple(sample_in.shape) != tuple(sample_tg.shape):
            reasons.append(r"^(?=.*(pred|target)).*shape")
        if sample_in.dtype != sample_tg.dtype:
            reasons.append(r"^(?=.*(pred|target)).*dtype")
    f_exc = _raises(lambda: f_fn(*build([_leaf(t) for t in leaves]), **kw))

    fa_leaves = [_leaf(t) for t in leaves]
    a, b = build(fa_leaves)
    dummy = _dummy_side(kind, a)

    fa_call_kw = _side_weights({**kw, **fa_kw}, mapping, dtype) if kind == "ce" else {**kw, **fa_kw}

    def call():
        with torch.set_grad_enabled(grad):
            return _call_mapped(fa_fn, a, b, dummy, mapping, fa_call_kw)

    if reasons:
        expect_clear_error(call, reasons)
        return
    if f_exc is not None:
        expect_rejection(call, f_exc)
        return

    out = _as_tuple(call())
    unread_shape = tuple(dummy[1].shape) if kind == "ce" else tuple(dummy[0].shape)

    def evaluate(cast):
        lv = [_leaf(t, cast) for t in leaves]
        kw_cast = {k: _leaf(v, cast) for k, v in kw.items()}  # a class weight in the oracle's dtype
        with torch.set_grad_enabled(grad):
            return lv, _as_tuple(_formula(lambda: f_fn(*build(lv), **kw_cast), mapping, reduction, unread_shape))

    o_leaves, o_out = evaluate(F64)
    e_leaves, e_out = evaluate(None) if dtype in LOW_PRECISION else (o_leaves, o_out)

    assert len(out) == len(o_out), f"fastadapt returned {len(out)} tensors, expected {len(o_out)}"
    names = ("source losses", "target losses") if len(out) == 2 else ("loss",)
    for name, r, o, e in zip(names, out, o_out, e_out):
        check_close(r, o, e, dtype, name)

    if not grad:
        return
    up = _upstream([o.shape for o in o_out], dtype, device, reduction)
    _backward(out, up)
    _backward(o_out, up)
    if e_out is not o_out:
        _backward(e_out, up)
    # Class weights scale the gradient, and with it float32's rounding where its terms cancel (eager
    # float32 F is 2.4e-6 off float64 on ModuleInfo's weights near 8, past the absolute tolerance).
    gscale = max(1.0, float(kw["weight"].abs().max())) if "weight" in kw else 1.0
    for i, (r, o, e) in enumerate(zip(fa_leaves, o_leaves, e_leaves)):
        if isinstance(r, torch.Tensor) and r.requires_grad:
            name = ("input", "target")[i] if kind == "mse" else ("logits", "probability targets")[i]
            check_close(_grad(r), _grad(o), _grad(e), dtype, f"gradient of the {name} {tuple(r.shape)}", gscale)
    if mapping != "both":
        g = dummy[0].grad
        assert g is None or bool((g == 0).all()), \
            f"the unread {'source' if mapping == 'target' else 'target'} side got a gradient: {_brief(g)}"


def run_loss_mappings(subtests, kind, leaves, build, kw, *, mappings=tuple(MAPPINGS), label="", **options):
    """run_loss_case for each mapping, each a subtest named like ``target-a1`` (``label`` prefixed)."""
    for mapping in mappings:
        with subtests.test(f"{label}{mapping}-a{MAPPINGS[mapping]:g}"):
            run_loss_case(kind, leaves, build, kw, mapping, **options)


CE = dict(fa_fn=fastadapt.alpha_weighted_cross_entropy, f_fn=F.cross_entropy)
MSE = dict(fa_fn=fastadapt.alpha_weighted_mse, f_fn=F.mse_loss)


def _pair(leaves):
    return leaves[0], leaves[1]


# --------------------------------------------------------------------------------------------------
# PyTorch OpInfo samples
# --------------------------------------------------------------------------------------------------

OPS = {op.name: op for op in OP_DB
       if op.name in ("nn.functional.cross_entropy", "nn.functional.mse_loss", "nn.functional.linear")
       and op.variant_test_name == ""}
assert len(OPS) == 3, sorted(OPS)
CE_OP, MSE_OP, LINEAR_OP = "nn.functional.cross_entropy", "nn.functional.mse_loss", "nn.functional.linear"


def _shape(t):
    return "x".join(map(str, t.shape)) if t.dim() else "scalar"


def _kw_id(kw):
    return "".join("-" + (k if isinstance(v, torch.Tensor) else f"{k}={v}") for k, v in kw.items())


def _describe_op_sample(name, s):
    if name == CE_OP:
        tgt = s.args[0]
        return f"in{_shape(s.input)}-{'probs' if tgt.is_floating_point() else 'labels'}{_shape(tgt)}{_kw_id(s.kwargs)}"
    if name == MSE_OP:
        return f"in{_shape(s.input)}-tg{_shape(s.args[0])}{_kw_id(s.kwargs)}"
    x, w, b = _linear_args(s)
    return f"x{_shape(x)}-w{_shape(w)}" + (f"-b{_shape(b)}" if b is not None else "-nobias")


def _linear_args(s):
    b = s.args[1] if len(s.args) > 1 else s.kwargs.get("bias")
    return s.input, s.args[0], b


_SAMPLE_CACHE = {}


def op_samples(name, device, dtype):
    """The OpInfo's samples, generated once per (device, dtype) from a fixed seed."""
    key = ("op", name, str(device), dtype)
    if key not in _SAMPLE_CACHE:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            rg = dtype.is_floating_point or dtype.is_complex
            _SAMPLE_CACHE[key] = list(OPS[name].sample_inputs(device, dtype, requires_grad=rg))
    return _SAMPLE_CACHE[key]


def op_sample(name, idx, device, dtype):
    samples, ref = op_samples(name, device, dtype), op_samples(name, "cpu", F32)
    assert len(samples) == len(ref) and _describe_op_sample(name, samples[idx]) == _describe_op_sample(name, ref[idx])
    return samples[idx]


def op_sample_params(name, keep=lambda s: True):
    return [pytest.param(i, id=f"{i:02d}-{_describe_op_sample(name, s)}")
            for i, s in enumerate(op_samples(name, "cpu", F32)) if keep(s)]


@pytest.mark.parametrize("idx", op_sample_params(CE_OP))
@dtype_param(DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_opinfo_cross_entropy(backend, device, dtype, idx, subtests):
    s = op_sample(CE_OP, idx, device, dtype)
    run_loss_mappings(subtests, "ce", [s.input, s.args[0]], _pair, dict(s.kwargs), **CE)


@pytest.mark.parametrize("idx", op_sample_params(MSE_OP))
@dtype_param(DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_opinfo_mse_loss(backend, device, dtype, idx, subtests):
    s = op_sample(MSE_OP, idx, device, dtype)
    run_loss_mappings(subtests, "mse", [s.input, s.args[0]], _pair, dict(s.kwargs), **MSE)


# F.mse_loss broadcasts (with a warning) and promotes mixed dtypes; fastadapt refuses both, clearly.
MSE_REFUSED = {
    "target_drops_last_dim": lambda p, t: t[..., 0],
    "target_size1_leading_dims": lambda p, t: t.reshape(1, *t.shape)[:, :1],
    "target_other_dtype": lambda p, t: t.double() if p.dtype != F64 else t.float(),
}


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")  # F's broadcasting warning: intended
@pytest.mark.parametrize("variant", list(MSE_REFUSED))
@pytest.mark.parametrize("idx", op_sample_params(MSE_OP, keep=lambda s: s.input.dim() >= 1))
@dtype_param([F32, BF16])
@pytest.mark.parametrize("device", DEVICES)
def test_opinfo_mse_loss_refused_variants(backend, device, dtype, idx, variant, subtests):
    s = op_sample(MSE_OP, idx, device, dtype)
    tgt = MSE_REFUSED[variant](s.input, s.args[0]).detach()
    assert _raises(lambda: F.mse_loss(s.input.detach(), tgt, **s.kwargs)) is None  # F accepts it
    run_loss_mappings(subtests, "mse", [s.input, tgt], _pair, dict(s.kwargs), **MSE)


def run_linear_case(x, w, b):
    """``fastadapt.linear_relu(x, w, b)`` against ``F.relu(F.linear(x, w, b))`` on the float64 copies: the
    output and the gradient of every tensor that requires grad."""
    ref_fn = lambda x_, w_, b_: F.relu(F.linear(x_, w_, b_))  # noqa: E731
    dtype, device = x.dtype, x.device
    reasons = []
    if not supported_dtype(device, dtype):
        reasons.append(r"\bx\b")
    if w.dim() != 2:
        reasons.append(r"weight")
    if b is not None and (b.dim() != 1 or (w.dim() == 2 and b.shape[0] != w.shape[0])):
        reasons.append(r"bias")
    f_exc = _raises(lambda: ref_fn(x.detach(), w.detach(), None if b is None else b.detach()))
    leaves = [_leaf(t) for t in (x, w, b)]
    call = lambda: fastadapt.linear_relu(*leaves)  # noqa: E731
    if reasons:
        expect_clear_error(call, reasons)
        return
    if f_exc is not None:
        expect_rejection(call, f_exc)
        return
    out = call()
    o_leaves = [_leaf(t, F64) for t in (x, w, b)]
    o_out = ref_fn(*o_leaves)
    e_leaves, e_out = o_leaves, o_out
    if dtype in LOW_PRECISION:
        e_leaves = [_leaf(t) for t in (x, w, b)]
        e_out = ref_fn(*e_leaves)
    check_close(out, o_out, e_out, dtype, "output")
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
        return
    up = _upstream([o_out.shape], dtype, device, "none")
    for outs in {id(o): o for o in (out, o_out, e_out)}.values():
        _backward((outs,), up)
    for name, r, o, e in zip(("x", "weight", "bias"), leaves, o_leaves, e_leaves):
        if isinstance(r, torch.Tensor) and r.requires_grad:
            check_close(_grad(r), _grad(o), _grad(e), dtype, f"gradient of {name}")


LINEAR_DTYPES = DTYPES + [torch.int64, torch.complex64]


@pytest.mark.parametrize("idx", op_sample_params(LINEAR_OP))
@pytest.mark.parametrize("device", DEVICES)
def test_opinfo_linear(backend, device, idx, subtests):
    for dtype in LINEAR_DTYPES:
        with subtests.test(DTYPE_IDS[dtype]):
            run_linear_case(*_linear_args(op_sample(LINEAR_OP, idx, device, dtype)))


# Layouts F.linear accepts that linear_relu does not: a 1-D weight (a dot product), a bias that only
# broadcasts (shape (1,) or ()).
LINEAR_REFUSED = {
    "weight_1d": lambda x, w, b: (x, w[0].detach().clone().requires_grad_(w.requires_grad), None),
    "bias_shape_1": lambda x, w, b: (x, w, torch.ones(1, dtype=w.dtype, device=w.device)),
    "bias_0dim": lambda x, w, b: (x, w, torch.ones((), dtype=w.dtype, device=w.device)),
}


@pytest.mark.parametrize("idx", op_sample_params(LINEAR_OP, keep=lambda s: _linear_args(s)[2] is not None)[:3])
@pytest.mark.parametrize("device", DEVICES)
def test_opinfo_linear_refused_layouts(backend, device, idx, subtests):
    for dtype in (F32, BF16):
        for variant, make in LINEAR_REFUSED.items():
            with subtests.test(f"{DTYPE_IDS[dtype]}-{variant}"):
                x, w, b = make(*_linear_args(op_sample(LINEAR_OP, idx, device, dtype)))
                assert _raises(lambda: F.linear(x.detach(), w.detach(), b)) is None  # F accepts it
                run_linear_case(x, w, b)


# --------------------------------------------------------------------------------------------------
# PyTorch ModuleInfo samples
# --------------------------------------------------------------------------------------------------

MODULES = {m.module_cls.__name__: m for m in MODULE_DB if m.module_cls in (nn.Linear, nn.CrossEntropyLoss, nn.MSELoss)}
assert len(MODULES) == 3, sorted(MODULES)


def module_samples(name, device, dtype):
    key = ("module", name, str(device), dtype)
    if key not in _SAMPLE_CACHE:
        info = MODULES[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _SAMPLE_CACHE[key] = list(info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True,
                                                              training=True))
    return _SAMPLE_CACHE[key]


def module_sample(name, idx, device, dtype):
    samples, ref = module_samples(name, device, dtype), module_samples(name, "cpu", F32)
    assert len(samples) == len(ref) and samples[idx].desc == ref[idx].desc
    return samples[idx]


def _describe_module_sample(m):
    fi = m.forward_input
    shapes = "-".join(_shape(t) for t in list(fi.args) + list(fi.kwargs.values()) if isinstance(t, torch.Tensor))
    ctor = m.constructor_input
    parts = [m.desc or "default", "x".join(str(a) for a in ctor.args), _kw_id(ctor.kwargs).lstrip("-"), shapes]
    return "-".join(p for p in parts if p)


def module_sample_params(name):
    return [pytest.param(i, id=f"{i:03d}-{_describe_module_sample(m)}")
            for i, m in enumerate(module_samples(name, "cpu", F32))]


def run_module_linear_case(m, idx, device, dtype):
    args, kwargs = m.constructor_input.args, m.constructor_input.kwargs
    fi = m.forward_input
    x = fi.args[0] if fi.args else fi.kwargs["input"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(idx)
        state = nn.Linear(*args, **kwargs).to(device=device, dtype=dtype).state_dict()
    fused = fastadapt.FusedLinearReLU(*args, **kwargs, device=device, dtype=dtype)
    fused.load_state_dict(state)
    if not supported_dtype(device, dtype):
        expect_clear_error(lambda: fused(_leaf(x)), [r"\bx\b"])
        return

    def sequential(dt):
        seq = nn.Sequential(nn.Linear(*args, **kwargs, device=device, dtype=dt), nn.ReLU())
        seq[0].load_state_dict({k: v.to(dt) for k, v in state.items()})
        return seq

    fx = _leaf(x)
    out = fused(fx)
    o_seq, ox = sequential(F64), _leaf(x, F64)
    o_out = o_seq(ox)
    e_seq, ex, e_out = o_seq, ox, o_out
    if dtype in LOW_PRECISION:
        e_seq, ex = sequential(dtype), _leaf(x)
        e_out = e_seq(ex)
    check_close(out, o_out, e_out, dtype, "output")
    up = _upstream([o_out.shape], dtype, device, "none")
    for outs in {id(o): o for o in (out, o_out, e_out)}.values():
        _backward((outs,), up)
    check_close(_grad(fx), _grad(ox), _grad(ex), dtype, "gradient of the input")
    for pname in ("weight", "bias"):
        p = getattr(fused, pname)
        assert (p is None) == (getattr(o_seq[0], pname) is None)
        if p is not None:
            check_close(_grad(p), _grad(getattr(o_seq[0], pname)), _grad(getattr(e_seq[0], pname)), dtype,
                        f"gradient of {pname}")


@pytest.mark.parametrize("idx", module_sample_params("Linear"))
@pytest.mark.parametrize("device", DEVICES)
def test_moduleinfo_linear(backend, device, idx, subtests):
    for dtype in DTYPES:
        with subtests.test(DTYPE_IDS[dtype]):
            run_module_linear_case(module_sample("Linear", idx, device, dtype), idx, device, dtype)


def run_module_loss_case(subtests, name, idx, device):
    kind = "ce" if name == "CrossEntropyLoss" else "mse"
    cls = getattr(nn, name)

    def fa_fn(sa, sb, ta, tb, alpha, **kw):
        return fastadapt.AlphaWeightedLoss(alpha, kind="cross_entropy" if kind == "ce" else "mse", **kw)(sa, sb, ta, tb)

    def f_fn(a, b, **kw):
        return cls(**{k: (v.to(a.dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})(a, b)

    for dtype in DTYPES:
        m = module_sample(name, idx, device, dtype)
        run_loss_mappings(subtests, kind, list(m.forward_input.args), _pair, dict(m.constructor_input.kwargs),
                          mappings=("target",), label=f"{DTYPE_IDS[dtype]}-", fa_fn=fa_fn, f_fn=f_fn)


@pytest.mark.parametrize("idx", module_sample_params("CrossEntropyLoss"))
@pytest.mark.parametrize("device", DEVICES)
def test_moduleinfo_cross_entropy_loss(backend, device, idx, subtests):
    run_module_loss_case(subtests, "CrossEntropyLoss", idx, device)


@pytest.mark.parametrize("idx", module_sample_params("MSELoss"))
@pytest.mark.parametrize("device", DEVICES)
def test_moduleinfo_mse_loss(backend, device, idx, subtests):
    run_module_loss_case(subtests, "MSELoss", idx, device)


# --------------------------------------------------------------------------------------------------
# Liger-Kernel's cross-entropy grid (test/transformers/test_cross_entropy.py), scaled for the CPU
# --------------------------------------------------------------------------------------------------

# Liger: (2, 4096, 32000) llama, (3, 423, 32000) "weird shapes", (1, 4096, 128256) llama3 (older grid),
# (2, 2, 8) and (9, 7, 41) for its functional form. Here the rows are cut so that V=32000 stays cheap,
# and T=423 keeps an odd vocabulary of moderate size; the larger ones run as `slow`.
LIGER_SHAPES = [(2, 2, 8), (9, 7, 41), (3, 423, 67), (1, 4, 32000)]
LIGER_SHAPES_SLOW = [(1, 64, 32000), (1, 8, 128256), (3, 423, 1031)]
# (scalar, dtype): Liger multiplies randn logits by 0.1, 1 and 10, in bf16 and fp32.
LIGER_SCALES = [(0.1, BF16), (1.0, BF16), (10.0, BF16), (0.1, F32), (1.0, F32), (10.0, F32)]
REDUCTIONS = ["mean", "sum", "none"]


def _shape_id(shape):
    return "B{}xT{}xV{}".format(*shape)


def liger_inputs(B, T, V, scalar, dtype, device, ignore_index=None, layout="flat"):
    """Liger's inputs: randn(B*T, V) * scalar in ``dtype``, labels in [0, V), and (when ``ignore_index`` is
    given) a random 1..B*T/2 rows set to it. Returns (leaves, build): ``build`` lays the logits out as
    ``flat`` (B*T, V), ``NCd`` (B, V, T) (F's class-dim-1 layout, a non-contiguous view) or ``class_last``
    (B, T, V)."""
    logits = (torch.randn(B * T, V, dtype=dtype, device=device) * scalar).requires_grad_()
    labels = torch.randint(0, V, (B * T,), device=device)
    if ignore_index is not None:
        n = int(torch.randint(1, max(B * T // 2, 2), (1,)))
        labels[torch.randperm(B * T)[:n].to(device)] = ignore_index
    if layout == "flat":
        return [logits, labels], _pair
    if layout == "NCd":
        return [logits, labels.view(B, T)], lambda lv: (lv[0].view(B, T, V).transpose(1, 2), lv[1])
    assert layout == "class_last"
    return [logits, labels.view(B, T)], lambda lv: (lv[0].view(B, T, V), lv[1])


def _f_class_last(a, b, **kw):
    """F.cross_entropy for class-last logits (..., C): F's own layout is (N, C, d1, ...)."""
    return F.cross_entropy(a.movedim(-1, 1) if a.dim() >= 3 else a, b, **kw)


def liger_case(subtests, shape, scalar, dtype, device, *, ignore_index=None, label_smoothing=None,
               reduction="mean", layout="flat", grad=True, mappings=tuple(MAPPINGS), label=""):
    leaves, build = liger_inputs(*shape, scalar, dtype, device, ignore_index, layout)
    kw = {"reduction": reduction}
    if ignore_index is not None:
        kw["ignore_index"] = ignore_index
    if label_smoothing is not None:
        kw["label_smoothing"] = label_smoothing
    options = dict(CE, grad=grad, mappings=mappings, label=label)
    if layout == "class_last":
        options.update(f_fn=_f_class_last, fa_kw={"class_dim": -1})
    run_loss_mappings(subtests, "ce", leaves, build, kw, **options)


liger_scale_param = pytest.mark.parametrize("scalar,dtype", LIGER_SCALES,
                                            ids=[f"x{s:g}-{DTYPE_IDS[d]}" for s, d in LIGER_SCALES])
liger_dtype_param = pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@liger_scale_param
@pytest.mark.parametrize("shape", LIGER_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_liger_correctness(backend, device, shape, scalar, dtype, reduction, subtests):
    liger_case(subtests, shape, scalar, dtype, device, reduction=reduction)


@pytest.mark.slow
@liger_dtype_param
@pytest.mark.parametrize("shape", LIGER_SHAPES_SLOW, ids=_shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_liger_correctness_large(backend, device, shape, dtype, subtests):
    for reduction in REDUCTIONS:
        liger_case(subtests, shape, 1.0, dtype, device, reduction=reduction, ignore_index=-100, label_smoothing=0.1,
                   mappings=("both",), label=f"{reduction}-")


# Liger pairs each shape with one ignore_index: 2 (a real class) or -123 / -300 / -100 (outside [0, V)).
LIGER_IGNORE = [(LIGER_SHAPES[0], 2), (LIGER_SHAPES[1], -123), (LIGER_SHAPES[2], -300), (LIGER_SHAPES[3], 2),
                (LIGER_SHAPES[3], -100)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@liger_dtype_param
@pytest.mark.parametrize("shape,ignore_index", LIGER_IGNORE, ids=[f"{_shape_id(s)}-ii{i}" for s, i in LIGER_IGNORE])
@pytest.mark.parametrize("device", DEVICES)
def test_liger_ignore_index(backend, device, shape, ignore_index, dtype, reduction, subtests):
    liger_case(subtests, shape, 1.0, dtype, device, ignore_index=ignore_index, reduction=reduction)


@liger_dtype_param
@pytest.mark.parametrize("shape", LIGER_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_liger_label_smoothing(backend, device, shape, dtype, subtests):
    liger_case(subtests, shape, 1.0, dtype, device, label_smoothing=0.1)


# (ignore_index, label_smoothing, reduction): Liger's label-smoothing-with-ignore-index pairs (1, 0.1),
# (-300, 0.2), its z-loss grid's (42, 0.1, mean), (-42, 0.2, sum), and one per-row case.
LIGER_LS_II = [(1, 0.1, "mean"), (-300, 0.2, "mean"), (42, 0.1, "mean"), (-42, 0.2, "sum"), (-100, 0.1, "none")]


@liger_dtype_param
@pytest.mark.parametrize("ignore_index,label_smoothing,reduction", LIGER_LS_II,
                         ids=[f"ii{i}-ls{s:g}-{r}" for i, s, r in LIGER_LS_II])
@pytest.mark.parametrize("shape", LIGER_SHAPES[:3], ids=_shape_id)
@pytest.mark.parametrize("device", DEVICES)
def test_liger_label_smoothing_ignore_index(backend, device, shape, ignore_index, label_smoothing, reduction, dtype,
                                            subtests):
    liger_case(subtests, shape, 1.0, dtype, device, ignore_index=ignore_index, label_smoothing=label_smoothing,
               reduction=reduction)


# Liger's rows laid out as F's (N, C, d1) (class_dim=1, the default) and class-last (class_dim=-1).
LAYOUT_VARIANTS = [(None, None, "mean"), (None, None, "none"), (-123, 0.1, "sum"), (2, 0.1, "none")]


@liger_dtype_param
@pytest.mark.parametrize("ignore_index,label_smoothing,reduction", LAYOUT_VARIANTS,
                         ids=["mean", "none", "ii-123-ls0.1-sum", "ii2-ls0.1-none"])
@pytest.mark.parametrize("shape", LIGER_SHAPES[:3], ids=_shape_id)
@pytest.mark.parametrize("layout", ["NCd", "class_last"])
@pytest.mark.parametrize("device", DEVICES)
def test_liger_layouts(backend, device, layout, shape, ignore_index, label_smoothing, reduction, dtype, subtests):
    liger_case(subtests, shape, 1.0, dtype, device, ignore_index=ignore_index, label_smoothing=label_smoothing,
               reduction=reduction, layout=layout)


# Liger's forward-only check (under no_grad), the one place its grid has fp16: refused on the CPU.
@pytest.mark.parametrize("reduction", REDUCTIONS)
@dtype_param([F32, F16, BF16])
@pytest.mark.parametrize("shape,ignore_index", [(LIGER_SHAPES[3], -100), (LIGER_SHAPES[2], 2)],
                         ids=[f"{_shape_id(LIGER_SHAPES[3])}-ii-100", f"{_shape_id(LIGER_SHAPES[2])}-ii2"])
@pytest.mark.parametrize("device", DEVICES)
def test_liger_forward_only(backend, device, shape, ignore_index, dtype, reduction, subtests):
    liger_case(subtests, shape, 1.0, dtype, device, ignore_index=ignore_index, reduction=reduction, grad=False)


# --------------------------------------------------------------------------------------------------
# Non-finite values and empty batches on the samples' shapes (NaN/inf must land where F puts them)
# --------------------------------------------------------------------------------------------------

def _ce_edge(name, dtype, device):
    """(logits, labels, kwargs) for the named case, on the OpInfo shapes (2, 3) and (2, 3, 5); label smoothing
    0.15 as in the ModuleInfo samples."""
    gen = torch.Generator().manual_seed(3)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=F64)  # noqa: E731
    long = lambda v: torch.tensor(v, device=device)  # noqa: E731
    if name.startswith("neginf"):
        ls = 0.15 if "_ls" in name else 0.0
        if name.endswith("NCd"):
            x, y = randn(2, 3, 5), long([[0, 1, 2, 0, 1], [2, 2, 1, 0, 0]])
            where = (1, 0 if "at_label" in name else 1, 3)  # y[1, 3] == 0
        else:
            x, y = randn(2, 3), long([1, 2])
            where = (0, 1 if "at_label" in name else 0)
        x[where] = -math.inf
        return x.to(dtype).to(device), y, {"label_smoothing": ls}
    if name == "empty_batch_0x3":
        return randn(0, 3).to(dtype).to(device), long([]).long(), {}
    if name == "empty_0x0":
        return randn(0, 0).to(dtype).to(device), long([]).long(), {}
    if name == "all_ignored":
        return randn(2, 3).to(dtype).to(device), long([1, 1]), {"ignore_index": 1}
    if name == "NCd_square_2x4x4":  # (2, 4, 4) logits with (2, 4) labels: a class-last reading also fits
        return randn(2, 4, 4).to(dtype).to(device), long([[0, 1, 2, 3], [3, 3, 0, 1]]), {}
    if name == "label_out_of_range":  # F raises IndexError
        return randn(2, 3).to(dtype).to(device), long([0, 3]), {}
    raise KeyError(name)


CE_EDGES = ["neginf_at_label_ls", "neginf_off_label_ls", "neginf_off_label", "neginf_at_label_ls_NCd",
            "neginf_off_label_ls_NCd", "empty_batch_0x3", "empty_0x0", "all_ignored", "NCd_square_2x4x4",
            "label_out_of_range"]


@pytest.mark.parametrize("case", CE_EDGES)
@dtype_param([F64, F32, BF16])
@pytest.mark.parametrize("device", DEVICES)
def test_cross_entropy_edges(backend, device, dtype, case, subtests):
    x, y, kw = _ce_edge(case, dtype, device)
    for reduction in REDUCTIONS:
        run_loss_mappings(subtests, "ce", [x.requires_grad_(), y], _pair, {**kw, "reduction": reduction},
                          label=f"{reduction}-", **CE)


MSE_EDGES = {
    "pred_inf": lambda p, t: (p.index_fill(0, torch.tensor([1], device=p.device), math.inf), t),
    "pred_neginf_target_inf": lambda p, t: (p.index_fill(0, torch.tensor([0], device=p.device), -math.inf),
                                            t.index_fill(0, torch.tensor([0], device=p.device), math.inf)),
    "pred_nan": lambda p, t: (p.index_fill(0, torch.tensor([2], device=p.device), math.nan), t),
    "empty_0x5": lambda p, t: (p[:0], t[:0]),
}


@pytest.mark.parametrize("case", list(MSE_EDGES))
@dtype_param([F64, F32, BF16])
@pytest.mark.parametrize("device", DEVICES)
def test_mse_edges(backend, device, dtype, case, subtests):
    gen = torch.Generator().manual_seed(4)
    p, t = (torch.randn(5, 5, generator=gen, dtype=F64).to(dtype).to(device) for _ in range(2))
    p, t = MSE_EDGES[case](p, t)
    for reduction in REDUCTIONS:
        run_loss_mappings(subtests, "mse", [p.requires_grad_(), t.requires_grad_()], _pair, {"reduction": reduction},
                          label=f"{reduction}-", **MSE)


@pytest.mark.parametrize("case", ["x_inf", "x_nan", "bias_neginf"])
@dtype_param([F64, F32, BF16])
@pytest.mark.parametrize("device", DEVICES)
def test_linear_edges(backend, device, dtype, case):
    gen = torch.Generator().manual_seed(5)
    x, w, b = (torch.randn(*s, generator=gen, dtype=F64).to(dtype).to(device) for s in ((8, 3), (4, 3), (4,)))
    if case == "x_inf":
        x[2, 1] = math.inf
    elif case == "x_nan":
        x[5, 0] = math.nan
    else:
        b[1] = -math.inf
    run_linear_case(x.requires_grad_(), w.requires_grad_(), b.requires_grad_())
