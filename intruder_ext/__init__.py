"""intruder_ext: find and mitigate intruder dimensions in fine-tuned models, fast.

Intruder dimensions (Shuttleworth et al., arXiv 2410.21228) are top singular vectors of a
fine-tuned weight that are nearly orthogonal to every singular vector of the base weight.
"""

from . import _C  # noqa: F401  (loads the compiled ops into torch.ops.intruder_ext)
from . import _meta  # noqa: F401  (fake implementations for torch.compile / meta tensors)
from .ops import MaxCosine, batched_svd, cuda_built, max_cosine

__all__ = ["MaxCosine", "batched_svd", "cuda_built", "max_cosine"]
from .spectral import (BaseSpectrum, TopK, base_spectrum, dense_topk, lora_topk,  # noqa: E402
                       lowrank_svd, weight_topk)
from .cache import SpectrumCache  # noqa: E402
__all__ += ["BaseSpectrum", "SpectrumCache", "TopK", "base_spectrum", "dense_topk", "lora_topk",
            "lowrank_svd", "weight_topk"]
__version__ = "0.1.0"
