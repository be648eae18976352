"""Intruder detection: the top-k singular vectors of each layer's tuned weight against its base
spectrum, for every source of layers (:mod:`intruder_ext.layers`).

The maths is in :mod:`intruder_ext.spectral`; this module reads each layer (one at a time: a
layer's tensors are released before the next is read), runs the engine and builds the per-layer
records of an :class:`~intruder_ext.report.IntruderReport`.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import checks
from .cache import SpectrumCache
from .calibration import (BASIS_RTOL, alignment, basis_groups, max_cos_interval, null_max_cos,
                          warn_below_null)
from .layers import (Layer, LayerSet, NonFiniteError, Skipped, checkpoint_layers,
                     is_peft_model, model_pair_layers, peft_model_layers)
from .report import IntruderReport, ModuleReport
from .spectral import BaseSpectrum, TopK, base_spectrum, lora_topk, weight_topk

# How many top singular vectors a layer's plots show (heatmap rows, spectrum points), and the
# certificate they need: a plot shows 3 digits, and the top-32 of a 32-wide layer reaches down
# to singular values the default tolerance (1e-6 of each value's own size) cannot certify.
VIEW_K = 32
VIEW_TOL = 1e-4


def resolve_top_k(top_k: int | float, shape) -> int:
    """How many singular vectors to examine in an ``(m, n)`` layer (never more than min(m, n))."""
    p = min(shape)
    if isinstance(top_k, float):
        return max(1, min(p, math.ceil(top_k * p)))
    return min(p, top_k)


def spectrum_source(cache_dir, model: str | None = None):
    """``(layer, device) -> BaseSpectrum`` of the layer's base weight: through a
    :class:`SpectrumCache` (``None``: its default; a path; or a cache object to share between
    calls), whose new entries are labelled with ``model`` and the layer's name, or ``False`` to
    recompute every time."""
    if cache_dir is False:
        return lambda layer, device=None: base_spectrum(layer.base_weight(device))
    cache = cache_dir if isinstance(cache_dir, SpectrumCache) else SpectrumCache(cache_dir)
    return lambda layer, device=None: cache.get(layer.base_weight(device), model=model,
                                                layer=layer.name)


@dataclass
class LayerResult:
    """Detection result of one layer: the engine's top-k (kept for mitigation, which needs the
    vectors) and the layer's report record."""

    layer: Layer
    top: TopK
    record: ModuleReport

    @property
    def intruders(self) -> list[int]:
        return self.record.intruders


def _top(layer: Layer, base: BaseSpectrum, k: int, tol: float | None = None) -> TopK:
    if layer.is_lora:
        B, A = layer.factors(base.device)
        return lora_topk(base, B, A, layer.scale, k, tol=tol)
    return weight_topk(layer.tuned_weight(base.device), base, k, tol=tol)


def analyse_layer(layer: Layer, spectrum, top_k, epsilon: float, device=None,
                  basis_rtol: float = BASIS_RTOL) -> LayerResult:
    """Read one layer, compute its top-k against the base spectrum and its intruders."""
    return analyse_against(layer, spectrum(layer, device), top_k, epsilon, basis_rtol)


def analyse_against(layer: Layer, base: BaseSpectrum, top_k, epsilon: float,
                    basis_rtol: float = BASIS_RTOL) -> LayerResult:
    """One layer's record against its base spectrum ``base`` (already at hand): the top-k, the
    intruders, and their calibration (:mod:`intruder_ext.calibration`)."""
    top = _top(layer, base, resolve_top_k(top_k, layer.shape))
    max_cos = top.max_cos.detach()
    intruders = torch.nonzero(max_cos < epsilon).flatten().tolist()
    m, n = layer.shape
    null = null_max_cos(m, min(m, n))
    lo, hi = max_cos_interval(top.coords.detach(), basis_groups(base.S, basis_rtol))
    # The interval, from sums of the coordinates' squares, can miss max_cos by rounding; keep
    # max_cos inside.
    lo = torch.minimum(lo.to(max_cos.dtype), max_cos)
    hi = torch.maximum(hi.to(max_cos.dtype), max_cos)
    sensitive = torch.nonzero((lo < epsilon) & (hi >= epsilon)).flatten().tolist()
    record = ModuleReport(
        name=layer.name, kind=layer.kind, shape=tuple(layer.shape), rank=layer.rank,
        scale=layer.scale, sigma=top.sigma.detach().cpu(), max_cos=max_cos.cpu(),
        argmax=top.argmax.detach().cpu(), intruders=intruders,
        residual=top.residual.detach().cpu(), angle_bound=top.angle_bound.detach().cpu(),
        max_cos_bound=top.max_cos_bound.detach().cpu(), converged=bool(top.converged),
        iterations=int(top.iterations), method=str(top.method),
        null_max_cos=null.median, null_max_cos_p99=null.p99,
        alignment=alignment(max_cos, null.median).cpu(), max_cos_lo=lo.cpu(),
        max_cos_hi=hi.cpu(), basis_sensitive=sensitive)
    return LayerResult(layer, top, record)


