"""Lambda mitigation of intruder dimensions in LoRA adapters, as PEFT's
``reduce_intruder_dimension`` (``peft.tuners.lora.intruders``) does it, without its m x n SVDs.

For the intruders ``I`` of ``W = W0 + s B A`` with singular triplets ``(sigma_j, y_j, z_j)``,
``W' = W + (lambda - 1) sum_{j in I} sigma_j y_j z_j^T`` and the new adapter stores
``(W' - W0) / s``, which is the rank-(r + |I|) product

    [B, (lambda - 1)/s * Y_I diag(S_I)] @ [A ; Z_I^T].

Its SVD comes from :func:`intruder_ext.spectral.lowrank_svd` on those two thin factors (QR of
each and a tiny core SVD, same-shaped layers batched). Keeping the top r triplets, split as
``B' = U sqrt(S)``, ``A' = sqrt(S) Vh``, is PEFT's result (``rank="peft"``); keeping all r + |I|
(``rank="exact"``, per-module ranks through ``rank_pattern``/``alpha_pattern``) is the exact
mitigated update.
"""

from __future__ import annotations

import copy
import math
from numbers import Real

import torch

from . import peft_layers
from .detection import LayerResult, check_epsilon, check_top_k, detect_lora
from .report import IntruderReport
from .spectral import lowrank_svd

_RANK_POLICIES = ("peft", "exact")


