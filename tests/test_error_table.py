"""Every error path of the public API and of the CLI, as one table: input -> exception and message.

The table in docs/ERRORS.md is rendered from API_CASES and CLI_CASES below (``python
tests/test_error_table.py > docs/ERRORS.md``), and test_docs_table_is_current fails when the two
drift apart. Each API row runs through the compiled kernels and through the fallback: the arguments are
validated before either runs, so both raise the same thing. ``{tmp}`` stands for a scratch folder.
"""
import os
import sys
import warnings

import numpy as np
import pytest
import torch

import fastadapt
from helpers import use_backend
from fastadapt.apps import cli

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(os.path.dirname(HERE), "docs", "ERRORS.md")

f32, f64 = torch.float32, torch.float64


def L(*shape, dtype=f32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def Y(*shape, dtype=torch.long, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def ce(sl=None, sy=None, tl=None, ty=None, alpha=0.5, **kw):
    sl = L(4, 5) if sl is None else sl
    sy = Y(4) if sy is None else sy
    tl = L(3, 6) if tl is None else tl
    ty = Y(3) if ty is None else ty
    return fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, **kw)


def mse(sp=None, st=None, tp=None, tt=None, alpha=0.5, **kw):
    sp = L(4) if sp is None else sp
    st = L(4) if st is None else st
    tp = L(2, 3) if tp is None else tp
    tt = L(2, 3) if tt is None else tt
    return fastadapt.alpha_weighted_mse(sp, st, tp, tt, alpha, **kw)


def kd(z=None, y=None, t=None, alpha=0.5, temperature=2.0, **kw):
    z = L(4, 5) if z is None else z
    y = Y(4) if y is None else y
    t = L(4, 3) if t is None else t
    return fastadapt.alpha_weighted_distillation(z, y, t, alpha, temperature, **kw)


def lce(sh=None, sy=None, th=None, ty=None, w=None, b=None, **kw):
    sh = L(4, 8) if sh is None else sh
    sy = Y(4) if sy is None else sy
    th = L(3, 8) if th is None else th
    ty = Y(3) if ty is None else ty
    w = L(5, 8) if w is None else w
    return fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, 0.5, **kw)


def _script(module):
    with warnings.catch_warnings():  # torch.jit.script's own FutureWarning (deprecated)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def _labels(*values):
    return torch.tensor(values)


def _trainer(**kw):
    return fastadapt.TransferTrainer(fastadapt.MLP(4, (8,), 3), progress_bar=False, **kw)


def _lm(**kw):
    from fastadapt.training import LMAdaptiveTrainer, TinyCausalLM
    return LMAdaptiveTrainer(TinyCausalLM(24, d_model=8, n_layers=1, n_heads=2, max_len=8), progress_bar=False,
                             device="cpu", **kw)


def _tokens(n=4, t=8):
    ids = torch.arange(n * t).view(n, t) % 24
    return ids, ids.clone()


def _hf_llama(**config):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, **config)
    return transformers.LlamaForCausalLM(cfg)


def _hf_trainer(tmp, **kw):
    transformers = pytest.importorskip("transformers")
    from fastadapt.hf import HFAdaptiveTrainer
    args = transformers.TrainingArguments(tmp, use_cpu=True, report_to=[])
    return HFAdaptiveTrainer(_hf_llama(), args, **kw)


def _fit(X, y, **kw):
    return _trainer().fit((X, y), epochs=1, **kw)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