def detect_layers(layer_set: LayerSet, top_k, epsilon: float, *, cache_dir=None, device=None,
                  progress=True, desc="find_intruders", skip_nonfinite=False,
                  basis_rtol: float = BASIS_RTOL):
    """Analyse every layer of ``layer_set``; returns ``(results, skipped)``. A non-finite weight
    or factor is an error naming the module and tensor, or, with ``skip_nonfinite``, a skipped
    layer with that reason. Warns (:class:`~intruder_ext.calibration.CalibrationWarning`) when
    epsilon does not separate intruders from chance in some layer."""
    spectrum = spectrum_source(cache_dir, layer_set.model)
    results, skipped = [], list(layer_set.skipped)
    for layer in tqdm(layer_set.layers, desc=desc, unit="module", disable=not progress):
        try:
            results.append(analyse_layer(layer, spectrum, top_k, epsilon, device, basis_rtol))
        except NonFiniteError as e:
            if not skip_nonfinite:
                raise
            skipped.append(Skipped(layer.name, str(e).split(": ", 1)[-1]))
    warn_below_null([r.record for r in results], epsilon, stacklevel=3)
    return results, skipped


def layer_sources(func: str, model, tuned_model, adapter_name, modules) -> LayerSet:
    """The layers of whatever was passed: a PeftModel, a (base, tuned) pair of models, or a
    base checkpoint with an adapter or fully fine-tuned checkpoint (paths or Hub ids)."""
    if isinstance(model, (str, os.PathLike)):
        if not isinstance(tuned_model, (str, os.PathLike)):
            raise ValueError(f"{func}: with a checkpoint path as model, tuned_model must be the "
                             f"adapter or fine-tuned checkpoint's path (got "
                             f"{type(tuned_model).__name__})")
        if adapter_name is not None:
            raise ValueError(f"{func}: adapter_name has no meaning for checkpoints on disk (got "
                             f"{adapter_name!r})")
        return checkpoint_layers(func, model, tuned_model, modules)[0]
    if tuned_model is not None:
        if is_peft_model(model) or is_peft_model(tuned_model):
            raise ValueError(f"{func}: pass either a PeftModel, or (base_model, tuned_model) of "
                             f"plain models for full fine-tuning (got {type(model).__name__} and "
                             f"{type(tuned_model).__name__})")
        if adapter_name is not None:
            raise ValueError(f"{func}: adapter_name={adapter_name!r} has no meaning for a "
                             f"full fine-tuning pair")
        return model_pair_layers(func, model, tuned_model, modules)
    return peft_model_layers(func, model, adapter_name, modules)


