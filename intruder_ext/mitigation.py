"""Lambda mitigation of intruder dimensions in LoRA adapters, as PEFT's
``reduce_intruder_dimension`` (``peft.tuners.lora.intruders``) does it, without its m x n SVDs.

For the intruders ``I`` of ``W = W0 + s B A`` with singular triplets ``(sigma_j, y_j, z_j)``,
``W' = W + (lambda - 1) sum_{j in I} sigma_j y_j z_j^T`` and the new adapter stores
``(W' - W0) / s``, which is the rank-(r + |I|) product

    [B, (lambda - 1)/s * Y_I diag(S_I)] @ [A ; Z_I^T].

Its SVD comes from :func:`intruder_ext.spectral.lowrank_svds` on those two thin factors (QR of
each and a tiny core SVD, the cores of all layers in one batched call). Keeping the top r triplets, split as
``B' = U sqrt(S)``, ``A' = sqrt(S) Vh``, is PEFT's result (``rank="peft"``); keeping all r + |I|
(``rank="exact"``, per-module ranks through ``rank_pattern``/``alpha_pattern``) is the exact
mitigated update. Two entry points: :func:`reduce_intruder_dimension` on a PeftModel in memory
(PEFT's signature), and :func:`mitigate_checkpoint` on checkpoints on disk, which writes a new
adapter or merged model without building any model.

The control (``control="uniform"``): to tell whether *targeting* the intruders is what helps,
each layer's whole update ``s B A`` is scaled by one factor ``c`` chosen so that the change to
the weight has the same Frobenius norm as the targeted mitigation's (under the same rank
policy): ``(1 - c) ||s B A||_F = ||s (B' A' - B A)||_F``. Its factors are ``sqrt(c) B`` and
``sqrt(c) A`` (rank r, no truncation). Where the targeted change exceeds the whole update (the
intruders' singular values include base-weight energy) ``c`` is 0 and the change falls short;
the record says so. Every record's ``mitigation`` holds the numbers (:func:`_summary`).
"""

from __future__ import annotations

import copy
import math

import torch
from tqdm.auto import tqdm

from . import checks
from .checkpoints import (atomic_directory, check_new_output, save_safetensors, write_json,
                          write_model_like, ADAPTER_SAFETENSORS, ADAPTER_CONFIG)
from .detection import LayerResult, detect_layers
from .layers import (LayerError, checkpoint_layers, copy_peft_extras, pattern_key,
                     peft_model_layers, write_peft_factors, check_adapter)
from .report import IntruderReport
from .spectral import lowrank_svds


def _quiet(*args, **kwargs):
    pass


