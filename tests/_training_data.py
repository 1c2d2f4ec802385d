"""Small synthetic classification data shared by the training-layer tests."""
import torch


def blobs(n=120, features=8, classes=(0, 1, 2), seed=0, spread=0.5):
    """Well-separated Gaussian blobs, one per class label in ``classes``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(max(classes) + 1, features, generator=torch.Generator().manual_seed(1234)) * 3
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    X = centers[y] + spread * torch.randn(n, features, generator=g)
    return X, y
