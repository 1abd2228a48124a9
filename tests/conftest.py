import os
import sys

# Import fusenet's engine before anything imports triton, so the interpreter is
# switched on where there is no GPU.
sys.path.insert(0, os.path.dirname(__file__))
import engine  # noqa: E402,F401
import pytest  # noqa: E402
import torch  # noqa: E402

from engine.device import HAS_CUDA  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="GPU tier: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
