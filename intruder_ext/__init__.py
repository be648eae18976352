"""intruder_ext: find and mitigate intruder dimensions in fine-tuned models, fast.

Intruder dimensions (Shuttleworth et al., arXiv 2410.21228) are top singular vectors of a
fine-tuned weight that are nearly orthogonal to every singular vector of the base weight.
"""

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against, first)

try:
    from . import _C  # noqa: F401  (loads the compiled ops into torch.ops.intruder_ext)
except ImportError as error:  # the usual cause: importing the source tree, which holds no _C
    raise ImportError(
        f"intruder_ext: the compiled library intruder_ext._C could not be loaded from {__path__[0]} "
        f"({error}). Install the package with `pip install --no-build-isolation .` and import it "
        "from outside the source tree, or build in place with `python setup.py build_ext --inplace`."
    ) from error
from . import _meta  # noqa: F401  (fake implementations for torch.compile / meta tensors)
from .cache import SpectrumCache
from .detection import find_intruders
from .layers import Layer, LayerSet
from .mitigation import (merge_and_unload_with_reduced_intruder_dimensions, mitigate_checkpoint,
                         reduce_intruder_dimension)
from .ops import MaxCosine, batched_svd, cuda_built, max_cosine
from .report import IntruderReport, ModuleReport
from .spectral import (BaseSpectrum, TopK, base_spectrum, dense_topk, lora_topk, lowrank_svd,
                       weight_topk)

__all__ = [
    "BaseSpectrum", "IntruderReport", "Layer", "LayerSet", "MaxCosine", "ModuleReport",
    "SpectrumCache", "TopK", "base_spectrum", "batched_svd", "cuda_built", "dense_topk",
    "find_intruders", "lora_topk", "lowrank_svd", "max_cosine",
    "merge_and_unload_with_reduced_intruder_dimensions", "mitigate_checkpoint",
    "reduce_intruder_dimension", "weight_topk",
]
__version__ = "0.1.0"
