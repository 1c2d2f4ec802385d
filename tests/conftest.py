"""Shared test fixtures: devices (CUDA behind a marker) and backends (compiled kernels / fallback)."""
import pytest
import torch

from devices import DEVICES, skip_cuda_items_without_gpu  # noqa: F401  (DEVICES is re-exported)
from helpers import use_backend


def pytest_collection_modifyitems(config, items):
    skip_cuda_items_without_gpu(items)


@pytest.fixture(params=["compiled", "fallback"])
def backend(request):
    """Runs a test once through the compiled kernels and once through the pure-PyTorch fallback."""
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
