"""The replayed source examples as a stateless stream: which source examples the b-th replay batch holds
is a function of (seed, b) alone, so a run resumed from a checkpoint replays exactly the batches the
uninterrupted run would have, with nothing saved but the step count the Trainer already saves."""
from __future__ import annotations

import torch

# 2**63 - 25, the largest prime below 2**63: mixes the seed and the pass number into one generator seed
_MODULUS = (1 << 63) - 25


class ReplayStream:
    """An endless sequence of indices into ``n`` source examples: pass ``e`` over the source is a
    permutation of ``range(n)`` drawn from a generator seeded with ``(seed, e)``, and the passes follow
    one another. Batch ``b`` of ``size`` examples is the sequence's ``[b * size, (b + 1) * size)``, so
    ``k`` consecutive batches of ``size`` hold the same examples as ``k / m`` consecutive batches of
    ``m * size`` (gradient accumulation does not change what is replayed)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("source_dataset holds no examples")
        self.n, self.seed = n, int(seed)
        self._passes: dict[int, torch.Tensor] = {}

    def _pass(self, e: int) -> torch.Tensor:
        if e not in self._passes:
            if len(self._passes) >= 2:  # a batch of at most n examples spans at most two passes
                self._passes.pop(min(self._passes))
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + e) % _MODULUS)
            self._passes[e] = torch.randperm(self.n, generator=g)
        return self._passes[e]

    def batch(self, b: int, size: int) -> list[int]:
        """The source indices of batch ``b`` of ``size`` examples."""
        start = b * size
        return [int(self._pass(j // self.n)[j % self.n]) for j in range(start, start + size)]
