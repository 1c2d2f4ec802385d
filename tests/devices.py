"""Devices to parametrize over; CUDA cases carry the `cuda` marker and are skipped without a GPU."""
import os

# cuBLAS under torch.use_deterministic_algorithms(True) needs this before its first GEMM; here too
# because benchmarks/conftest.py imports this module without tests/conftest.py.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def skip_cuda_items_without_gpu(items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