def _product_norm(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``||X @ Y||_F`` for thin X (m, q) and Y (q, n), from the triangular factors of their QRs
    (in float64: the change of a mitigation can be small against the update)."""
    Rx = torch.linalg.qr(X.double())[1]
    Ry = torch.linalg.qr(Y.double().mT)[1]
    return float((Rx @ Ry.mT).norm())


def mitigated_factors(results: list[LayerResult], mitigation_lambda: float, rank: str,
                      log=_quiet, control=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """New ``(B', A')`` (map orientation) for every layer with intruders, keyed by layer name,
    targeted (``control=None``) or the uniform control (``control="uniform"``, see the module
    doc). Sets every record's ``mitigation`` summary. The small core SVDs of all layers go
    through one batched call per core shape (:func:`~intruder_ext.spectral.lowrank_svds`); each
    layer's factors do not depend on which other layers are mitigated with it.

    A rank the layer cannot hold is handled exactly: with ``rank="peft"`` and ``r > min(m, n)``
    the factors are padded with zero columns (the update has rank at most min(m, n), so nothing
    is lost); with ``rank="exact"``, ``r + |I|`` is clamped to ``min(m, n)``. Both are logged."""
    members = []
    originals = {}
    for res in results:
        if not res.intruders:
            continue
        layer, top = res.layer, res.top
        if layer.scale == 0:
            raise LayerError(f"module {layer.name!r} has LoRA scale 0 (lora_alpha = 0): its "
                             "mitigated update cannot be stored as scale * B @ A")
        B, A = originals[layer.name] = layer.factors(top.U.device, dtype=top.U.dtype)
        idx = torch.tensor(res.intruders, device=top.U.device)
        Y, S, Zt = top.U.index_select(1, idx), top.sigma.index_select(0, idx), \
            top.Vh.index_select(0, idx)
        Bf = torch.cat([B, Y * (S * ((mitigation_lambda - 1.0) / layer.scale))], dim=1)
        Af = torch.cat([A, Zt], dim=0)
        m, n = layer.shape
        full = Bf.shape[1]
        if rank == "peft":
            keep = layer.rank
            if keep > min(m, n):
                log(f"{layer.name}: rank {keep} exceeds min(m, n) = {min(m, n)}; the extra "
                    "columns of the new factors are zero (the update has no higher rank)")
        else:
            keep = min(full, m, n)
            if keep < full:
                log(f"{layer.name}: exact rank r + {len(res.intruders)} = {full} clamped to "
                    f"min(m, n) = {keep} (the update has no higher rank)")
        members.append((layer.name, Bf, Af, keep))
    out = {}
    svds = lowrank_svds([(Bf, Af) for _, Bf, Af, _ in members])
    for (name, _, _, keep), (U, S, Vh) in zip(members, svds):
        root = S.clamp_min(0).sqrt()
        have = min(keep, U.shape[-1])
        B = U[:, :have] * root[:have]
        A = root[:have, None] * Vh[:have]
        if keep > have:  # zero columns: the same product at the rank the adapter expects
            B = torch.cat([B, B.new_zeros(B.shape[0], keep - have)], dim=1)
            A = torch.cat([A, A.new_zeros(keep - have, A.shape[1])], dim=0)
        out[name] = (B, A)
    for res in results:
        layer = res.layer
        if layer.name not in out:
            res.record.mitigation = _summary(control, mitigation_lambda, 0.0, 0.0, 1.0)
            continue
        B, A = originals[layer.name]
        B1, A1 = out[layer.name]
        s = layer.scale
        targeted = abs(s) * _product_norm(torch.cat([B1, -B], dim=1), torch.cat([A1, A]))
        if control is None:
            res.record.mitigation = _summary(control, mitigation_lambda, targeted, targeted,
                                             None)
            continue
        whole = abs(s) * _product_norm(B, A)
        c = 1.0 - targeted / whole
        if c < 0:
            log(f"{layer.name}: the targeted change ({targeted:.4g}) exceeds the whole "
                f"update's norm ({whole:.4g}); the uniform control removes the update")
            c = 0.0
        out[layer.name] = (math.sqrt(c) * B, math.sqrt(c) * A)
        res.record.mitigation = _summary(control, mitigation_lambda, (1.0 - c) * whole,
                                         targeted, c)
    return out


def _summary(control, mitigation_lambda, change, targeted, factor) -> dict:
    """A record's ``mitigation``: which one, lambda, the Frobenius norm of the change it made to
    the layer's weight, the targeted mitigation's (equal to it unless the control could not
    reach it), and the control's factor on the update (None for the targeted one)."""
    return {"control": control or "intruders", "lambda": mitigation_lambda,
            "change_norm": change, "targeted_change_norm": targeted, "uniform_factor": factor}


def exact_patterns(results: list[LayerResult], factors: dict, use_rslora: bool):
    """``rank_pattern``/``alpha_pattern`` entries for the layers whose rank changed, each alpha
    keeping the layer's scale; keys match exactly one module name."""
    ranks, alphas = {}, {}
    for res in results:
        if res.layer.name not in factors:
            continue
        q = factors[res.layer.name][0].shape[1]
        if q == res.layer.rank:
            continue
        key = pattern_key(res.layer.name)
        ranks[key] = q
        alphas[key] = res.layer.scale * (math.sqrt(q) if use_rslora else q)
    return ranks, alphas


def _check_args(func, top_k, threshold_epsilon, mitigation_lambda, rank, device, control):
    return (checks.top_k(func, top_k), checks.epsilon(func, "threshold_epsilon", threshold_epsilon),
            checks.mitigation_lambda(func, mitigation_lambda), checks.rank_policy(func, rank),
            checks.device(func, device), checks.control(func, control))


# ---------------------------------------------------------------------------------- in memory
def _new_config(old_config, results: list[LayerResult], factors: dict, rank: str):
    """The new adapter's LoraConfig: the old one, with per-module ranks (and alphas that keep
    each module's scale) for ``rank="exact"``. Initialisation is skipped (every factor is
    written afterwards; inits such as PiSSA would touch the base weights), and ``bias`` is
    "none": PEFT allows one adapter with biases, and the trained biases live in the base layers,
    shared by every adapter, so the new one needs no copy."""
    cfg = copy.deepcopy(old_config)
    cfg.init_lora_weights = False
    cfg.bias = "none"
    if rank == "exact":
        ranks, alphas = exact_patterns(results, factors, cfg.use_rslora)
        # PEFT takes the first matching key: ours (exact names) must come first.
        cfg.rank_pattern = {**ranks, **(cfg.rank_pattern or {})}
        cfg.alpha_pattern = {**alphas, **(cfg.alpha_pattern or {})}
    return cfg


def reduce_intruder_dimension(peft_model, old_adapter_name="default",
                              new_adapter_name="intruder_reduced", top_k=10, threshold_epsilon=0.5,
                              mitigation_lambda=0.75, logging_sink=print, *, rank="peft",
                              control=None, cache_dir=None, device=None,
                              progress=False) -> IntruderReport:
    """PEFT's ``reduce_intruder_dimension``, fast: same signature, same semantics.

    Adds the adapter ``new_adapter_name`` holding the mitigated update of ``old_adapter_name``
    (which is left untouched) and makes it the active adapter; ``peft_model.set_adapter(old)``
    switches back. Layers without intruders get the old factors unchanged; the new factors take
    the old adapter's dtype and device; ``lora_B`` biases and the trained copies of
    ``modules_to_save`` are carried over. ``threshold_epsilon`` of 1 or more flags every vector,
    as in PEFT.

    Args (beyond PEFT's):
        rank: ``"peft"`` keeps each layer's rank r, the best rank-r approximation, as PEFT does.
            ``"exact"`` keeps rank r + |I| on layers with intruders (through the new config's
            ``rank_pattern``/``alpha_pattern``, with the same scale), so the stored update is the
            mitigated one up to round-off.
        control: ``None`` (the mitigation above), or ``"uniform"``: the control, which scales
            each layer's whole update by one factor so that the weight changes by the same
            Frobenius norm as under the targeted mitigation with the same ``rank`` (layers
            without intruders are unchanged, as there). Compare the two to check that targeting
            the intruders is what helps.
        cache_dir, device, progress: as for :func:`intruder_ext.find_intruders`.

    Returns the :class:`IntruderReport` of ``old_adapter_name`` that drove the mitigation; each
    record's ``mitigation`` holds the norm of the change made to its layer.
    All arguments are checked before anything changes; if anything fails midway the new adapter
    is removed again and the model is as before.
    """
    return _reduce("reduce_intruder_dimension", peft_model, old_adapter_name, new_adapter_name,
                   top_k, threshold_epsilon, mitigation_lambda, logging_sink, rank, cache_dir,
                   device, progress, control)


def _reduce(func, peft_model, old_adapter_name, new_adapter_name, top_k, threshold_epsilon,
            mitigation_lambda, logging_sink, rank, cache_dir, device, progress, control=None):
    top_k, epsilon, lam, rank, device, control = _check_args(
        func, top_k, threshold_epsilon, mitigation_lambda, rank, device, control)
    old = check_adapter(func, "old_adapter_name", peft_model, old_adapter_name)
    if not isinstance(new_adapter_name, str) or not new_adapter_name:
        raise ValueError(f"{func}: new_adapter_name must be a non-empty string "
                         f"(got {new_adapter_name!r})")
    if new_adapter_name in peft_model.peft_config:
        raise ValueError(f"{func}: new_adapter_name={new_adapter_name!r} already exists "
                         f"(adapters: {list(peft_model.peft_config)})")
    sink = logging_sink if logging_sink is not None else _quiet
    layer_set = peft_model_layers(func, peft_model, old)

    # Everything that can fail on the maths happens before the model is touched.
    results, _ = detect_layers(layer_set, top_k, epsilon, cache_dir=cache_dir, device=device,
                               progress=progress, desc=func)
    factors = mitigated_factors(results, lam, rank, sink, control)
    config = _new_config(peft_model.peft_config[old], results, factors, rank)

    active_before = list(peft_model.active_adapters)
    try:
        peft_model.add_adapter(new_adapter_name, config)
        for res in results:
            layer = res.layer
            if layer.name in factors:
                sink(f"{layer.name}: Intruders: {len(res.intruders)}")
                write_peft_factors(layer, new_adapter_name, *factors[layer.name], like=old)
            else:
                sink(f"{layer.name}: No intruders")
                write_peft_factors(layer, new_adapter_name, *layer.factors(), like=old)
            got = float(layer.module.scaling[new_adapter_name])
            if not math.isclose(got, layer.scale, rel_tol=1e-6):
                raise RuntimeError(f"{func}: module {layer.name!r} got scale {got} in the new "
                                   f"adapter, expected {layer.scale}")
        copy_peft_extras(peft_model, layer_set.layers, old, new_adapter_name)
        sink(f"Enabling new adapter {new_adapter_name}")
        peft_model.set_adapter(new_adapter_name)
    except BaseException:
        if new_adapter_name in peft_model.peft_config:
            peft_model.delete_adapter(new_adapter_name)
        if list(peft_model.active_adapters) != active_before and len(active_before) == 1:
            peft_model.set_adapter(active_before[0])
        raise
    return IntruderReport([r.record for r in results], top_k, epsilon, old)


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
    adapter_name = check_adapter(func, "adapter_name", peft_model, adapter_name)
    tmp = adapter_name + "_intruder_reduced"
    while tmp in peft_model.peft_config:
        tmp += "_"
    _reduce(func, peft_model, adapter_name, tmp, top_k, threshold_epsilon, mitigation_lambda,
            logging_sink, rank, cache_dir, device, progress)
    return peft_model.merge_and_unload(adapter_names=[tmp])


# ---------------------------------------------------------------------------------- on disk
def mitigate_checkpoint(base, adapter, out, *, top_k=10, threshold_epsilon=0.5,
                        mitigation_lambda=0.75, rank="peft", control=None, merge=False,
                        cache_dir=None, device=None, progress=True,
                        logging_sink=None) -> IntruderReport:
    """Mitigate the LoRA adapter ``adapter`` (a directory or Hub id) of the base checkpoint
    ``base`` and write the result to the new directory ``out``, without building any model.

    Writes a PEFT adapter (``adapter_config.json`` with per-module ``rank_pattern`` and
    ``alpha_pattern`` where ranks change, and ``adapter_model.safetensors`` in the adapter's own
    dtypes), or with ``merge=True`` the merged model as safetensors shards in BASE's layout and
    dtype, with its index, config and tokenizer files. Layers are read and analysed one at a
    time and the merged model is written one tensor at a time, so memory is bounded by a layer,
    not by the model. ``out`` is checked before any work and written atomically: it holds the
    complete result or does not exist. Arguments as for :func:`reduce_intruder_dimension`.
    Returns the report of the original adapter.
    """
    func = "mitigate"
    top_k, epsilon, lam, rank, device, control = _check_args(
        func, top_k, threshold_epsilon, mitigation_lambda, rank, device, control)
    sink = logging_sink if logging_sink is not None else _quiet
    layer_set, ckpt = checkpoint_layers(func, base, adapter, tuned_label="ADAPTER",
                                        side_files=merge)
    out = check_new_output(out, "--out", layer_set.inputs, directory=True)
    if merge:
        ckpt.check_mergeable()
    results, skipped = detect_layers(layer_set, top_k, epsilon, cache_dir=cache_dir,
                                     device=device, progress=progress, desc=func)
    factors = {}
    for res in results:  # one layer at a time: only the new factors are kept
        factors.update({name: (B.cpu(), A.cpu())
                        for name, (B, A) in mitigated_factors([res], lam, rank, sink,
                                                              control).items()})
        res.top = None
    with atomic_directory(out) as tmp:
        if merge:
            bar = tqdm(total=len(ckpt.base.store.keys()), desc="writing", unit="tensor",
                       disable=not progress)
            with bar:
                write_model_like(tmp, ckpt.base, lambda key: ckpt.merged_tensor(key, factors),
                                 bar)
        else:
            config = dict(ckpt.adapter.raw_config)
            if rank == "exact":
                ranks, alphas = exact_patterns(results, factors, ckpt.config["use_rslora"])
                config["rank_pattern"] = {**ranks, **ckpt.config["rank_pattern"]}
                config["alpha_pattern"] = {**alphas, **ckpt.config["alpha_pattern"]}
            tensors = ckpt.adapter_tensors(factors)
            save_safetensors(tmp / ADAPTER_SAFETENSORS, tensors)
            write_json(tmp / ADAPTER_CONFIG, config)
    return IntruderReport([r.record for r in results], top_k, epsilon, "default", skipped)