def find_intruders(model, tuned_model=None, *, adapter_name=None, top_k=10, epsilon=0.5,
                   modules=None, cache_dir=None, device=None, progress=True,
                   skip_nonfinite=False, basis_rtol=BASIS_RTOL) -> IntruderReport:
    """Find intruder dimensions (Shuttleworth et al., arXiv 2410.21228).

    ``y_j`` (the j-th left singular vector of the tuned weight ``W``, j < top_k) is an intruder
    when ``max_i |cos(y_j, x_i)| < epsilon`` over all left singular vectors ``x_i`` of the base
    weight ``W0``. Vectors live in each layer's output space, as for ``nn.Linear``
    (``Conv1D`` and ``nn.Embedding`` weights are transposed first, see
    :mod:`intruder_ext.layers`); half-precision weights are analysed in float32 or better.

    Args:
        model: a ``peft.PeftModel`` with LoRA adapter(s) (``W = W0 + s B A`` per LoRA layer);
            or the base model of a full fine-tuning pair, with ``tuned_model`` the fine-tuned
            one (every ``nn.Linear``/``Conv1D``/``nn.Embedding`` is compared by name); or a
            base checkpoint (a directory or Hub id ``org/name[@revision]``), with
            ``tuned_model`` a PEFT LoRA adapter or a fully fine-tuned checkpoint: read tensor by
            tensor, no model is built.
        adapter_name: which LoRA adapter of a PeftModel (default: the active one).
        top_k: how many top singular vectors of ``W`` to examine: an int, or a float in (0, 1)
            for that fraction of ``min(m, n)`` (rounded up).
        epsilon: the cosine threshold, a positive number (1 or more flags every vector).
        modules: restrict to these module names (full names, or suffixes such as ``"q_proj"``).
        cache_dir: where base spectra are cached on disk (``None``: the cache's default; a
            :class:`~intruder_ext.cache.SpectrumCache`; ``False``: no cache).
        device: compute there (``"auto"``: CUDA when available; default: where each weight
            lives, the CPU for checkpoints).
        progress: show a tqdm bar over the modules.
        skip_nonfinite: skip (and report as skipped) a module whose weight or factors hold NaN
            or inf, instead of raising ``ValueError`` naming it.
        basis_rtol: base singular values whose consecutive gaps are at most ``basis_rtol``
            times the largest form a group whose vectors any valid basis may rotate; each
            record's ``max_cos_lo``/``max_cos_hi`` is the range of ``max_cos`` over those bases
            (:mod:`intruder_ext.calibration`; 0 groups only exactly equal values).

    Returns an :class:`~intruder_ext.report.IntruderReport`; nothing is changed. Warns
    (:class:`~intruder_ext.calibration.CalibrationWarning`) when ``epsilon`` is at or below what
    a random direction reaches (the 99th percentile of the null) in some module.
    """
    func = "find_intruders"
    top_k = checks.top_k(func, top_k)
    epsilon = checks.epsilon(func, "epsilon", epsilon)
    basis_rtol = checks.basis_rtol(func, basis_rtol)
    device = checks.device(func, device)
    layer_set = layer_sources(func, model, tuned_model, adapter_name, modules)
    results, skipped = detect_layers(layer_set, top_k, epsilon, cache_dir=cache_dir,
                                     device=device, progress=progress,
                                     skip_nonfinite=skip_nonfinite, basis_rtol=basis_rtol)
    return IntruderReport([r.record for r in results], top_k, epsilon, layer_set.adapter_name,
                          skipped, basis_rtol)


@dataclass
class LayerView:
    """What a layer's plots show, from the fast path: the top :data:`VIEW_K` singular values of
    ``W`` and ``W0`` and ``|cos|`` between the top vectors of ``W`` (rows) and of ``W0``."""

    name: str
    sigma_base: torch.Tensor
    sigma_tuned: torch.Tensor
    similarity: torch.Tensor  # (k, k)
    intruders: list[int]


def layer_view(layer: Layer, spectrum, intruders: list[int], device=None,
               k: int = VIEW_K) -> LayerView:
    """The plotted quantities of one layer, ``intruders`` marked: the base spectrum (cached) and
    the top-k of ``W`` by the certified iteration, never two dense SVDs."""
    base = spectrum(layer, device)
    k = min(k, *layer.shape)
    with warnings.catch_warnings():  # a plot needs no certificate: a dense fallback is fine
        warnings.filterwarnings("ignore", r".*did not converge", RuntimeWarning)
        top = _top(layer, base, k, tol=VIEW_TOL)
    sim = top.coords[:k].mT.abs()  # (k, k): |cos(y_j, u_i)|
    return LayerView(layer.name, base.S[:k].detach().float().cpu(),
                     top.sigma.detach().float().cpu(), sim.detach().float().cpu(),
                     list(intruders))
