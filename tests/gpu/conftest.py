import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device: see README 'GPU tests')")
        for item in items:
            if "/gpu/" in str(item.fspath):
                item.add_marker(skip)
