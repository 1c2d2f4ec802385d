"""``apply_fused_linear_cross_entropy(model)``: a Hugging Face causal LM whose forward, given ``labels``,
computes its loss with the fused linear cross-entropy (logits never materialised) and returns
``logits=None``; without labels it is the original forward, untouched.

One wrapper serves every architecture (where Liger-Kernel rewrites each model's forward): the model's
own forward runs, minus the labels, while :class:`~fastadapt.hf.head.FusedHead` takes the hidden states
that enter the head and keeps the head from computing logits; the loss then follows Hugging Face's
``ForCausalLMLoss`` (shift, ``ignore_index``, ``num_items_in_batch``, ``shift_labels``). Models that
change their logits in ways the op cannot reproduce are refused (see ``head.py``).
"""
from __future__ import annotations

import functools
import inspect

from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

from fastadapt.hf.head import FusedHead
from fastadapt.ops._validate import check_chunk_size
from fastadapt.training.lm import IGNORE_INDEX, shift_labels

_PATCH = "_fastadapt_fused_linear_cross_entropy"


def apply_fused_linear_cross_entropy(model: nn.Module, *, chunk_size: int | None = None) -> nn.Module:
    """Patches this model instance's forward (other instances and the class are untouched) and returns
    the model. With ``labels`` (or ``shift_labels``) the forward returns the model's usual output type
    with ``loss`` from the fused op and ``logits=None``; the loss is Hugging Face's: the mean
    cross-entropy of the next-token predictions, or their sum divided by ``num_items_in_batch`` when
    given (as the Trainer passes it under gradient accumulation). With ``logits_to_keep`` the labels
    must cover the kept positions. ``final_logit_softcapping`` (Gemma 2) becomes the op's ``softcap``;
    a model whose logits the op cannot reproduce raises ``ValueError`` here, or ``RuntimeError`` at its
    first forward. Idempotent; :func:`revert_fused_linear_cross_entropy` undoes it."""
    if is_patched(model):
        return model
    head = FusedHead(model)
    loss_function = getattr(model, "loss_function", ForCausalLMLoss)
    if loss_function is not ForCausalLMLoss:
        raise ValueError(f"{type(model).__name__}.loss_function is {getattr(loss_function, '__name__', loss_function)}"
                         f", not ForCausalLMLoss: the fused forward computes the causal-LM cross-entropy only")
    check_chunk_size(chunk_size)
    sig = inspect.signature(model.forward)
    names = [p.name for p in sig.parameters.values()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    # everything lives on the model, the forward included (a partial of a module-level function, not a
    # closure): copy.deepcopy and pickle then carry the patch to the copy, bound to the copy
    model.__dict__[_PATCH] = _Patch(head, names, chunk_size, model.__dict__.get("forward"))
    forward = functools.partial(_fused_forward, model)
    forward.__signature__ = sig  # the original's: the Trainer reads the forward's arguments and loss kwargs
    model.forward = forward
    return model


def revert_fused_linear_cross_entropy(model: nn.Module) -> nn.Module:
    """Restores the forward that :func:`apply_fused_linear_cross_entropy` replaced (a model that is not
    patched is returned as it is)."""
    if not is_patched(model):
        return model
    own = model.__dict__.pop(_PATCH).own_forward
    if own is not None:
        model.forward = own
    else:
        del model.forward
    return model


class _Patch:
    def __init__(self, head, names, chunk_size, own_forward):
        self.head, self.names, self.chunk_size = head, names, chunk_size
        self.own_forward = own_forward  # a forward the instance had of its own, else None (the class's)


def is_patched(model: nn.Module) -> bool:
    return _PATCH in model.__dict__


def _fused_forward(model, *args, **kwargs):
    patch: _Patch = model.__dict__[_PATCH]
    original = patch.own_forward or functools.partial(type(model).forward, model)
    names = patch.names
    positional = dict(zip(names, args))
    labels = kwargs.get("labels", positional.get("labels"))
    shifted = kwargs.get("shift_labels")
    if labels is None and shifted is None:
        return original(*args, **kwargs)
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    twice = sorted(set(positional) & set(kwargs))
    if twice:
        raise TypeError(f"{type(model).__name__}.forward got multiple values for {twice}")
    kwargs = {**positional, **kwargs}
    for key in ("labels", "shift_labels"):
        kwargs.pop(key, None)
    num_items = kwargs.pop("num_items_in_batch", None)
    ignore_index = kwargs.pop("ignore_index", IGNORE_INDEX)
    return_dict = kwargs.pop("return_dict", None)
    head = patch.head
    with head.capture() as calls:
        out = original(**kwargs, return_dict=True)
    hidden = head.hidden_of(calls, out)
    if shifted is None:  # as ForCausalLMLoss: shift_labels, when given, are used as they are
        shifted = shift_labels(labels, ignore_index)
    if num_items is None:
        loss = head.loss(hidden, shifted, ignore_index=ignore_index, chunk_size=patch.chunk_size)
    else:
        loss = head.loss(hidden, shifted, reduction="sum", ignore_index=ignore_index, chunk_size=patch.chunk_size)
        loss = loss / (num_items.to(loss.device) if hasattr(num_items, "to") else num_items)
    out = type(out)(**{k: v for k, v in out.items() if k not in ("loss", "logits")}, loss=loss)
    if return_dict is None:
        return_dict = getattr(getattr(model, "config", None), "return_dict", True)
    return out if return_dict else out.to_tuple()
