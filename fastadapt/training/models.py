"""The MLP the package builds (FusedLinearReLU blocks, the backbone, and a linear head) and the Pipeline
that saves one with its preprocessing and label names."""
from __future__ import annotations

import torch
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


class Pipeline(nn.Module):
    """Raw features -> standardised with the training data's ``mean`` and ``std`` -> ``model`` -> logits,
    and ``classes[i]``, the user's label of output ``i``. Saved whole (``save_weights``) and rebuilt by
    ``load_pretrained``, a model predicts from raw data and answers in the labels it was trained on."""

    def __init__(self, model: MLP, mean, std, classes):
        super().__init__()
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a fastadapt MLP, got {type(model).__name__}")
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).clone())
        for name, t in (("mean", self.mean), ("std", self.std)):
            if tuple(t.shape) != (model.in_features,):
                raise ValueError(f"{name} must hold one value per input feature ({model.in_features}), "
                                 f"got shape {tuple(t.shape)}")
        self.classes = list(classes)

    def forward(self, x):
        return self.model((x.flatten(1) - self.mean) / self.std)

    def config(self) -> dict:
        return {"model": self.model.config(), "classes": self.classes}

    @torch.no_grad()
    def predict(self, x) -> list:
        """The label (an entry of ``classes``) of each row of raw features ``x``."""
        outputs = self.model.head.out_features
        if len(self.classes) != outputs:  # a head grown or replaced after loading
            raise ValueError(f"the model has {outputs} outputs but classes names {len(self.classes)}; "
                             f"set classes to one label per output")
        x = torch.as_tensor(x, dtype=self.mean.dtype, device=self.mean.device)
        was_training = self.training
        self.eval()
        index = self(x).argmax(-1).tolist()
        self.train(was_training)
        return [self.classes[i] for i in index]


def from_config(config: dict) -> nn.Module:
    """The module a saved ``config()`` describes, freshly initialised: an MLP or a Pipeline around one."""
    if "model" not in config:
        return MLP(**config)
    inner = MLP(**config["model"])
    n = inner.in_features
    return Pipeline(inner, torch.zeros(n), torch.ones(n), config["classes"])
