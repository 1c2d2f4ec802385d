"""Shared test fixtures: devices (CUDA behind a marker) and backends (compiled kernels / fallback)."""
import pytest
import torch

import fastadapt
from fastadapt import _extension

from devices import CUDA, DEVICES, skip_cuda_items_without_gpu  # noqa: F401  (DEVICES is re-exported)


def pytest_collection_modifyitems(config, items):
    skip_cuda_items_without_gpu(items)


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
