import pytest
import torch

import intruder_ext

requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and intruder_ext.cuda_built()),
                                   reason="needs a GPU and the CUDA kernels")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
