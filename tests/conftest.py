"""Shared test fixtures: devices (CUDA behind a marker) and backends (compiled kernels / fallback)."""
import os

# torch.use_deterministic_algorithms(True) makes cuBLAS raise unless this is set before the first GEMM
# creates its handle (tests/test_determinism.py); set before anything below touches CUDA.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

from devices import DEVICES, skip_cuda_items_without_gpu  # noqa: E402,F401  (DEVICES is re-exported)
from helpers import use_backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda_items_without_gpu(items)


@pytest.fixture(params=["compiled", "fallback"])
def backend(request):
    """Runs a test once through the compiled kernels and once through the pure-PyTorch fallback."""
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _no_tf32():
    # CUDA float32 parity is judged against full-precision GEMMs.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
