"""Initialisation of a LoRA adapter from its base weights' spectra: PiSSA (the principal
singular triplets) and MiLoRA (the minor ones), from the base-spectrum cache.

For a layer ``W0 = U diag(S) V^T`` (map orientation, :mod:`intruder_ext.layers`), rank r and
scale ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA), take r triplets
``(sigma_j, u_j, v_j)`` (the top r for ``"principal"``, the bottom r for ``"minor"``) and set,
as PEFT's ``init_lora_weights="pissa"`` does,

    B = U_r diag(sqrt(sigma / s)),   A = diag(sqrt(sigma / s)) V_r^T,

so that ``s B A = U_r diag(sigma) V_r^T``, and write the residual ``W0 - s B A`` into the base
weight: the model computes the same function as before.

The cache holds ``U`` and ``S`` (for a tall weight, V and S, with ``u_j = W0 v_j / s_j`` formed
in float64: :class:`~intruder_ext.spectral.BaseSpectrum`); the r right vectors are derived from
``W0`` in float64: ``W0^T u_j = sigma_j v_j``, so ``sigma_j = ||W0^T u_j||`` and ``v_j = W0^T u_j /
sigma_j``. Taking sigma_j from that norm rather than from the cached S makes every ``v_j`` a unit
vector and the split exactly balanced (``||B[:, j]|| = ||A[j]||``), and ``s B A = U_r U_r^T W0``
holds whatever the rounding of the cached vectors: the projection of W0 on their span.

Numerically zero singular values (a rank-deficient weight in ``"minor"`` mode). A cached vector
carries the rounding of the cache's dtype (a left-form entry), so ``||W0^T u_j||`` cannot
resolve a singular value below about ``eps * S[0]`` (``eps`` of float32 for the default cache;
the float64 Gram eigensolver resolves 1e-8 of ``S[0]``): such a ``v_j`` would be rounding noise.
Those pairs are set to zero, exactly as PEFT's PiSSA sets the pair of a zero singular value
(``sqrt(0) = 0``), their ``W0^T u_j`` stays in the residual, and a warning names the layer: a
pair that starts at zero gets no gradient (each factor's gradient is proportional to the other),
so those directions will not train; a smaller r, or ``"principal"``, avoids them.

dtypes. The factors are computed in float64 from W0 (PEFT uses float32) and stored in the
adapter's own dtype (a bfloat16 adapter stays bfloat16). The residual is computed as PEFT computes
it, in float32 (float64 for a float64 base), from the factors *as stored* (after their rounding,
so that ``residual + s B A`` is W0 up to the residual's own rounding), and stored in the base
weight's dtype: in float64 it would cost a float64 copy of every weight, to be rounded to the
base dtype anyway.
"""

from __future__ import annotations

import warnings
from collections import Counter

import torch

from . import checks
from .detection import spectrum_source
from .layers import Layer, LayerError, peft_factor_params, peft_model_layers, to_stored, \
    write_peft_factors
from .spectral import BaseSpectrum

__all__ = ["init_lora_from_spectrum", "spectral_factors"]

_F64 = torch.float64
# The float64 Gram eigensolver of base_spectrum resolves singular values down to about this
# fraction of the largest (see intruder_ext.spectral.base_spectrum).
_GRAM_RESOLUTION = 1e-8


def spectral_factors(base: BaseSpectrum, rank: int, scale: float, mode: str):
    """``(B, A, sigma)`` in float64, map orientation: the balanced factors of the top
    (``"principal"``) or bottom (``"minor"``) ``rank`` singular triplets of ``base.weight`` with
    ``scale * B @ A = U_r diag(sigma) V_r^T``, and the singular values used (in the cached
    order, descending; zero where not resolved, see the module docstring)."""
    W0 = base.weight.to(_F64)
    p = base.S.shape[0]
    cols = slice(0, rank) if mode == "principal" else slice(p - rank, p)
    U = base.columns(cols, W0)
    WtU = W0.mT @ U  # (n, r): column j is sigma_j v_j
    sigma = WtU.norm(dim=0)
    floor = max(torch.finfo(base.dtype).eps, _GRAM_RESOLUTION) * float(base.S[0])
    resolved = sigma > floor
    sigma = torch.where(resolved, sigma, 0.0)
    B = U * (sigma / scale).sqrt()
    # A[j] = sqrt(sigma_j / s) v_j^T = (W0^T u_j)^T / sqrt(sigma_j s); 0 for an unresolved pair
    # (where() picks 0 before the inf of rsqrt(0) can reach a product).
    inv = torch.where(resolved, (sigma * scale).rsqrt(), 0.0)
    A = (WtU * inv).mT
    return B, A, sigma


