import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from devices import DEVICES, skip_cuda_items_without_gpu  # noqa: E402,F401  (DEVICES is re-exported)


def pytest_collection_modifyitems(config, items):
    skip_cuda_items_without_gpu(items)


def pytest_collect_file(file_path, parent):
    """Collect benchmarks/bench_*.py: pyproject's python_files keeps pytest's default (test_*.py), under
    which `pytest tests benchmarks` (make test, CI's smoke run) would silently collect none of them.
    Files named on the command line are collected by pytest itself."""
    import pytest

    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
