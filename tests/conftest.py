"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test single-threaded: its tensors are tiny, and thread start-up costs more than the work,
    badly so on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs it on one)"))])
def device(request):
    """Each device a comparison must hold on: the CPU always, CUDA where there is one (bench/gpu_check.sh).
    On CUDA, TF32 is off: it would round fp32 convs and matmuls to 10 mantissa bits."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
