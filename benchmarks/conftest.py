import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from devices import DEVICES, skip_cuda_items_without_gpu  # noqa: E402,F401  (DEVICES is re-exported)

from common import bench_compile_mode, is_compile_row  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda_items_without_gpu(items)
    try:
        mode = bench_compile_mode()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    if mode == "1":
        return
    # BENCH_COMPILE=0: without the torch.compile rows; "only": nothing but them (see common.py)
    keep, drop = [], []
    for item in items:
        (keep if is_compile_row(item) == (mode == "only") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
