"""The output head of a Hugging Face causal LM as the fused loss reads it: which module it is, what the
model does to its logits, and the hidden states that enter it during a forward pass.

The hidden states are taken from the model's own forward: a pre-hook on the output-embeddings module
records what it is called with and hands it an empty slice instead, so the model computes no logits and
everything before the head (masks, positions, caches, a DDP wrapper's hooks) is exactly the model's.
What the model does to its logits after the head is checked twice: known configuration fields are read
when the head is resolved (Gemma 2's ``final_logit_softcapping`` maps to the op's ``softcap``; a scale
the op cannot apply is refused), and the first forward lets the head compute one position per row, whose
logits as the model returns them must be the head's output (softcapped where declared): any other
post-processing raises instead of giving a silently wrong loss.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from fastadapt.ops import alpha_weighted_linear_cross_entropy
from fastadapt.training.lm import IGNORE_INDEX, output_head

# config fields that change the logits after the head in ways the fused op cannot reproduce, and what
# they do (the value that leaves the logits unchanged is allowed)
_REFUSED = {
    "logit_scale": ("multiplies the logits by config.logit_scale (Cohere)", (None, 1, 1.0)),
    "logits_scaling": ("divides the logits by config.logits_scaling (Granite)", (None, 1, 1.0)),
    "output_router_logits": ("adds its router auxiliary loss to the language-model loss (mixture of experts)",
                             (None, False)),
}


class Calls:
    """What the head was called with (``inputs``) and returned (``outputs``) within a capture."""

    def __init__(self):
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []


class FusedHead:
    """A causal LM's output head checked for the fused loss: ``module`` (the ``nn.Linear`` that
    ``get_output_embeddings()`` returns) and ``softcap`` (the model's ``final_logit_softcapping`` or
    None). Raises ``ValueError`` naming the model and the field for a model it cannot reproduce."""

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        self.module = output_head(model)  # owns the "declares no output head" message
        if type(self.module).forward is not nn.Linear.forward:
            raise ValueError(f"{name}'s output embeddings are a {type(self.module).__name__}, not an nn.Linear: "
                             f"the fused loss applies the head as F.linear(hidden, weight, bias) and cannot "
                             f"reproduce another module's forward")
        config = getattr(model, "config", None)
        for field, (what, neutral) in _REFUSED.items():
            value = getattr(config, field, None)
            if value not in neutral:
                raise ValueError(f"{name} has config.{field}={value!r}: its forward {what}, which the fused "
                                 f"linear cross-entropy cannot reproduce; train it without fastadapt.hf")
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.model_name = name
        self.verified = False  # the model's logits checked against the head's output (hidden_of)

    @contextlib.contextmanager
    def capture(self):
        """Within the block, each call of the head records its input and output in the yielded
        :class:`Calls` and computes an empty slice of its input instead, so no logits are made; until
        the head is verified (:meth:`hidden_of`), one position per row instead of none."""
        calls = Calls()

        def pre_hook(module, args):
            (hidden,) = args
            calls.inputs.append(hidden)
            keep = 0 if self.verified else min(1, hidden.shape[-2])
            return (hidden.narrow(-2, 0, keep),)

        def hook(module, args, out):
            calls.outputs.append(out)

        handles = (self.module.register_forward_pre_hook(pre_hook), self.module.register_forward_hook(hook))
        try:
            yield calls
        finally:
            for h in handles:
                h.remove()

    def hidden_of(self, calls: Calls, out) -> torch.Tensor:
        """The hidden states that one forward (returning ``out``) fed its head, recorded by
        :meth:`capture`. The first time, the model's returned logits (one position per row) are compared
        with the head's own output: equal, or equal to it softcapped when the model declares
        ``final_logit_softcapping``; anything else the model did to them raises."""
        if len(calls.inputs) != 1:
            raise RuntimeError(f"{self.model_name}'s forward called its output embeddings {len(calls.inputs)} "
                               f"times (expected once, on its last hidden state): the fused loss cannot tell "
                               f"which call makes the logits")
        if not self.verified:
            logits = out.get("logits") if hasattr(out, "get") else None
            if not _same_logits(logits, calls.outputs[0], self.softcap):
                raise RuntimeError(f"{self.model_name}'s forward changes its logits after its output embeddings "
                                   f"in a way the fused loss cannot reproduce; train it without fastadapt.hf")
            self.verified = True
        return calls.inputs[0]

    def loss(self, hidden, shifted_labels, *, reduction="mean", ignore_index=IGNORE_INDEX, chunk_size=None):
        """Cross-entropy of ``hidden`` (``(..., D)``) through the head against ``shifted_labels`` (the
        label each position predicts, as many positions as ``hidden``), logits never materialised: the
        mean over non-ignored positions, or their sum. Float32 for bfloat16 states, as Hugging Face's
        ``ForCausalLMLoss`` returns (it upcasts its logits before the cross-entropy)."""
        d = hidden.shape[-1]
        if shifted_labels.numel() != hidden.numel() // max(d, 1):
            raise ValueError(f"labels of shape {tuple(shifted_labels.shape)} do not match the "
                             f"{hidden.numel() // max(d, 1)} positions whose hidden states {self.model_name} "
                             f"feeds its head (shape {tuple(hidden.shape)}; with logits_to_keep the labels must "
                             f"cover the kept positions only)")
        h, y = hidden.reshape(-1, d), shifted_labels.reshape(-1).to(hidden.device)
        with _float32_result(h):
            # alpha=1: the source side (no rows here) is not evaluated
            return alpha_weighted_linear_cross_entropy(h[:0], y[:0], h, y, self.module.weight, self.module.bias, 1.0,
                                                       ignore_index=ignore_index, reduction=reduction,
                                                       softcap=self.softcap, chunk_size=chunk_size)


@torch.no_grad()
def _same_logits(logits, head_out, softcap) -> bool:
    """Whether the model returned ``head_out`` as its logits (upcast to float32 by a mixed-precision
    wrapper, which is exact), or softcapped by ``softcap`` (computed in the model's dtype, hence the
    tolerance of a few of its rounding errors)."""
    if not isinstance(logits, torch.Tensor) or logits.shape != head_out.shape:
        return False
    if softcap is None:
        return torch.allclose(logits.to(head_out.dtype), head_out, rtol=0, atol=0, equal_nan=True)
    expected = softcap * torch.tanh(head_out.double() / softcap)
    eps = torch.finfo(head_out.dtype).eps
    return torch.allclose(logits.double(), expected, rtol=4 * eps, atol=4 * eps * softcap, equal_nan=True)


def _float32_result(hidden):
    """The op returns its loss in the inputs' dtype, except under autocast, where it returns float32
    (autocast's policy for F.cross_entropy). For low-precision states outside autocast, autocast to their
    own dtype makes every cast a no-op and only changes the result's dtype: the loss and the scale of
    the gradients it sends back (1 / token count) stay float32 instead of being rounded to bfloat16."""
    dev = hidden.device.type
    if hidden.dtype in (torch.float32, torch.float64) or dev not in ("cpu", "cuda") or torch.is_autocast_enabled(dev):
        return contextlib.nullcontext()
    return torch.autocast(dev, dtype=hidden.dtype)
