"""intruder_ext: find and mitigate intruder dimensions in fine-tuned models, fast.

Intruder dimensions (Shuttleworth et al., arXiv 2410.21228) are top singular vectors of a
fine-tuned weight that are nearly orthogonal to every singular vector of the base weight.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, first)

from . import _C  # noqa: F401  (loads the compiled ops into torch.ops.intruder_ext)
from . import _meta  # noqa: F401  (fake implementations for torch.compile / meta tensors)
from .ops import MaxCosine, batched_svd, cuda_built, max_cosine

__all__ = ["MaxCosine", "batched_svd", "cuda_built", "max_cosine"]
from .spectral import (BaseSpectrum, TopK, base_spectrum, dense_topk, lora_topk,  # noqa: E402
                       lowrank_svd, weight_topk)
__all__ += ["BaseSpectrum", "TopK", "base_spectrum", "dense_topk", "lora_topk", "lowrank_svd",
            "weight_topk"]
__version__ = "0.1.0"

from .detection import find_intruders  # noqa: E402
from .mitigation import (  # noqa: E402
    merge_and_unload_with_reduced_intruder_dimensions,
    reduce_intruder_dimension,
)
from .report import IntruderReport, ModuleReport  # noqa: E402

__all__ += ["IntruderReport", "ModuleReport", "find_intruders",
            "merge_and_unload_with_reduced_intruder_dimensions", "reduce_intruder_dimension"]