# (id, input, callable(tmp), exception type, message); the message must appear in str(exception).
API_CASES = [
    # ---- alpha_weighted_cross_entropy
    ("ce-logits-type", "source_logits=[[0.0]] (a list)", lambda t: ce(sl=[[0.0]]), TypeError,
     "source_logits must be a torch.Tensor, got list"),
    ("ce-labels-type", "target_labels=3 (an int)", lambda t: ce(ty=3), TypeError,
     "target_labels must be a torch.Tensor, got int"),
    ("ce-logits-int", "source_logits of dtype int64", lambda t: ce(sl=L(4, 5, dtype=torch.long)), TypeError,
     "source_logits must be a floating tensor (float32, float64, bfloat16 on cpu), got dtype torch.int64"),
    ("ce-logits-half-cpu", "float16 logits on the CPU", lambda t: ce(sl=L(4, 5, dtype=torch.float16)), TypeError,
     "source_logits must be a floating tensor (float32, float64, bfloat16 on cpu), got dtype torch.float16"),
    ("ce-labels-float", "float labels (4,) for logits (4, 5)", lambda t: ce(sy=Y(4, dtype=f32)), ValueError,
     "source_labels holds probability targets (dtype torch.float32), so it must have the shape of source_logits, "
     "(4, 5), got (4,) (class indices need an integer dtype)"),
    ("ce-probs-dtype", "float64 probability targets for float32 logits", lambda t: ce(sy=L(4, 5, dtype=f64)),
     TypeError, "source_labels holds probability targets of dtype torch.float64 but source_logits has dtype "
     "torch.float32; they must match (class indices need an integer dtype)"),
    ("ce-probs-ignore-index", "probability targets with ignore_index=0", lambda t: ce(ty=L(3, 6), ignore_index=0),
     ValueError, "ignore_index=0 does not apply to probability targets (target_labels has dtype torch.float32); "
     "F.cross_entropy refuses it too: leave it at a negative value"),
    ("ce-probs-zero-classes", "probability targets (3, 0) for logits (3, 0)", lambda t: ce(tl=L(3, 0), ty=L(3, 0)),
     ValueError, "target_logits has 0 classes (shape (3, 0)) but 3 rows of probability targets"),
    ("ce-labels-bool", "bool labels", lambda t: ce(ty=Y(3, dtype=torch.bool)), TypeError,
     "target_labels must hold class indices (an integer dtype) or probability targets (the dtype of target_logits, "
     "torch.float32), got dtype torch.bool"),
    ("ce-weight-type", "source_weight=[1.0] * 5 (a list)", lambda t: ce(source_weight=[1.0] * 5), TypeError,
     "source_weight must be a torch.Tensor, got list"),
    ("ce-weight-length", "target_weight of 5 values for 6 target classes", lambda t: ce(target_weight=L(5)),
     ValueError, "target_weight must be 1-D with one weight per class of target_logits (6), got shape (5,)"),
    ("ce-weight-ndim", "source_weight of shape (1, 5)", lambda t: ce(source_weight=L(1, 5)), ValueError,
     "source_weight must be 1-D with one weight per class of source_logits (5), got shape (1, 5)"),
    ("ce-weight-dtype", "float64 source_weight for float32 logits", lambda t: ce(source_weight=L(5, dtype=f64)),
     TypeError, "source_weight has dtype torch.float64 but source_logits has dtype torch.float32; they must match "
     "(F.cross_entropy requires it too)"),
    ("ce-weight-device", "target_weight on another device (meta)", lambda t: ce(target_weight=L(6, device="meta")),
     ValueError, "target_weight is on meta but target_logits is on cpu; they must share one device"),
    ("ce-weight-grad", "source_weight with requires_grad=True",
     lambda t: ce(source_weight=L(5).requires_grad_()), ValueError,
     "source_weight requires grad, but fastadapt does not differentiate class weights (F.cross_entropy does); "
     "pass source_weight.detach()"),
    ("ce-logits-0dim", "0-dim logits", lambda t: ce(sl=L(), sy=Y()), ValueError,
     "source_logits must have a class dimension, got a 0-dim tensor"),
    ("ce-shape", "labels (3,) for logits (4, 5)", lambda t: ce(sy=Y(3)), ValueError,
     "source_labels has shape (3,) but source_logits has shape (4, 5); class_dim=1 reads logits as "
     "F.cross_entropy does, (N, C, d1, ...) with labels (N, d1, ...), so source_labels must have shape (4,)"),
    ("ce-class-last", "(batch, seq, vocab) logits (2, 7, 50) with (2, 7) labels and the default class_dim=1",
     lambda t: ce(sl=L(2, 7, 50), sy=Y(2, 7)), ValueError,
     "source_labels must have shape (2, 50); for class-last logits (..., C), such as a language model's "
     "(batch, seq, vocab), pass class_dim=-1"),
    ("ce-class-dim", "class_dim=2", lambda t: ce(class_dim=2), ValueError,
     "class_dim must be 1 (F.cross_entropy's layout: (N, C, d1, ...)) or -1 (class-last: (..., C)), got 2"),
    ("ce-zero-classes", "logits (3, 0) with 3 labels", lambda t: ce(tl=L(3, 0)), ValueError,
     "target_logits has 0 classes (shape (3, 0)) but 3 labels"),
    ("ce-dtype-sides", "float32 source, float64 target", lambda t: ce(tl=L(3, 6, dtype=f64)), TypeError,
     "target_logits has dtype torch.float64 but source_logits has dtype torch.float32; they must match"),
    ("ce-device", "target_labels on another device (meta)", lambda t: ce(ty=Y(3, device="meta")), ValueError,
     "target_labels is on meta but source_logits is on cpu; all inputs must share one device"),
    ("ce-smoothing-range", "label_smoothing=1.5", lambda t: ce(label_smoothing=1.5), ValueError,
     "label_smoothing must lie in [0, 1], got 1.5"),
    ("ce-smoothing-nan", "label_smoothing=nan", lambda t: ce(label_smoothing=float("nan")), ValueError,
     "label_smoothing must lie in [0, 1], got nan"),
    ("ce-smoothing-type", "label_smoothing='0.1'", lambda t: ce(label_smoothing="0.1"), TypeError,
     "label_smoothing must be a float, got str"),
    ("ce-ignore-type", "ignore_index=-100.0", lambda t: ce(ignore_index=-100.0), TypeError,
     "ignore_index must be an int, got float"),
    ("ce-reduction", "reduction='avg'", lambda t: ce(reduction="avg"), ValueError,
     "reduction must be one of ['mean', 'none', 'sum'], got 'avg'"),
    ("ce-label-range", "a target label 7 with 6 classes (CPU)", lambda t: ce(ty=_labels(0, 7, 1)), IndexError,
     "target_labels contains the label 7 (at flat position 1), outside [0, 6) and not ignore_index (-100)"),
    ("ce-label-negative", "a source label -1 (ignore_index is -100)", lambda t: ce(sy=_labels(0, 1, -1, 2)),
     IndexError, "source_labels contains the label -1 (at flat position 2), outside [0, 5) and not ignore_index (-100)"),
    # ---- alpha (both losses, and AlphaWeightedLoss)
    ("alpha-range", "alpha=1.5", lambda t: ce(alpha=1.5), ValueError, "alpha must lie in [0, 1], got 1.5"),
    ("alpha-negative", "alpha=-0.1", lambda t: mse(alpha=-0.1), ValueError, "alpha must lie in [0, 1], got -0.1"),
    ("alpha-nan", "alpha=nan", lambda t: ce(alpha=float("nan")), ValueError, "alpha must lie in [0, 1], got nan"),
    ("alpha-type", "alpha='0.5'", lambda t: ce(alpha="0.5"), TypeError,
     "alpha must be a float or a 0-dim tensor, got str"),
    ("alpha-bool", "alpha=True", lambda t: mse(alpha=True), TypeError,
     "alpha must be a float or a 0-dim tensor, got bool"),
    ("alpha-shape", "alpha=torch.tensor([0.5, 0.5])", lambda t: ce(alpha=torch.tensor([0.5, 0.5])), ValueError,
     "alpha must be a float or a 0-dim tensor, got a tensor of shape (2,)"),
    ("alpha-int-tensor", "alpha=torch.tensor(1)", lambda t: ce(alpha=torch.tensor(1)), TypeError,
     "alpha must be a floating tensor, got dtype torch.int64"),
    ("alpha-grad", "alpha tensor with requires_grad=True",
     lambda t: ce(alpha=torch.tensor(0.5, requires_grad=True)), ValueError,
     "alpha must not require grad: fastadapt does not differentiate with respect to alpha"),
    ("alpha-tensor-range", "alpha=torch.tensor(1.5)", lambda t: mse(alpha=torch.tensor(1.5)), ValueError,
     "alpha must lie in [0, 1], got 1.5"),
    # ---- alpha_weighted_mse
    ("mse-pred-type", "source_pred=None", lambda t: fastadapt.alpha_weighted_mse(None, L(4), L(2), L(2)), TypeError,
     "source_pred must be a torch.Tensor, got NoneType"),
    ("mse-pred-int", "int64 predictions", lambda t: mse(sp=Y(4), st=Y(4)), TypeError,
     "source_pred must be a floating tensor (float32, float64, bfloat16 on cpu), got dtype torch.int64"),
    ("mse-target-dtype", "float32 pred, float64 target", lambda t: mse(st=L(4, dtype=f64)), TypeError,
     "source_target has dtype torch.float64 but source_pred has dtype torch.float32"),
    ("mse-broadcast", "pred (2, 3), target (3,)", lambda t: mse(tt=L(3)), ValueError,
     "target_target has shape (3,) but target_pred has shape (2, 3); shapes must match exactly "
     "(fastadapt does not broadcast)"),
    ("mse-dtype-sides", "float32 source, float64 target side", lambda t: mse(tp=L(2, 3, dtype=f64),
                                                                            tt=L(2, 3, dtype=f64)), TypeError,
     "target_pred has dtype torch.float64 but source_pred has dtype torch.float32; they must match"),
    ("mse-device", "target_target on another device (meta)",
     lambda t: mse(tp=L(2, 3, device="meta"), tt=L(2, 3, device="meta")), ValueError,
     "target_pred is on meta but source_pred is on cpu; all inputs must share one device"),
    ("mse-reduction", "reduction=None", lambda t: mse(reduction=None), ValueError,
     "reduction must be one of ['mean', 'none', 'sum'], got None"),
    # ---- alpha_weighted_distillation (logits and labels are checked as a cross-entropy side's)
    ("kd-teacher-type", "teacher_logits=[[0.0]] (a list)", lambda t: kd(t=[[0.0]]), TypeError,
     "teacher_logits must be a torch.Tensor, got list"),
    ("kd-teacher-grad", "teacher_logits that requires grad", lambda t: kd(t=L(4, 3).requires_grad_()), ValueError,
     "teacher_logits requires grad, but the teacher is frozen and gets no gradient: compute it under "
     "torch.no_grad() or pass teacher_logits.detach()"),
    ("kd-teacher-dtype", "float64 teacher for float32 logits", lambda t: kd(t=L(4, 3, dtype=f64)), TypeError,
     "teacher_logits has dtype torch.float64 but logits has dtype torch.float32; they must match"),
    ("kd-teacher-device", "teacher_logits on another device (meta)", lambda t: kd(t=L(4, 3, device="meta")),
     ValueError, "teacher_logits is on meta but logits is on cpu; all inputs must share one device"),
    ("kd-teacher-shape", "teacher_logits (3, 3) for logits (4, 5)", lambda t: kd(t=L(3, 3)), ValueError,
     "teacher_logits has shape (3, 3) but logits has shape (4, 5); they must match in every dimension but the "
     "class dimension (dim 1)"),
    ("kd-teacher-classes", "teacher_logits with 6 classes for a 5-class student", lambda t: kd(t=L(4, 6)), ValueError,
     "teacher_logits has 6 classes (shape (4, 6)) but logits has 5 (shape (4, 5)); the teacher covers the first K "
     "classes of the student's head, 1 <= K <= 5"),
    ("kd-labels-shape", "labels (3,) for logits (4, 5)", lambda t: kd(y=Y(3)), ValueError,
     "labels has shape (3,) but logits has shape (4, 5)"),
    ("kd-temperature-zero", "temperature=0", lambda t: kd(temperature=0), ValueError,
     "temperature must be a finite float > 0, got 0"),
    ("kd-temperature-nan", "temperature=nan", lambda t: kd(temperature=float("nan")), ValueError,
     "temperature must be a finite float > 0, got nan"),
    ("kd-temperature-inf", "temperature=inf", lambda t: kd(temperature=float("inf")), ValueError,
     "temperature must be a finite float > 0, got inf"),
    ("kd-temperature-type", "temperature=None", lambda t: kd(temperature=None), TypeError,
     "temperature must be a float, got NoneType"),
    ("kd-probability-labels", "labels of probability targets (4, 5)", lambda t: kd(y=L(4, 5).softmax(-1)), TypeError,
     "labels must hold class indices (an integer dtype), got dtype torch.float32: alpha_weighted_distillation "
     "takes no probability targets"),
    ("kd-label-range", "a label 7 with 5 classes (CPU)", lambda t: kd(y=_labels(0, 7, 1, 2)), IndexError,
     "labels contains the label 7 (at flat position 1), outside [0, 5) and not ignore_index (-100)"),
    # ---- alpha_weighted_linear_cross_entropy (hidden (..., 8), weight (5, 8))
    ("lce-hidden-size", "source_hidden (4, 7) for weight (5, 8)", lambda t: lce(sh=L(4, 7)), ValueError,
     "source_hidden has shape (4, 7) but weight has shape (5, 8); source_hidden must be (..., 8), its last "
     "dimension the weight's hidden size D"),
    ("lce-hidden-int", "source_hidden of dtype int64", lambda t: lce(sh=L(4, 8, dtype=torch.long)), TypeError,
     "source_hidden must be a floating tensor (float32, float64, bfloat16 on cpu), got dtype torch.int64"),
    ("lce-labels-float", "float target_labels", lambda t: lce(ty=L(3)), TypeError,
     "target_labels must hold class indices (an integer dtype), got dtype torch.float32"),
    ("lce-labels-shape", "source_labels (5,) for source_hidden (4, 8)", lambda t: lce(sy=Y(5)), ValueError,
     "source_labels has shape (5,) but source_hidden has shape (4, 8); source_labels must have shape (4,), one "
     "label per row"),
    ("lce-weight-dtype", "float64 weight for float32 hidden", lambda t: lce(w=L(5, 8, dtype=f64)), TypeError,
     "weight has dtype torch.float64 but source_hidden has dtype torch.float32; they must match"),
    ("lce-weight-device", "weight on another device (meta)", lambda t: lce(w=L(5, 8, device="meta")), ValueError,
     "weight is on meta but source_hidden is on cpu; all inputs must share one device"),
    ("lce-weight-1d", "weight of shape (40,)", lambda t: lce(w=L(40)), ValueError,
     "weight must be 2-D (vocab, hidden) = (V, D), got shape (40,)"),
    ("lce-bias-shape", "bias (4,) for 5 classes", lambda t: lce(b=L(4)), ValueError,
     "bias must have shape (5,) = (V,), got shape (4,)"),
    ("lce-label-range", "a label 5 with V = 5 (CPU)", lambda t: lce(sy=_labels(0, 5, 1, 2)), IndexError,
     "source_labels contains the label 5 (at flat position 1), outside [0, 5) and not ignore_index (-100)"),
    ("lce-z-loss", "z_loss=-0.1", lambda t: lce(z_loss=-0.1), ValueError, "z_loss must be a finite float >= 0, got -0.1"),
    ("lce-softcap", "softcap=0.0", lambda t: lce(softcap=0.0), ValueError,
     "softcap must be None or a finite float > 0, got 0.0"),
    ("lce-chunk", "chunk_size=0", lambda t: lce(chunk_size=0), ValueError, "chunk_size must be >= 1 rows, got 0"),
    # ---- AlphaWeightedLoss
    ("module-kind", "AlphaWeightedLoss(kind='l1')", lambda t: fastadapt.AlphaWeightedLoss(kind="l1"), ValueError,
     "kind must be one of ['cross_entropy', 'mse'], got 'l1'"),
    ("module-option", "AlphaWeightedLoss(kind='mse', label_smoothing=0.1)",
     lambda t: fastadapt.AlphaWeightedLoss(kind="mse", label_smoothing=0.1), TypeError,
     "unexpected option(s) for kind='mse': ['label_smoothing']; allowed: ['reduction']"),
    ("module-alpha", "AlphaWeightedLoss(alpha=2.0)", lambda t: fastadapt.AlphaWeightedLoss(alpha=2.0), ValueError,
     "alpha must lie in [0, 1], got 2.0"),
    ("module-jit-script", "torch.jit.script(AlphaWeightedLoss())", lambda t: _script(fastadapt.AlphaWeightedLoss()),
     TypeError, "AlphaWeightedLoss does not support torch.jit.script (deprecated by PyTorch); run it eagerly, under "
     "torch.compile or torch.export"),
    # ---- linear_relu
    ("linear-relu-shape", "x (2, 3), weight (4, 5)",
     lambda t: fastadapt.linear_relu(L(2, 3), L(4, 5), L(4)), ValueError,
     "x.shape[-1] is 3 but weight has in_features=5 (weight shape (4, 5))"),
    ("linear-relu-weight-dim", "weight (4, 3, 1)",
     lambda t: fastadapt.linear_relu(L(2, 3), L(4, 3, 1)), ValueError,
     "weight must be 2-D (out_features, in_features), got shape (4, 3, 1)"),
    ("linear-relu-bias", "weight (4, 3), bias (5,)",
     lambda t: fastadapt.linear_relu(L(2, 3), L(4, 3), L(5)), ValueError,
     "bias must have shape (4,) = (out_features,), got shape (5,)"),
    ("linear-relu-dtype", "x float32, weight float64",
     lambda t: fastadapt.linear_relu(L(2, 3), L(4, 3).double()), TypeError,
     "weight has dtype torch.float64 but x has dtype torch.float32; they must match"),
    ("linear-relu-device", "weight on meta",
     lambda t: fastadapt.linear_relu(L(2, 3), L(4, 3, device="meta")), ValueError,
     "weight is on meta but x is on cpu; all inputs must share one device"),
    ("fused-layer-in-features", "FusedLinearReLU(3, 4) on x (2, 5)",
     lambda t: fastadapt.FusedLinearReLU(3, 4)(L(2, 5)), ValueError,
     "x.shape[-1] is 5 but weight has in_features=3 (weight shape (4, 3))"),
    # ---- trainers
    ("trainer-model", "TransferTrainer('mlp')", lambda t: fastadapt.TransferTrainer("mlp"), TypeError,
     "model must be an nn.Module, got str"),
    ("trainer-lr", "TransferTrainer(model, lr=0)", lambda t: _trainer(lr=0), ValueError,
     "lr must be a positive finite number, got 0"),
    ("trainer-optimizer", "optimizer='lbfgs'", lambda t: _trainer(optimizer="lbfgs"), ValueError,
     "optimizer must be one of"),
    ("trainer-scheduler", "scheduler='step'", lambda t: _trainer(scheduler="step"), ValueError,
     "scheduler must be None, 'constant' or 'cosine', got 'step'"),
    ("trainer-device", "device='tpu:0'", lambda t: _trainer(device="tpu:0"), ValueError,
     "device must be a torch device such as 'cpu' or 'cuda:0', got 'tpu:0'"),
    ("trainer-callbacks", "callbacks=[print]", lambda t: _trainer(callbacks=[print]), TypeError,
     "callbacks must be fastadapt Callback instances, got builtin_function_or_method"),
    ("fit-empty", "fit on 0 samples", lambda t: _fit(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), ValueError,
     "is empty (0 samples)"),
    ("fit-label-range", "a label 5 for a 3-class head", lambda t: _fit(torch.zeros(2, 4), torch.tensor([0, 5])),
     ValueError, "has label 5, outside the model head's range [0, 2]"),
    ("fit-features", "10 features for a 4-input model", lambda t: _fit(torch.zeros(2, 10), torch.tensor([0, 1])),
     ValueError, "has 10 features per sample"),
    ("fit-float-labels", "float labels", lambda t: _fit(torch.zeros(2, 4), torch.zeros(2)), TypeError,
     "y must hold integer class labels, got dtype torch.float32"),
    ("adaptive-alpha", "AdaptiveTrainer(model, alpha=1.5)",
     lambda t: fastadapt.AdaptiveTrainer(fastadapt.MLP(4, (8,), 3), alpha=1.5), ValueError,
     "alpha must lie in [0, 1], got 1.5"),
    ("adaptive-strategy", "AdaptiveTrainer(model, strategy='ewc')",
     lambda t: fastadapt.AdaptiveTrainer(fastadapt.MLP(4, (8,), 3), strategy="ewc"), ValueError,
     "strategy must be one of ['replay', 'lwf', 'replay+lwf'], got 'ewc'"),
    ("adaptive-temperature", "AdaptiveTrainer(model, strategy='lwf', temperature=0)",
     lambda t: fastadapt.AdaptiveTrainer(fastadapt.MLP(4, (8,), 3), strategy="lwf", temperature=0), ValueError,
     "temperature must be a positive finite number, got 0"),
    ("adaptive-lwf-memory", "AdaptiveTrainer(model, strategy='lwf', memory_size=100)",
     lambda t: fastadapt.AdaptiveTrainer(fastadapt.MLP(4, (8,), 3), strategy="lwf", memory_size=100), ValueError,
     "memory_size=100 but strategy='lwf' stores no source samples; use strategy='replay+lwf' to replay a memory "
     "as well"),
    ("trainer-config-and-options", "TransferTrainer(model, TrainConfig(), lr=0.1)",
     lambda t: fastadapt.TransferTrainer(fastadapt.MLP(4, (8,), 3), fastadapt.TrainConfig(), lr=0.1), TypeError,
     "pass either config or keyword options, not both (got ['lr'])"),
    ("trainer-config-type", "AdaptiveTrainer(model, TrainConfig())",
     lambda t: fastadapt.AdaptiveTrainer(fastadapt.MLP(4, (8,), 3), fastadapt.TrainConfig()), TypeError,
     "config must be a AdaptiveConfig, got TrainConfig"),
    ("adaptive-memory", "AdaptiveTrainer(model, memory_size=0)",
     lambda t: fastadapt.AdaptiveTrainer(fastadapt.MLP(4, (8,), 3), memory_size=0), ValueError,
     "memory_size must be None or a positive int, got 0"),
    ("trainer-parallel", "TransferTrainer(model, parallel='zero3')", lambda t: _trainer(parallel="zero3"),
     ValueError, "parallel must be one of ['ddp', 'fsdp'], got 'zero3'"),
    ("trainer-fsdp-blocks", "TransferTrainer(model, fsdp_blocks=['layers'])",
     lambda t: _trainer(fsdp_blocks=["layers"]), TypeError, "fsdp_blocks must be None or callable(model) -> modules"),
    ("trainer-fsdp", "TransferTrainer(model, parallel='fsdp')", lambda t: _trainer(parallel="fsdp"), ValueError,
     "parallel='fsdp' is not supported by TransferTrainer"),
    # ---- language models (fastadapt.training.lm)
    ("lm-no-head", "output_head(nn.ReLU())",
     lambda t: fastadapt.training.output_head(torch.nn.ReLU()), ValueError, "model (ReLU) declares no output head"),
    ("lm-memory-both", "LMAdaptiveTrainer(model, memory_size=2, memory_tokens=50)",
     lambda t: _lm(memory_size=2, memory_tokens=50), ValueError,
     "give memory_size (2, sequences) or memory_tokens (50), not both"),
    ("lm-memory-tokens", "memory_tokens=3 with sequences of 7 predicted tokens",
     lambda t: _lm(memory_tokens=3).fit(_tokens(), _tokens(), epochs=1), ValueError,
     "memory_tokens=3 holds no source sequence"),
    ("lm-no-source", "LMAdaptiveTrainer(model, alpha=0.5).fit(target) without source",
     lambda t: _lm(alpha=0.5).fit(_tokens(), epochs=1), ValueError,
     "alpha=0.5 weighs replayed source sequences: pass source_data (or alpha=1 for naive fine-tuning)"),
    ("lm-strategy", "LMAdaptiveTrainer(model, strategy='lwf').fit(...)",
     lambda t: _lm(strategy="lwf").fit(_tokens(), epochs=1), ValueError,
     "LMAdaptiveTrainer supports strategy='replay' only, got 'lwf'"),
    ("lm-data-dtype", "float token ids", lambda t: _lm(alpha=1.0).fit((_tokens()[0].float(), _tokens()[1]), epochs=1),
     ValueError, "target_data: ids and labels must be int64 tensors of one (N, T) shape"),
    ("lm-lengths", "source sequences of 6 tokens, target of 8",
     lambda t: _lm().fit(_tokens(), _tokens(t=6), epochs=1), ValueError,
     "source sequences have 6 tokens, target 8: pack both to one length"),
    ("lm-too-long", "16-token sequences for TinyCausalLM(max_len=8)",
     lambda t: _lm(alpha=1.0).fit(_tokens(t=16), epochs=1), ValueError, "sequences of 16 tokens exceed max_len=8"),
    # ---- Hugging Face integration (fastadapt.hf)
    ("hf-no-source", "HFAdaptiveTrainer(model, args, alpha=0.5) without source_dataset",
     lambda t: _hf_trainer(t, train_dataset=[{"input_ids": [1, 2], "labels": [1, 2]}]), ValueError,
     "alpha=0.5 weighs replayed source sequences: pass source_dataset"),
    ("hf-logit-scale", "apply_fused_linear_cross_entropy on a model with config.logits_scaling",
     lambda t: __import__("fastadapt.hf").hf.apply_fused_linear_cross_entropy(_hf_llama(logits_scaling=2.0)),
     ValueError, "has config.logits_scaling=2.0"),
    ("checkpoint-every", "ModelCheckpoint(dir, every_n_epochs=0)",
     lambda t: fastadapt.ModelCheckpoint(t, every_n_epochs=0), ValueError,
     "every_n_epochs must be a positive int, got 0"),
    ("early-stopping-patience", "EarlyStopping(patience=-1)", lambda t: fastadapt.EarlyStopping(patience=-1),
     ValueError, "patience must be a non-negative int, got -1"),
    ("mlp-sizes", "MLP(0, (8,), 3)", lambda t: fastadapt.MLP(0, (8,), 3), ValueError, "must be a positive int, got 0"),
    ("freeze-name", "freeze(model, ['nope'])", lambda t: fastadapt.freeze(fastadapt.MLP(4, (8,), 3), ["nope"]),
     ValueError, "no submodule named 'nope'"),
    # ---- checkpoints and weights files
    ("load-checkpoint-missing", "load_checkpoint('{tmp}') of an empty folder",
     lambda t: _trainer().load_checkpoint(t), FileNotFoundError, "no checkpoint in '{tmp}' (missing trainer_state.pt)"),
    ("weights-extension", "load_pretrained('{tmp}/m.bin')",
     lambda t: fastadapt.load_pretrained(os.path.join(t, "m.bin")), ValueError,
     "weights path must end in .safetensors, .pt or .pth, got '{tmp}/m.bin'"),
    ("weights-missing", "load_pretrained('{tmp}/none.safetensors')",
     lambda t: fastadapt.load_pretrained(os.path.join(t, "none.safetensors")), FileNotFoundError,
     "weights file not found: '{tmp}/none.safetensors'"),
    ("weights-corrupt", "a .safetensors file holding garbage",
     lambda t: fastadapt.load_pretrained(_write(os.path.join(t, "bad.safetensors"), b"\x00garbage")), ValueError,
     "cannot read '{tmp}/bad.safetensors' as safetensors"),
    ("weights-pickle", "a .pt file whose pickle calls os.system",
     lambda t: fastadapt.load_pretrained(_evil_pt(t)), ValueError,
     "cannot load '{tmp}/evil.pt' with weights_only=True"),
    ("weights-not-state-dict", "a .pt file holding a list",
     lambda t: fastadapt.load_pretrained(_saved(t, "list.pt", [1, 2])), ValueError,
     "'{tmp}/list.pt' does not hold a state dict of tensors"),
    ("weights-mismatch", "weights of MLP(4, (8,), 3) into MLP(4, (9,), 3)",
     lambda t: fastadapt.load_pretrained(_saved(t, "w.pt", fastadapt.MLP(4, (8,), 3).state_dict()),
                                         fastadapt.MLP(4, (9,), 3)), ValueError, "do not fit MLP"),
]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_pt(tmp):
    path = os.path.join(tmp, "evil.pt")
    torch.save({"weight": _Evil(os.path.join(tmp, "pwned"))}, path)
    return path


