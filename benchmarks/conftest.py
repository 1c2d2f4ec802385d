import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from devices import DEVICES, skip_cuda_items_without_gpu  # noqa: E402,F401  (DEVICES is re-exported)


def pytest_collection_modifyitems(config, items):
    skip_cuda_items_without_gpu(items)

