"""Intruder detection for PEFT LoRA adapters and for fully fine-tuned models.

The maths is in :mod:`intruder_ext.spectral` (top-k of ``W0 + s B A`` in base coordinates,
so ``max_cos`` comes for free); this module walks the model, checks the arguments and builds
the :class:`~intruder_ext.report.IntruderReport`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

import torch
from tqdm.auto import tqdm

from . import peft_layers
from .cache import SpectrumCache
from .report import IntruderReport, ModuleReport
from .spectral import TopK, base_spectrum, lora_topk, weight_topk


def check_epsilon(func: str, arg: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < value <= 1:
        raise ValueError(f"{func}: {arg} must be a number in (0, 1] (got {value!r})")
    return float(value)


def check_top_k(func: str, value) -> int | float:
    """``top_k`` is an int >= 1 or a fraction in (0, 1) of ``min(m, n)``."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, Integral):
        if value >= 1:
            return int(value)
    elif isinstance(value, Real) and 0 < value < 1:
        return float(value)
    raise ValueError(f"{func}: top_k must be an int >= 1 or a float in (0, 1) (got {value!r})")


def resolve_top_k(top_k: int | float, shape) -> int:
    """How many singular vectors to examine in an ``(m, n)`` layer (never more than min(m, n))."""
    p = min(shape)
    if isinstance(top_k, float):
        return max(1, min(p, math.ceil(top_k * p)))
    return min(p, top_k)


def spectrum_source(cache_dir):
    """``W0 -> BaseSpectrum``: through a :class:`SpectrumCache` (``None``: its default; a path;
    or a cache object to share between calls), or ``False`` to recompute every time."""
    if cache_dir is False:
        return base_spectrum
    cache = cache_dir if isinstance(cache_dir, SpectrumCache) else SpectrumCache(cache_dir)
    return cache.get


@dataclass
class LayerResult:
    """Detection result of one LoRA layer, kept for mitigation (which needs the vectors)."""

    target: peft_layers.LoraTarget
    top: TopK
    intruders: list[int]
    rank: int
    scale: float
    shape: tuple[int, int]

    def report(self) -> ModuleReport:
        return _module_report(self.target.name, self.target.kind, self.shape, self.rank,
                              self.scale, self.top, self.intruders)


def _module_report(name, kind, shape, rank, scale, top: TopK, intruders) -> ModuleReport:
    return ModuleReport(
        name=name, kind=kind, shape=tuple(shape), rank=rank, scale=scale,
        sigma=top.sigma.detach().cpu(), max_cos=top.max_cos.detach().cpu(),
        argmax=top.argmax.detach().cpu(), intruders=list(intruders),
        residual=top.residual.detach().cpu(), converged=bool(top.converged),
        iterations=int(top.iterations), method=str(top.method))


def _intruders(top: TopK, epsilon: float) -> list[int]:
    return torch.nonzero(top.max_cos < epsilon).flatten().tolist()


def detect_lora(targets, adapter: str, top_k, epsilon: float, *, cache_dir=None, device=None,
                progress=True, desc="find_intruders") -> list[LayerResult]:
    """Top-k and intruders of every target's ``W0 + s B A``; changes nothing in the model."""
    spectrum = spectrum_source(cache_dir)
    results = []
    for t in tqdm(targets, desc=desc, unit="module", disable=not progress):
        W0 = t.base_weight(device)
        B, A = t.factors(adapter, W0.device)
        k = resolve_top_k(top_k, W0.shape)
        s = t.scale(adapter)
        top = lora_topk(spectrum(W0), B, A, s, k)
        results.append(LayerResult(t, top, _intruders(top, epsilon), t.rank(adapter), s,
                                   tuple(W0.shape)))
    return results


def find_intruders(model, tuned_model=None, *, adapter_name=None, top_k=10, epsilon=0.5,
                   modules=None, cache_dir=None, device=None, progress=True) -> IntruderReport:
    """Find intruder dimensions (Shuttleworth et al., arXiv 2410.21228).

    ``y_j`` (the j-th left singular vector of the tuned weight ``W``, j < top_k) is an intruder
    when ``max_i |cos(y_j, x_i)| < epsilon`` over all left singular vectors ``x_i`` of the base
    weight ``W0``. Vectors live in each layer's output space, as for ``nn.Linear``
    (``Conv1D`` and ``nn.Embedding`` weights are transposed first, see
    :mod:`intruder_ext.peft_layers`); half-precision weights are analysed in float32.

    Args:
        model: a ``peft.PeftModel`` with LoRA adapter(s) (``W = W0 + s B A`` per LoRA layer), or
            the base model of a full fine-tuning pair, with ``tuned_model`` the fine-tuned one
            (every ``nn.Linear``/``Conv1D``/``nn.Embedding`` is compared by name).
        adapter_name: which LoRA adapter (default: the active one).
        top_k: how many top singular vectors of ``W`` to examine: an int, or a float in (0, 1)
            for that fraction of ``min(m, n)`` (rounded up).
        epsilon: the cosine threshold, in (0, 1].
        modules: restrict to these module names (full names, or suffixes such as ``"q_proj"``).
        cache_dir: where base spectra are cached on disk (``None``: the cache's default; a
            :class:`~intruder_ext.cache.SpectrumCache`; ``False``: no cache).
        device: compute there (default: where each weight lives).
        progress: show a tqdm bar over the modules.

    Returns an :class:`~intruder_ext.report.IntruderReport`; the model is not changed.
    """
    func = "find_intruders"
    top_k = check_top_k(func, top_k)
    epsilon = check_epsilon(func, "epsilon", epsilon)
    if tuned_model is not None:
        if peft_layers.is_peft_model(model) or peft_layers.is_peft_model(tuned_model):
            raise ValueError(f"{func}: pass either a PeftModel, or (base_model, tuned_model) of "
                             f"plain models for full fine-tuning (got {type(model).__name__} and "
                             f"{type(tuned_model).__name__})")
        if adapter_name is not None:
            raise ValueError(f"{func}: adapter_name={adapter_name!r} has no meaning for a "
                             f"full fine-tuning pair")
        return _find_full(func, model, tuned_model, top_k, epsilon, modules, cache_dir, device,
                          progress)
    adapter = peft_layers.check_adapter(func, "adapter_name", model, adapter_name)
    targets = peft_layers.lora_targets(func, model, adapter, modules)
    results = detect_lora(targets, adapter, top_k, epsilon, cache_dir=cache_dir, device=device,
                          progress=progress)
    return IntruderReport([r.report() for r in results], top_k, epsilon, adapter)


def _find_full(func, model, tuned_model, top_k, epsilon, modules, cache_dir, device, progress):
    spectrum = spectrum_source(cache_dir)
    reports = []
    for pair in tqdm(peft_layers.weight_targets(func, model, tuned_model, modules), desc=func,
                     unit="module", disable=not progress):
        W0, W = pair.weights(device)
        top = weight_topk(W, spectrum(W0), resolve_top_k(top_k, W0.shape))
        reports.append(_module_report(pair.name, pair.kind, W0.shape, None, None, top,
                                      _intruders(top, epsilon)))
    return IntruderReport(reports, top_k, epsilon, None)