def _check_layers(func: str, peft_model, layers: list[Layer]) -> None:
    """Everything that would make a layer fail, checked before any weight is written."""
    uses = Counter(id(p) for _, p in peft_model.named_parameters(remove_duplicate=False))
    for layer in layers:
        m, n = layer.shape
        if layer.rank > min(m, n):
            raise LayerError(f"{func}: module {layer.name!r} has rank {layer.rank} but its "
                             f"weight ({m}, {n}) has only min(m, n) = {min(m, n)} singular "
                             "triplets")
        if not layer.scale > 0:
            raise LayerError(f"{func}: module {layer.name!r} has LoRA scale {layer.scale} "
                             "(lora_alpha <= 0): the balanced factors need a positive scale")
        if layer.module.merged_adapters:
            raise LayerError(f"{func}: module {layer.name!r} has adapters merged into its base "
                             f"weight ({layer.module.merged_adapters}); unmerge them first")
        weight = layer.module.get_base_layer().weight
        if uses[id(weight)] > 1:
            raise LayerError(f"{func}: the base weight of module {layer.name!r} is shared with "
                             "another module (tied weights): writing the residual would change "
                             "that module too")
        layer.base_weight()  # raises NonFiniteError naming the module


def init_lora_from_spectrum(peft_model, adapter_name="default", mode="principal", *,
                            freeze_A=False, cache_dir=None, device=None,
                            modules=None) -> list[dict]:
    """Initialise the LoRA adapter ``adapter_name`` of a PeftModel from its base weights'
    singular triplets, in place: PiSSA (``mode="principal"``, the top r) or MiLoRA
    (``mode="minor"``, the bottom r); see the module docstring for the maths.

    Each LoRA layer of the adapter (or of ``modules``) gets balanced factors with
    ``s B A = U_r diag(S_r) V_r^T`` and its base weight becomes the residual ``W0 - s B A``, so
    the model's outputs are unchanged. With ``mode="principal"`` the adapter and residual are
    those of PEFT's ``init_lora_weights="pissa"`` (up to the sign of each singular pair), from
    the cached base spectrum instead of an SVD per layer. Base spectra come from the same cache
    as detection (``cache_dir``: a path, a :class:`~intruder_ext.cache.SpectrumCache`, ``None``
    for its default, ``False`` for none), keyed by the weight *before* the residual is written.

    Other adapters on the same layers see the residual too (their base weight changed); the
    adapter keeps its dtype and device, the base weights theirs. Linear, Conv1D
    (``fan_in_fan_out``) and embedding layers are handled (PEFT's PiSSA skips embeddings);
    DoRA, rank > min(m, n), merged adapters and tied base weights are refused.

    Args:
        freeze_A: set ``requires_grad=False`` on each ``lora_A`` (LoRA-FA); ``False`` leaves it
            as it is.
        device: compute there (``"auto"``: CUDA when available; default: where each weight
            lives).
        modules: only these module names (full names or suffixes such as ``"q_proj"``).

    Returns one dict per layer: ``name``, ``kind``, ``shape`` (map orientation), ``rank``,
    ``mode``, ``scale``, ``sigma`` (the singular values used), ``energy`` (their
    share of ``||W0||_F^2``), ``unresolved`` (how many were numerically zero) and ``frozen_A``.
    Every argument and layer is checked before the first weight is written.
    """
    func = "init_lora_from_spectrum"
    mode = checks.init_mode(func, mode)
    freeze_A = checks.flag(func, "freeze_A", freeze_A)
    device = checks.device(func, device)
    layer_set = peft_model_layers(func, peft_model, adapter_name, modules)
    adapter = layer_set.adapter_name
    _check_layers(func, peft_model, layer_set.layers)
    spectrum = spectrum_source(cache_dir, layer_set.model)

    records = []
    for layer in layer_set.layers:
        base = spectrum(layer, device)
        B, A, sigma = spectral_factors(base, layer.rank, layer.scale, mode)
        write_peft_factors(layer, adapter, B, A, like=adapter)
        # The residual from the factors as stored, so that residual + s B A is W0 even where
        # the adapter's dtype rounded them.
        work = _F64 if base.weight.dtype == _F64 else torch.float32
        B_kept, A_kept = layer.factors(base.device, dtype=work)
        residual = torch.addmm(base.weight.to(work), B_kept, A_kept, alpha=-layer.scale)
        with torch.no_grad():
            layer.module.get_base_layer().weight.copy_(to_stored(layer.kind, residual))
        if freeze_A:
            peft_factor_params(layer.module, adapter)[1].requires_grad_(False)
        unresolved = int((sigma == 0).sum())
        if unresolved:
            warnings.warn(f"{func}: module {layer.name!r}: {unresolved} of the {layer.rank} "
                          f"{mode} singular values are numerically zero (a rank-deficient "
                          "weight); their factor pairs are zero and will get no gradient",
                          RuntimeWarning, stacklevel=2)
        total = float((base.S.to(_F64) ** 2).sum())  # ||W0||_F^2
        records.append({
            "name": layer.name, "kind": layer.kind, "shape": list(layer.shape),
            "rank": layer.rank, "mode": mode, "scale": layer.scale,
            "sigma": sigma.tolist(),
            "energy": float((sigma ** 2).sum()) / total if total > 0 else 0.0,
            "unresolved": unresolved, "frozen_A": freeze_A})
    return records
