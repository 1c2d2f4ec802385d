"""Causal language models on the fused linear cross-entropy (issue 14, groundwork): a small pre-norm
transformer that declares its output head, the shifted-label loss, and :class:`LMAdaptiveTrainer`, the
adaptive (replay) trainer for token sequences on the shared loop (one process, DDP or FSDP2).

The loss never materialises logits: the model returns the hidden states that enter its head and
``alpha_weighted_linear_cross_entropy`` applies the head chunk by chunk. Labels follow Hugging Face:
``labels`` are the input ids (-100 at padding), and position ``t`` predicts ``labels[t + 1]``; the shift
pads the labels with one -100 column instead of slicing the hidden states, so they are used as they are
(no copy; the last position of each sequence is an ignored row).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import TensorDataset

from fastadapt.ops import alpha_weighted_linear_cross_entropy
from fastadapt.training import distributed as dist
from fastadapt.training.adaptive import AdaptiveTrainer
from fastadapt.training.batches import PairedBatches, TensorBatches
from fastadapt.training.loop import MetricSums, ValSet
from fastadapt.training.surgery import _unwrap

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(N, T)`` labels -> the label each position predicts: ``labels[:, 1:]`` then one ``ignore_index``."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def output_head(model: nn.Module) -> nn.Module:
    """The layer that maps hidden states to the vocabulary: ``model.get_output_embeddings()`` (Hugging Face
    and :class:`TinyCausalLM`), else an ``lm_head`` or ``head`` attribute with a ``weight``."""
    model = _unwrap(model)
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name in ("lm_head", "head"):
        if head is None:
            head = getattr(model, name, None)
    if not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"model ({type(model).__name__}) declares no output head: give it "
                         f"get_output_embeddings() or an `lm_head` nn.Linear")
    return head


def causal_lm_loss(source_hidden, source_labels, target_hidden, target_labels, head: nn.Module, alpha=0.5,
                   **options):
    """``alpha * CE(target) + (1 - alpha) * CE(source)`` of next-token prediction through ``head``: hidden
    ``(N, T, D)`` per side, labels ``(N, T)`` unshifted (-100 at padding), each side's mean over its
    predicted tokens. ``options`` go to ``alpha_weighted_linear_cross_entropy`` (``reduction``, ...)."""
    return alpha_weighted_linear_cross_entropy(source_hidden, shift_labels(source_labels), target_hidden,
                                               shift_labels(target_labels), head.weight,
                                               getattr(head, "bias", None), alpha, ignore_index=IGNORE_INDEX,
                                               **options)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (``scaled_dot_product_attention``) and a GELU MLP."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model)
        self.out = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyCausalLM(nn.Module):
    """Token + learned position embeddings, ``n_layers`` pre-norm blocks, a final LayerNorm and the head
    ``lm_head`` (``nn.Linear(d_model, vocab_size)``, its weight tied to the token embedding with
    ``tie_weights``). ``forward(ids) -> hidden (N, T, d_model)``: the states that enter ``lm_head``;
    ``logits(ids)`` applies it (materialising the logits, for generation and tests)."""

    def __init__(self, vocab_size: int, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 max_len: int = 128, bias: bool = False, tie_weights: bool = False):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("d_model", d_model), ("n_layers", n_layers),
                        ("n_heads", n_heads), ("max_len", max_len)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a multiple of n_heads={n_heads}")
        self._config = {"vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads,
                        "max_len": max_len, "bias": bias, "tie_weights": tie_weights}
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=bias)
        self.apply(self._init)
        if tie_weights:
            self.lm_head.weight = self.embed.weight

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def config(self) -> dict:
        return dict(self._config)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(self, ids):
        t = ids.shape[1]
        if t > self.pos.num_embeddings:
            raise ValueError(f"sequences of {t} tokens exceed max_len={self.pos.num_embeddings}")
        x = self.embed(ids) + self.pos(torch.arange(t, device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def logits(self, ids):
        return self.lm_head(self(ids))


class HiddenStates(nn.Module):
    """A Hugging Face causal LM (``XForCausalLM``) as the trainer wants it: ``forward(ids)`` returns its base
    model's last hidden state (``model.base_model(input_ids=ids).last_hidden_state``; no logits are made)
    and ``get_output_embeddings()`` its head. The HF model is a child, so its parameters (head included)
    train and a DDP wrapper around this module syncs them all."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if not callable(getattr(model, "get_output_embeddings", None)) or getattr(model, "base_model", None) is None:
            raise TypeError(f"HiddenStates wraps a Hugging Face causal LM (with base_model and "
                            f"get_output_embeddings), got {type(model).__name__}")
        self.model = model

    def forward(self, ids):
        return self.model.base_model(input_ids=ids).last_hidden_state

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


