"""intruder_ext: find and mitigate intruder dimensions in fine-tuned models, fast.

Intruder dimensions (Shuttleworth et al., arXiv 2410.21228) are top singular vectors of a
fine-tuned weight that are nearly orthogonal to every singular vector of the base weight.

The names below are imported on first use (PEP 562), so that ``import intruder_ext`` and the
command line start without loading torch; the compiled ops (``torch.ops.intruder_ext.*``) are
registered by the first use of one of them, or by ``import intruder_ext.ops``.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BaseSpectrum": "spectral", "TopK": "spectral", "base_spectrum": "spectral",
    "dense_topk": "spectral", "lora_topk": "spectral", "lowrank_svd": "spectral",
    "weight_topk": "spectral",
    "MaxCosine": "ops", "batched_svd": "ops", "cuda_built": "ops", "max_cosine": "ops",
    "SpectrumCache": "cache",
    "IntruderReport": "report", "ModuleReport": "report",
    "Layer": "layers", "LayerSet": "layers",
    "find_intruders": "detection",
    "CalibrationWarning": "calibration", "null_max_cos": "calibration",
    "IntruderMonitor": "monitor", "IntruderCallback": "callback",
    "merge_and_unload_with_reduced_intruder_dimensions": "mitigation",
    "mitigate_checkpoint": "mitigation", "reduce_intruder_dimension": "mitigation",
    "extract_lora": "extraction", "init_lora_from_spectrum": "initialization",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'intruder_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
