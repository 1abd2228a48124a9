import os
import sys

# Import fusenet's engine before anything imports triton, so the interpreter is
# switched on where there is no GPU.
sys.path.insert(0, os.path.dirname(__file__))
import engine.device  # noqa: E402,F401  (switches on the interpreter before anything imports triton)
import pytest  # noqa: E402
import torch  # noqa: E402

from engine.device import HAS_CUDA  # noqa: E402


KERNEL_TESTS = os.path.join(os.path.dirname(__file__), "kernels")


def _is_kernel_test(node) -> bool:
    return str(node.path).startswith(KERNEL_TESTS)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        # With a GPU the kernel tests join the GPU tier and run on CUDA (see below).
        for item in items:
            if _is_kernel_test(item):
                item.add_marker(pytest.mark.gpu)
        return
    skip = pytest.mark.skip(reason="GPU tier: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _kernel_tests_on_cuda(request):
    """The kernel tests make their tensors without naming a device: on a GPU
    machine they are made on CUDA, so every kernel runs compiled there."""
    if HAS_CUDA and _is_kernel_test(request.node):
        torch.set_default_device("cuda")
        yield
        torch.set_default_device("cpu")
    else:
        yield