def _token_pairs(data, name):
    """``data`` as ``(ids, labels)`` int64 tensors ``(N, T)``: a pair or a TensorDataset of two."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        data = data.tensors
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
        raise TypeError(f"{name} must be an (ids, labels) pair of (N, T) tensors, got {type(data).__name__}")
    ids, labels = data
    if ids.dim() != 2 or ids.shape != labels.shape or ids.dtype != torch.long or labels.dtype != torch.long:
        raise ValueError(f"{name}: ids and labels must be int64 tensors of one (N, T) shape, got "
                         f"{tuple(ids.shape)} {ids.dtype} and {tuple(labels.shape)} {labels.dtype}")
    if len(ids) == 0:
        raise ValueError(f"{name} holds no sequences")
    return ids, labels


def predicted_tokens(labels: torch.Tensor, n_source: int) -> torch.Tensor:
    """float64 ``[source, target]``: how many positions of the first ``n_source`` rows and of the others
    predict a token (a label follows them that is not ``IGNORE_INDEX``)."""
    kept = (labels[:, 1:] != IGNORE_INDEX).sum(1, dtype=torch.float64)
    return torch.stack([kept[:n_source].sum(), kept[n_source:].sum()])


def token_mean_weights(alpha, tokens: torch.Tensor):
    """``(w, scale)`` such that ``scale * (w * S_t + (1 - w) * S_s)`` equals ``alpha * S_t / n_t + (1 - alpha)
    * S_s / n_s``: each side's summed loss ``S`` over its token count ``n`` (``tokens = [n_s, n_t]``) as one
    call of the op with ``reduction="sum"``. A side weighing 0 gets no weight whatever its count; a side
    without tokens adds nothing (its sum is 0: its count is taken as 1, not a division by zero)."""
    side = (torch.stack([1 - alpha, alpha]) if isinstance(alpha, torch.Tensor)
            else torch.tensor([1.0 - alpha, alpha], dtype=torch.float64))
    side = side.to(tokens.device, torch.float64)
    per_token = torch.where(side == 0, 0.0, side / tokens.clamp(min=1))
    scale = per_token.sum()
    return per_token[1] / scale, scale


class _ModelWithLoss(nn.Module):
    """The model and its head's fused loss as one module: what the loop runs, wraps in DDP or shards
    with FSDP2. The loss is computed inside this forward because the fused op needs the head's whole
    ``(V, D)`` weight: under FSDP2 this module is the root unit, whose parameters (everything outside the
    repeated blocks: embeddings, final norm, head) are all-gathered by its pre-forward hook and stay
    gathered through this forward, and whose post-backward reduce-scatters their gradients; the head's
    gradient, made by the op inside this forward, therefore reaches FSDP's reduce-scatter like any
    other. Outside a forward the head's weight is only this rank's shard. (DDP would also sync a head
    used outside the forward, its hooks being per parameter; one module serves both.)"""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, n_source, alpha, reduction):
        hidden = self.model(ids)
        return causal_lm_loss(hidden[:n_source], labels[:n_source], hidden[n_source:], labels[n_source:],
                              output_head(self.model), alpha, reduction=reduction)


def replay_memory(labels, seed, *, sequences=None, tokens=None):
    """Indices (sorted) of the replay memory among source sequences with these ``(N, T)`` labels: the
    first ``sequences`` of a permutation seeded by ``seed``, or the longest prefix of it whose sequences
    hold at most ``tokens`` predicted tokens together."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    if sequences is not None:
        if sequences > len(labels):
            raise ValueError(f"memory_size={sequences} exceeds the {len(labels)} sequences of source_data")
        return order[:sequences].sort().values
    counts = (shift_labels(labels) != IGNORE_INDEX).sum(1)[order].cumsum(0)
    n = int((counts <= tokens).sum())
    if n == 0:
        raise ValueError(f"memory_tokens={tokens} holds no source sequence (the first one of the memory's "
                         f"order predicts {int(counts[0])} tokens)")
    return order[:n].sort().values


