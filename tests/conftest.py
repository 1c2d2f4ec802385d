"""Shared test fixtures: devices (CUDA behind a marker) and backends (compiled kernels / fallback)."""
import pytest
import torch

import fastadapt
from fastadapt import _extension

CUDA = torch.cuda.is_available()

# Parametrize a test over these to run it on every device; CUDA cases carry the `cuda` marker.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["compiled", "fallback"])
def backend(request, monkeypatch):
    """Runs a test once through the compiled kernels and once through the pure-PyTorch fallback."""
    if request.param == "compiled":
        if not fastadapt.has_ops():
            pytest.skip("compiled extension not loaded: " + str(_extension._load_error))
    else:
        monkeypatch.setattr(_extension, "_C", None)
        monkeypatch.setattr(_extension, "_warned", True)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