def _check_lambda(func: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{func}: mitigation_lambda must be a finite number >= 0 (got {value!r})")
    return float(value)


def mitigated_factors(results: list[LayerResult], B_A: dict, mitigation_lambda: float,
                      rank: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """New ``(B', A')`` for every layer with intruders, keyed by module name.

    ``B_A[name]`` holds the old ``(B, A)`` in map orientation. Layers whose stacked factors have
    the same shapes, dtype and device share one :func:`lowrank_svd` call.
    """
    groups: dict[tuple, list[tuple[str, torch.Tensor, torch.Tensor, int]]] = {}
    for res in results:
        if not res.intruders:
            continue
        B, A = B_A[res.target.name]
        idx = torch.tensor(res.intruders, device=res.top.U.device)
        Y = res.top.U.index_select(1, idx).to(B.dtype)
        S = res.top.sigma.index_select(0, idx).to(B.dtype)
        Zt = res.top.Vh.index_select(0, idx).to(A.dtype)
        Bf = torch.cat([B, Y * (S * ((mitigation_lambda - 1.0) / res.scale))], dim=1)
        Af = torch.cat([A, Zt], dim=0)
        # Exact: all r + |I| columns (lowrank_svd returns at most min(m, n) of them).
        keep = res.rank if rank == "peft" else Bf.shape[1]
        key = (tuple(Bf.shape), tuple(Af.shape), Bf.dtype, Bf.device)
        groups.setdefault(key, []).append((res.target.name, Bf, Af, keep))
    out = {}
    for members in groups.values():
        U, S, Vh = lowrank_svd(torch.stack([m[1] for m in members]),
                               torch.stack([m[2] for m in members]))
        root = S.clamp_min(0).sqrt()
        for i, (name, _, _, keep) in enumerate(members):
            out[name] = (U[i, :, :keep] * root[i, :keep], root[i, :keep, None] * Vh[i, :keep])
    return out


def _new_config(old_config, results: list[LayerResult], factors: dict, rank: str):
    """The new adapter's LoraConfig: the old one, with per-module ranks (and alphas that keep
    each module's scale) for ``rank="exact"``. Initialisation is skipped: every factor is
    written afterwards, and inits such as PiSSA would otherwise touch the base weights."""
    cfg = copy.deepcopy(old_config)
    cfg.init_lora_weights = False
    if rank == "exact":
        ranks, alphas = {}, {}
        for res in results:
            if res.target.name not in factors:
                continue
            q = factors[res.target.name][0].shape[1]
            key = peft_layers.pattern_key(res.target.name)
            ranks[key] = q
            alphas[key] = res.scale * (math.sqrt(q) if cfg.use_rslora else q)
        # PEFT takes the first matching key: ours (exact names) must come first.
        cfg.rank_pattern = {**ranks, **(cfg.rank_pattern or {})}
        cfg.alpha_pattern = {**alphas, **(cfg.alpha_pattern or {})}
    return cfg


def reduce_intruder_dimension(peft_model, old_adapter_name="default",
                              new_adapter_name="intruder_reduced", top_k=10, threshold_epsilon=0.5,
                              mitigation_lambda=0.75, logging_sink=print, *, rank="peft",
                              cache_dir=None, device=None, progress=False) -> IntruderReport:
    """PEFT's ``reduce_intruder_dimension``, fast: same signature, same semantics.

    Adds the adapter ``new_adapter_name`` holding the mitigated update of ``old_adapter_name``
    (which is left untouched) and makes it the active adapter; ``peft_model.set_adapter(old)``
    switches back. Layers without intruders get the old factors unchanged; the trained copies
    of ``modules_to_save`` are carried over to the new adapter.

    Args (beyond PEFT's):
        rank: ``"peft"`` keeps each layer's rank r, the best rank-r approximation, as PEFT does.
            ``"exact"`` keeps rank r + |I| on layers with intruders (through the new config's
            ``rank_pattern``/``alpha_pattern``, with the same scale), so the stored update is the
            mitigated one up to float32 round-off.
        cache_dir, device, progress: as for :func:`intruder_ext.find_intruders`.

    Returns the :class:`IntruderReport` of ``old_adapter_name`` that drove the mitigation.
    All arguments are checked before anything changes; if anything fails midway the new adapter
    is removed again and the model is as before.
    """
    return _reduce("reduce_intruder_dimension", peft_model, old_adapter_name, new_adapter_name,
                   top_k, threshold_epsilon, mitigation_lambda, logging_sink, rank, cache_dir,
                   device, progress)


def _reduce(func, peft_model, old_adapter_name, new_adapter_name, top_k, threshold_epsilon,
            mitigation_lambda, logging_sink, rank, cache_dir, device, progress):
    top_k = check_top_k(func, top_k)
    epsilon = check_epsilon(func, "threshold_epsilon", threshold_epsilon)
    lam = _check_lambda(func, mitigation_lambda)
    if rank not in _RANK_POLICIES:
        raise ValueError(f"{func}: rank must be one of {_RANK_POLICIES} (got {rank!r})")
    old = peft_layers.check_adapter(func, "old_adapter_name", peft_model, old_adapter_name)
    if not isinstance(new_adapter_name, str) or not new_adapter_name:
        raise ValueError(f"{func}: new_adapter_name must be a non-empty string "
                         f"(got {new_adapter_name!r})")
    if new_adapter_name in peft_model.peft_config:
        raise ValueError(f"{func}: new_adapter_name={new_adapter_name!r} already exists "
                         f"(adapters: {list(peft_model.peft_config)})")
    sink = logging_sink if logging_sink is not None else (lambda *a, **k: None)
    targets = peft_layers.lora_targets(func, peft_model, old)

    # Everything that can fail on the maths happens before the model is touched.
    results = detect_lora(targets, old, top_k, epsilon, cache_dir=cache_dir, device=device,
                          progress=progress, desc=func)
    B_A = {r.target.name: r.target.factors(old, r.top.U.device) for r in results if r.intruders}
    factors = mitigated_factors(results, B_A, lam, rank)
    config = _new_config(peft_model.peft_config[old], results, factors, rank)

    active_before = list(peft_model.active_adapters)
    try:
        peft_model.add_adapter(new_adapter_name, config)
        for res in results:
            t = res.target
            if t.name in factors:
                sink(f"{t.name}: Intruders: {len(res.intruders)}")
                t.write_factors(new_adapter_name, *factors[t.name])
            else:
                sink(f"{t.name}: No intruders")
                t.copy_adapter(old, new_adapter_name)
            t.copy_bias(old, new_adapter_name)
            if not math.isclose(t.scale(new_adapter_name), res.scale, rel_tol=1e-6):
                raise RuntimeError(f"{func}: module {t.name!r} got scale "
                                   f"{t.scale(new_adapter_name)} in the new adapter, expected "
                                   f"{res.scale}")
        _copy_modules_to_save(peft_model, old, new_adapter_name)
        sink(f"Enabling new adapter {new_adapter_name}")
        peft_model.set_adapter(new_adapter_name)
    except BaseException:
        if new_adapter_name in peft_model.peft_config:
            peft_model.delete_adapter(new_adapter_name)
        if list(peft_model.active_adapters) != active_before and len(active_before) == 1:
            peft_model.set_adapter(active_before[0])
        raise
    return IntruderReport([r.report() for r in results], top_k, epsilon, old)


def _copy_modules_to_save(peft_model, old: str, new: str) -> None:
    # PEFT's add_adapter copies modules_to_save from the *original* module; the new adapter
    # should carry the old adapter's trained copy instead.
    from peft.utils import ModulesToSaveWrapper

    for module in peft_model.modules():
        if isinstance(module, ModulesToSaveWrapper) and old in module.modules_to_save \
                and new in module.modules_to_save:
            module.modules_to_save[new].load_state_dict(module.modules_to_save[old].state_dict())


def merge_and_unload_with_reduced_intruder_dimensions(peft_model, adapter_name="default", top_k=10,
                                                      threshold_epsilon=0.5,
                                                      mitigation_lambda=0.75, *, rank="exact",
                                                      logging_sink=None, cache_dir=None,
                                                      device=None, progress=False):
    """Mitigate ``adapter_name`` and merge it: returns the base model whose weights are
    ``W0 + dW'`` (the LoRA wrappers removed, as ``merge_and_unload`` does).

    ``rank="exact"`` (default) merges the mitigated update itself; ``rank="peft"`` merges its
    rank-r approximation, as merging PEFT's mitigated adapter would.
    """
    func = "merge_and_unload_with_reduced_intruder_dimensions"
    adapter_name = peft_layers.check_adapter(func, "adapter_name", peft_model, adapter_name)
    tmp = adapter_name + "_intruder_reduced"
    while tmp in peft_model.peft_config:
        tmp += "_"
    _reduce(func, peft_model, adapter_name, tmp, top_k, threshold_epsilon, mitigation_lambda,
            logging_sink, rank, cache_dir, device, progress)
    return peft_model.merge_and_unload(adapter_names=[tmp])