class LMAdaptiveTrainer(AdaptiveTrainer):
    """``fit(target_data, source_data=None, val_data=None, *, epochs, resume_from=None)`` on token
    sequences: each data set an ``(ids, labels)`` pair of ``(N, T)`` int64 tensors (labels unshifted, -100
    at padding). Each target batch is paired with a batch of replayed source sequences (``memory_size``
    or ``memory_tokens``: a memory of source sequences, see :func:`replay_memory`) and the step's loss
    is :func:`causal_lm_loss`, ``alpha`` weighing the target side (a float or a schedule, as in
    :class:`AdaptiveTrainer`). A constant ``alpha=1`` is naive fine-tuning: the source batches are not
    drawn at all. ``evaluate`` and the History's ``extra`` report nats per predicted token and perplexity;
    the model is any module whose ``forward(ids)`` returns the hidden states entering its head
    (:func:`output_head`). Only ``strategy="replay"`` is supported so far.

    The loss is each side's mean over its predicted tokens in the whole optimizer step: under torchrun
    (DDP, or FSDP2 with ``parallel="fsdp"``) over every rank's batch, and with ``grad_accum_steps`` over
    the whole accumulation window, however the padding falls; so it equals one process's loss on the
    union of the batches. (Per-batch means averaged over ranks or micro-batches would weigh a token of
    a padded batch more than one of a full batch.) Each side's summed loss is divided by the side's
    predicted-token count, all-reduced across ranks before the window's first forward, times the number
    of ranks (DDP and FSDP2 average gradients), as Hugging Face does with ``num_items_in_batch``.
    """

    supports_fsdp = True
    normalises_over_window = True

    def __init__(self, model, config=None, *, callbacks=(), **options):
        super().__init__(model, config, callbacks=callbacks, **options)
        self._net = _ModelWithLoss(self.model)
        self._tokens = None  # the current window's [source, target] token counts, all ranks together
        self._window_first = True

    def prepare(self, target_data, source_data=None, val_data=None):
        cfg = self.config
        if cfg.strategy != "replay":
            raise ValueError(f"LMAdaptiveTrainer supports strategy='replay' only, got {cfg.strategy!r}")
        target = _token_pairs(target_data, "target_data")
        source = None if source_data is None else _token_pairs(source_data, "source_data")
        naive = not callable(cfg.alpha) and float(cfg.alpha) == 1.0
        if source is None and not naive:
            raise ValueError(f"alpha={cfg.alpha!r} weighs replayed source sequences: pass source_data (or alpha=1 "
                             f"for naive fine-tuning)")
        if source is not None and source[0].shape[1] != target[0].shape[1]:
            raise ValueError(f"source sequences have {source[0].shape[1]} tokens, target {target[0].shape[1]}: "
                             f"pack both to one length")
        if val_data is None:
            val_data = {"target": target_data} if source_data is None else {"source": source_data,
                                                                             "target": target_data}
        if not isinstance(val_data, dict) or not set(val_data) <= {"source", "target"} or "target" not in val_data:
            raise ValueError(f"val_data must be a dict with key 'target' (and 'source'), got "
                             f"{sorted(val_data) if isinstance(val_data, dict) else type(val_data).__name__}")
        val = {f"{side}_": ValSet(val_data[side], TensorDataset(*_token_pairs(val_data[side], f"val_data[{side!r}]")))
               for side in ("source", "target") if side in val_data}
        seed = cfg.seed or 0
        targets = TensorBatches(*target, cfg.batch_size, self.device, seed)
        if naive:
            return targets, val
        if cfg.memory_size is not None or cfg.memory_tokens is not None:
            keep = replay_memory(source[1], seed, sequences=cfg.memory_size, tokens=cfg.memory_tokens)
            source = (source[0][keep], source[1][keep])
            self.memory = TensorDataset(*source)
        sources = TensorBatches(*source, min(cfg.batch_size, len(source[0])), self.device, seed)
        return PairedBatches(targets, sources), val

    def on_window_start(self, batches):
        tokens = sum(predicted_tokens(b[1], b[2] if len(b) == 3 else 0) for b in batches)
        self._tokens = dist.all_reduce_sum(tokens)
        self._window_first = True

    def step(self, batch):
        x, y, ns = batch if len(batch) == 3 else (*batch, 0)  # replayed source rows first (PairedBatches)
        alpha = self._alpha if self.config.compile else self._alpha_value
        if self._tokens is None:  # a step outside fit: the batch's own token means
            tokens, ranks = predicted_tokens(y, ns), 1
        else:
            tokens, ranks = self._tokens, dist.world_size()
        w, scale = token_mean_weights(alpha, tokens)
        loss = self._net(x, y, ns, w, reduction="sum")
        loss = loss * (scale * ranks).to(loss.dtype)
        # the window's loss is the sum of its steps' over the ranks, each of which counts the window once
        first, self._window_first = self._window_first, False
        return loss, {"loss": loss.detach(), "steps": int(first or self._tokens is None)}

    def epoch_logs(self, s):
        return {"loss": s["loss"] / s["steps"]}

    def evaluate(self, data) -> dict:
        """{"loss": nats per predicted token, "ppl": its exp} over the ``(ids, labels)`` sequences of
        ``data`` (each rank evaluates its share; the sums are reduced across ranks)."""
        return self._evaluate(ValSet(data, TensorDataset(*_token_pairs(data, "data"))))

    @torch.no_grad()
    def _evaluate(self, val: ValSet) -> dict:
        ids, labels = val.ds.tensors
        # DDP's forward would sync buffers (a collective) on each call: the module inside it runs instead.
        # FSDP2's all-gathers are collectives too, so every rank runs as many forward passes: rank r takes
        # rows r, r + world, ... up to a multiple of world, the rows past the end standing in with no label.
        net = self._net.module if isinstance(self._net, DistributedDataParallel) else self._net
        world = dist.world_size()
        rows = torch.arange(dist.rank(), -(-len(ids) // world) * world, world)
        was_training = net.training
        net.eval()
        sums = MetricSums()
        for chunk in rows.split(self.config.batch_size):
            x, y = ids[chunk % len(ids)].to(self.device), labels[chunk % len(ids)].to(self.device)
            y = y.masked_fill((chunk >= len(ids)).to(self.device)[:, None], IGNORE_INDEX)
            with self._autocast():
                total = net(x, y, 0, 1.0, reduction="sum")
            sums.add({"nats": total, "tokens": predicted_tokens(y, 0)[1]})
        net.train(was_training)
        s = sums.read(self.device)
        loss = s["nats"] / s["tokens"]
        return {"loss": loss, "ppl": math.exp(loss)}

    def on_fit_start(self, resuming):
        self._tokens = None
        if not callable(self.config.alpha):
            self._set_alpha(float(self.config.alpha))
        if not resuming:
            for side, val in self._val_sets.items():
                self.history.extra[f"{side}loss_before"] = self._evaluate(val)["loss"]

    def on_fit_end(self):
        self._tokens = None  # steps outside fit use their own batch's counts again
        x = self.history.extra
        for side, val in self._val_sets.items():
            after = x[f"{side}loss_after"] = self._evaluate(val)["loss"]
            x[f"{side}ppl_after"] = math.exp(after)
            before = x.get(f"{side}loss_before")
            if before is not None:
                x[f"{side}ppl_before"] = math.exp(before)
        if "source_loss_before" in x:
            # forgetting: the source's loss gained, in nats per token, and its perplexity's relative growth
            x["forgetting_nats"] = x["source_loss_after"] - x["source_loss_before"]
            x["forgetting_ppl"] = x["source_ppl_after"] / x["source_ppl_before"] - 1.0
