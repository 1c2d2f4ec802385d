"""The MLP the package builds: FusedLinearReLU blocks (the backbone) and a linear head."""
from __future__ import annotations

from torch import nn

from fastadapt.ops.linear_relu import FusedLinearReLU


class MLP(nn.Module):
    """``in_features -> hidden_sizes (FusedLinearReLU each) -> num_classes (nn.Linear head)``."""

    def __init__(self, in_features: int, hidden_sizes=(128, 128), num_classes: int = 10):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        hidden_sizes = tuple(hidden_sizes)
        if not hidden_sizes or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden_sizes):
            raise ValueError(f"hidden_sizes must be one or more positive ints, got {hidden_sizes!r}")
        self.in_features = in_features
        self.hidden_sizes = hidden_sizes
        sizes = (in_features,) + hidden_sizes
        self.backbone = nn.Sequential(*(FusedLinearReLU(a, b) for a, b in zip(sizes, sizes[1:])))
        self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
        return self.head(self.backbone(x.flatten(1)))

    def config(self) -> dict:
        """Everything needed to rebuild the architecture (stored with the weights)."""
        return {"in_features": self.in_features, "hidden_sizes": list(self.hidden_sizes),
                "num_classes": self.head.out_features}