def _saved(tmp, name, obj):
    path = os.path.join(tmp, name)
    torch.save(obj, path)
    return path


def _npz(tmp, name, **arrays):
    path = os.path.join(tmp, name)
    np.savez(path, **arrays)
    return path


def _csv(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


# (id, argv, files to create (name -> callable(tmp) -> path), message on stderr); exit status 2.
CLI_CASES = [
    ("cli-no-command", [], "the following arguments are required: command"),
    ("cli-unknown-command", ["train"], "invalid choice: 'train'"),
    ("cli-required", ["transfer"], "the following arguments are required: --source, --target"),
    ("cli-epochs", ["transfer", "--source", "a.npz", "--target", "b.npz", "--epochs", "0"],
     "argument --epochs: expected a positive integer, got '0'"),
    ("cli-lr", ["transfer", "--source", "a.npz", "--target", "b.npz", "--lr", "-1"],
     "argument --lr: expected a positive number, got '-1'"),
    ("cli-batch-size", ["adapt", "--source", "a.npz", "--target", "b.npz", "--batch-size", "x"],
     "argument --batch-size: expected a positive integer, got 'x'"),
    ("cli-hidden", ["transfer", "--source", "a.npz", "--target", "b.npz", "--hidden", "128,0"],
     "argument --hidden: expected comma-separated positive integers, got '128,0'"),
    ("cli-methods", ["transfer", "--source", "a.npz", "--target", "b.npz", "--methods", "frozen,lora"],
     "argument --methods: methods must be from frozen,finetune,scratch; got 'frozen,lora'"),
    ("cli-alpha", ["adapt", "--source", "a.npz", "--target", "b.npz", "--alpha", "1,1.5"],
     "argument --alpha: alpha must lie in [0, 1], got '1.5'"),
    ("cli-alpha-text", ["adapt", "--source", "a.npz", "--target", "b.npz", "--alpha", "half"],
     "argument --alpha: alpha must be a number in [0, 1], got 'half'"),
    ("cli-memory-size", ["adapt", "--source", "a.npz", "--target", "b.npz", "--memory-size", "-1"],
     "argument --memory-size: expected an integer >= 0, got '-1'"),
    ("cli-threads", ["demo", "--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
    ("cli-seeds", ["demo", "--seeds", "1,x"], "argument --seeds: expected comma-separated integer seeds, got '1,x'"),
    ("cli-missing-file", ["transfer", "--source", "{tmp}/none.npz", "--target", "{tmp}/none.npz", "-q"],
     "fastadapt transfer: error: --source: file not found: '{tmp}/none.npz'"),
    ("cli-bad-npz", ["transfer", "--source", "{tmp}/bad.npz", "--target", "{tmp}/bad.npz", "-q"],
     "fastadapt transfer: error: --source: cannot read '{tmp}/bad.npz' as .npz"),
    ("cli-npz-arrays", ["transfer", "--source", "{tmp}/xz.npz", "--target", "{tmp}/xz.npz", "-q"],
     "fastadapt transfer: error: --source: '{tmp}/xz.npz' has arrays ['X', 'z'] but needs 'X' and 'y'"),
    ("cli-csv-label", ["adapt", "--source", "{tmp}/a.csv", "--target", "{tmp}/a.csv", "-q"],
     "fastadapt adapt: error: --source: '{tmp}/a.csv' has no label column 'label' (columns: ['a', 'b'])"),
    ("cli-csv-fields", ["adapt", "--source", "{tmp}/short.csv", "--target", "{tmp}/short.csv", "-q"],
     "fastadapt adapt: error: --source: '{tmp}/short.csv' line 3 has 1 fields, the header has 2"),
    ("cli-csv-text", ["adapt", "--source", "{tmp}/text.csv", "--target", "{tmp}/text.csv", "-q"],
     "fastadapt adapt: error: --source: '{tmp}/text.csv' line 2, column 'a': 'x' is not a number"),
    ("cli-csv-label-value", ["adapt", "--source", "{tmp}/half.csv", "--target", "{tmp}/half.csv", "-q"],
     "fastadapt adapt: error: --source: '{tmp}/half.csv' line 3, label column 'label': '1.5' is not a class label "
     "(numeric labels must be integers)"),
    ("cli-dataset", ["transfer", "--source", "mnist", "--target", "digits:5-9", "-q"],
     "fastadapt transfer: error: --source: unknown dataset 'mnist'"),
    ("cli-class-range", ["transfer", "--source", "digits:4-0", "--target", "digits:5-9", "-q"],
     "fastadapt transfer: error: --source: bad class range '4-0' in 'digits:4-0' (end before start)"),
    ("cli-features", ["transfer", "--source", "{tmp}/f3.npz", "--target", "{tmp}/f4.npz", "-q", "-o", "{tmp}/out"],
     "fastadapt transfer: error: --source '{tmp}/f3.npz' has 3 features but --target '{tmp}/f4.npz' has 4"),
    ("cli-nan", ["transfer", "--source", "{tmp}/nan.npz", "--target", "{tmp}/nan.npz", "-q"],
     "fastadapt transfer: error: --source: X in '{tmp}/nan.npz' contains NaN or infinite values"),
    ("cli-too-few", ["transfer", "--source", "{tmp}/f3.npz", "--target", "{tmp}/one.npz", "-q", "-o", "{tmp}/out"],
     "fastadapt transfer: error: --target needs at least 2 samples of every class"),
    ("cli-device", ["transfer", "--source", "{tmp}/f3.npz", "--target", "{tmp}/f3.npz", "-q", "-o", "{tmp}/out",
                    "--device", "tpu"],
     "fastadapt transfer: error: device must be a torch device such as 'cpu' or 'cuda:0', got 'tpu'"),
    ("cli-output-file", ["adapt", "--source", "{tmp}/f3.npz", "--target", "{tmp}/f3.npz", "-q", "-o", "{tmp}/f3.npz"],
     "fastadapt adapt: error: --output '{tmp}/f3.npz' is a file, not a folder"),
    ("cli-resume-nothing", ["adapt", "--source", "{tmp}/f3.npz", "--target", "{tmp}/f3.npz", "-q", "-o", "{tmp}/out",
                            "--resume"],
     "fastadapt adapt: error: --resume: --output '{tmp}/out' holds no run to resume (no run.json)"),
    ("cli-predict-model", ["predict", "--model", "{tmp}/none.safetensors", "--data", "{tmp}/f3.npz"],
     "fastadapt predict: error: --model: weights file not found: '{tmp}/none.safetensors'"),
    ("cli-predict-output", ["predict", "--model", "{tmp}/none.safetensors", "--data", "{tmp}/f3.npz", "-o", "{tmp}"],
     "fastadapt predict: error: --output '{tmp}' is a folder; name the file to write"),
    ("adapt-lm-missing", ["adapt-lm", "--source", "{tmp}/none.txt", "--target", "{tmp}/prose.txt"],
     "--source '{tmp}/none.txt' does not exist"),
    ("adapt-lm-empty", ["adapt-lm", "--source", "{tmp}/empty.txt", "--target", "{tmp}/prose.txt"],
     "--source '{tmp}/empty.txt' is empty"),
    ("adapt-lm-binary", ["adapt-lm", "--source", "{tmp}/prose.txt", "--target", "{tmp}/nul.txt"],
     "--target '{tmp}/nul.txt' is not a text file: it holds a NUL byte (at byte 4)"),
    ("adapt-lm-encoding", ["adapt-lm", "--source", "{tmp}/latin1.txt", "--target", "{tmp}/prose.txt"],
     "--source '{tmp}/latin1.txt' is not UTF-8 text: byte 0xe9 at byte 3"),
    ("adapt-lm-no-files", ["adapt-lm", "--source", "{tmp}/nothing", "--target", "{tmp}/prose.txt"],
     "--source '{tmp}/nothing': no file matching *.txt,*.md,*.rst,*.py in it"),
    ("adapt-lm-too-little", ["adapt-lm", "--source", "{tmp}/prose.txt", "--target", "{tmp}/prose.txt"],
     "--source '{tmp}/prose.txt': too little text"),
]


def _cli_files(tmp):
    g = np.random.default_rng(0)
    _write(os.path.join(tmp, "bad.npz"), b"not a zip")
    _npz(tmp, "xz.npz", X=np.zeros((4, 2)), z=np.zeros(4))
    _csv(tmp, "a.csv", "a,b\n1,2\n")
    _csv(tmp, "short.csv", "a,label\n1,0\n2\n")
    _csv(tmp, "text.csv", "a,label\nx,0\n")
    _csv(tmp, "half.csv", "a,label\n1,0\n2,1.5\n")
    _npz(tmp, "f3.npz", X=g.normal(size=(20, 3)), y=np.arange(20) % 2)
    _npz(tmp, "f4.npz", X=g.normal(size=(20, 4)), y=np.arange(20) % 2)
    _npz(tmp, "one.npz", X=g.normal(size=(5, 3)), y=np.array([0, 0, 0, 0, 1]))
    X = g.normal(size=(8, 3))
    X[2, 1] = np.nan
    _npz(tmp, "nan.npz", X=X, y=np.arange(8) % 2)
    _write(os.path.join(tmp, "empty.txt"), b"")
    _write(os.path.join(tmp, "nul.txt"), b"text\0more")
    _write(os.path.join(tmp, "latin1.txt"), "caf\xe9\n".encode("latin-1"))
    _write(os.path.join(tmp, "prose.txt"), b"Some prose.\n")
    os.makedirs(os.path.join(tmp, "nothing"), exist_ok=True)
    _write(os.path.join(tmp, "nothing", "data.bin"), b"\x01\x02")


@pytest.mark.parametrize("backend", ["compiled", "fallback"])
@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_error(case, backend, tmp_path):
    case_id, _, fn, exc, message = case
    tmp = str(tmp_path)
    with use_backend(backend):
        with pytest.raises(exc) as info:
            fn(tmp)
    assert message.format(tmp=tmp) in str(info.value)
    assert not os.path.exists(os.path.join(tmp, "pwned"))  # no pickle ever ran code


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_error(case, tmp_path, capsys):
    case_id, argv, message = case
    tmp = str(tmp_path)
    _cli_files(tmp)
    argv = [a.format(tmp=tmp) for a in argv]
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message.format(tmp=tmp) in err, err
    assert "Traceback" not in err


# ---- the docs table -------------------------------------------------------------------------------

HEADER = """# Errors

Every error path of the public API and of the CLI: the input, and the exception it raises. Generated
from `tests/test_error_table.py` (`python tests/test_error_table.py > docs/ERRORS.md`), which tests
every row (API rows through both the compiled kernels and the pure-PyTorch fallback) and fails when
this file is out of date. `{tmp}` stands for a folder. A message shown here is contained in the real
one, which may go on (a trailing value, or the underlying parser's reason).

Bad input never reaches a kernel: the arguments are checked first, in Python (`fastadapt/ops/_validate.py`,
the one place each rule and message lives), in front of both the compiled ops and the fallback. Direct
`torch.ops.fastadapt.*` calls skip these checks; the kernels then only guard memory safety, with terse
messages, and an alpha outside [0, 1] gives NaN terms. The CPU kernel reads the labels anyway and
raises `IndexError` for one out of range (the Python layer adds the argument's name, as below); on CUDA
an out-of-range label gives a NaN loss instead (no device-side assert, no host sync).
"""


def _cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def render():
    out = [HEADER, "## Python API\n", "| id | input | exception | message |", "|---|---|---|---|"]
    for case_id, what, _, exc, message in API_CASES:
        msg = f"`{_cell(message)}`" if message else "(the matmul's own shape message)"
        out.append(f"| {case_id} | {_cell(what)} | {exc.__name__} | {msg} |")
    out += ["", "## CLI (`python -m fastadapt ...`; exit status 2, one line on stderr, no traceback)\n",
            "| id | arguments | stderr contains |", "|---|---|---|"]
    for case_id, argv, message in CLI_CASES:
        out.append(f"| {case_id} | `{_cell(' '.join(argv)) or '(none)'}` | `{_cell(message)}` |")
    return "\n".join(out) + "\n"


def test_docs_table_is_current():
    with open(DOC) as f:
        assert f.read() == render(), "docs/ERRORS.md is out of date: python tests/test_error_table.py > docs/ERRORS.md"


if __name__ == "__main__":
    sys.stdout.write(render())
