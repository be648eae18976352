"""LoRA extraction: the best rank-r approximation of a full fine-tune's update, as a PEFT adapter.

For every weight that differs between a base checkpoint and a fully fine-tuned one, the update
``D = W - W0`` (map orientation, m x n) is approximated by its top-r singular triplets (the
Eckart-Young optimum ``D_r = U_r diag(s) V_r^T``) and stored as a LoRA pair with scale 1
(``lora_alpha = r``): ``B = U_r diag(sqrt(s))`` (m, r) and ``A = diag(sqrt(s)) V_r^T`` (r, n).

The triplets come from the certified engine of :mod:`intruder_ext.spectral`, not from a dense
SVD of D: a float32 block Krylov iteration on the Gram matrix of the short side (``D D^T`` when
m <= n, else ``D^T D``) started from a random block finds the subspace, then the float64 block
Krylov iteration on the true Gram matrix certifies (and refines) it. Each product costs
O(m n b) for a block of b ~ 2r vectors, against O(m n min(m, n)) for a dense SVD.

Certificate. For the i-th triplet, with ``v_i = D^T u_i / s_i`` (m <= n; the roles swap
otherwise), ``D^T u_i - s_i v_i = 0`` by construction and ``||D v_i - s_i u_i|| / s_i =
||D D^T u_i - s_i^2 u_i|| / s_i^2``: the own-relative residual the engine certifies. Some
singular value of D lies within ``residual_i * s_i`` of ``s_i``. A layer is converged when every
residual is at most ``tol`` (default 1e-4); otherwise it is recomputed by a float64 dense SVD
with a warning (``on_failure="dense"``) or an error is raised (``"raise"``). Singular values
below 1e-6 of the largest (a difference of lower rank than asked) are stored as zero: their
vectors are not determined by D, and their energy is below 1e-12 of the layer's.

Error. The returned approximation is ``P D`` with P the orthogonal projection on span(u_1..u_r),
so ``||D - D_r||_F^2 = ||D||_F^2 - sum s_i^2`` exactly (Pythagoras): the reported relative error
``sqrt(||D||_F^2 - sum s_i^2) / ||D||_F`` is the error of the factors computed (in float64,
before rounding to the adapter's dtype), whether or not they are the optimum. With Ritz values
``s_i`` never above the true ``sigma_i``, it is at least the optimum's, and the certificate
bounds the difference.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import checks, ops
from .checkpoints import (ADAPTER_CONFIG, ADAPTER_SAFETENSORS, CheckpointError, ModelDirectory,
                          atomic_directory, atomic_file, check_new_output, is_model_dir, resolve,
                          save_safetensors, write_json)
from .layers import (LayerError, Skipped, checkpoint_pair_layers, natural_key, pattern_key,
                     peft_factor_keys)
from .report import text_table
from .spectral import _default_block, _eig_topk, _Eig, _Gram64, _thin_mm

__all__ = ["ExtractionReport", "LayerExtraction", "LowRankApproximation", "extract_lora",
           "lowrank_approximation", "open_checkpoints"]

_F64 = torch.float64
FUNC = "extract_lora"
# Singular values below this fraction of the largest are stored as zero (see the module doc):
# through the Gram matrix they are resolved only to about 1e-8 of the largest.
_NEGLIGIBLE = 1e-6
# The float32 stage only finds the subspace: tested relative to the largest eigenvalue, which
# is what float32 can reach on any spectrum; the float64 stage certifies each vector.
_WARM_TOL = 1e-5
_ON_FAILURE = ("dense", "raise")
# Default tolerance of each triplet's residual: every singular value within 1e-4 of its own
# size. The error of the approximation is second order in the residuals (Ritz values of a
# subspace), so it is then optimal to far better than 1e-4 (tests: within 1e-6 relative);
# the 1e-6 of spectral.py buys nothing here and costs float64 restarts inside flat (noise)
# parts of an update's spectrum.
_DEFAULT_TOL = 1e-4


class NotCertifiedError(LayerError):
    """A layer's approximation did not meet the certificate's tolerance and
    ``on_failure="raise"`` was asked for (a LayerError: the command line reports it in one
    line)."""


@dataclass
class LowRankApproximation:
    """Top-``rank`` singular triplets of an update D (m x n), in float64: ``U`` (m, rank),
    ``S`` (rank,) descending, ``Vh`` (rank, n); ``frobenius_sq`` is ``||D||_F^2``. ``residual``
    holds each triplet's certificate (module doc), ``converged`` whether all met ``tol``,
    ``iterations`` the block Krylov restarts (both stages), ``method`` ``"subspace"`` or
    ``"dense"``."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    frobenius_sq: float
    residual: Tensor
    converged: bool
    iterations: int
    method: str

    def retained(self, rank: int | None = None) -> float:
        """Fraction of ``||D||_F^2`` kept by the top ``rank`` triplets (default all)."""
        s = self.S[:rank]
        return float((s * s).sum()) / self.frobenius_sq

    def error(self, rank: int | None = None) -> float:
        """``||D - D_rank||_F / ||D||_F`` of the top ``rank`` triplets (module doc)."""
        return math.sqrt(max(0.0, 1.0 - self.retained(rank)))

    def factors(self, rank: int | None = None) -> tuple[Tensor, Tensor]:
        """Balanced LoRA factors of the top ``rank`` triplets: ``B = U sqrt(S)`` (m, rank) and
        ``A = sqrt(S) Vh`` (rank, n), float64, with ``B @ A = U diag(S) Vh``."""
        root = self.S[:rank].sqrt()
        return self.U[:, :rank] * root, root[:, None] * self.Vh[:rank]


def _check_solver(func: str, rank, tol, max_iter, on_failure) -> tuple[int, float, int, str]:
    rank = checks.positive_int(func, "rank", rank)
    if tol is None:
        tol = _DEFAULT_TOL
    elif isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < math.inf:
        raise ValueError(f"{func}: tol must be a positive number (got {tol!r})")
    max_iter = checks.positive_int(func, "max_iter", max_iter)
    if on_failure not in _ON_FAILURE:
        raise ValueError(f"{func}: on_failure must be one of {_ON_FAILURE} (got {on_failure!r})")
    return rank, float(tol), max_iter, on_failure


def lowrank_approximation(D: Tensor, rank: int, *, tol: float | None = None, max_iter: int = 100,
                          on_failure: str = "dense") -> LowRankApproximation:
    """Certified best rank-``rank`` approximation of ``D`` (m x n, any floating dtype, any
    device), computed without a dense SVD of D (module doc). ``rank`` above min(m, n) is
    clamped to it."""
    fn = "lowrank_approximation"
    if not isinstance(D, torch.Tensor) or D.dim() != 2 or not D.is_floating_point():
        raise ValueError(f"{fn}: D must be a 2-D floating-point tensor (got "
                         f"{type(D).__name__ if not isinstance(D, torch.Tensor) else D.dtype} "
                         f"of shape {tuple(getattr(D, 'shape', ()))})")
    rank, tol, max_iter, on_failure = _check_solver(fn, rank, tol, max_iter, on_failure)
    D = D.detach()
    if not bool(torch.isfinite(D).all()):
        raise ValueError(f"{fn}: D has non-finite entries (NaN or inf)")
    m, n = D.shape
    if min(m, n) == 0:
        raise ValueError(f"{fn}: D must be non-empty (got shape {(m, n)})")
    # Iterate on the Gram matrix of the short side: its vectors are the short ones, and its
    # products cost the same. ``M`` is D or D^T so that M M^T is that Gram matrix.
    M = D if m <= n else D.mT
    p = M.shape[0]
    k = min(rank, p)
    gram = _Gram64(M)
    frobenius_sq = float((gram.W0 * gram.W0).sum())
    if frobenius_sq == 0:
        raise ValueError(f"{fn}: D is zero: there is nothing to approximate")
    M32 = M.to(torch.float32)

    def gram32(X: Tensor):
        return _thin_mm(M32, _thin_mm(M32.mT, X)), None

    block = _default_block(k, p)
    generator = torch.Generator(device=D.device).manual_seed(0)
    start = torch.randn(p, block, generator=generator, device=D.device)
    # _eig_topk(..., k - 1) tests and returns exactly k pairs: the extra pair it adds to its k
    # gives spectral's gap estimates, which extraction does not need; testing it would make a
    # layer wait for the (k+1)-th vector, slow to converge inside a flat (noise) spectrum.
    warm = _eig_topk(gram32, start, k - 1, block=block, tol=_WARM_TOL, max_iter=max_iter,
                     floor=1.0)
    eig = _eig_topk(gram, warm.X.to(_F64), k - 1, block=block, tol=tol, max_iter=max_iter,
                    floor=_NEGLIGIBLE ** 2, dense_n=0)
    approx = _finish(eig, k, frobenius_sq, m > n, "subspace", warm.iterations + eig.iterations,
                     tol)
    if approx.converged:
        return approx
    msg = (f"{fn}: rank-{k} approximation of a {m}x{n} matrix did not converge: largest "
           f"residual {float(approx.residual.max()):.3g} > tol {tol:.3g} after "
           f"{approx.iterations} iterations (max_iter={max_iter})")
    if on_failure == "raise":
        raise NotCertifiedError(msg)
    warnings.warn(msg + "; falling back to a dense SVD", RuntimeWarning, stacklevel=2)
    return _dense(gram, k, frobenius_sq, m > n, tol)


def _finish(eig: _Eig, k: int, frobenius_sq: float, transposed: bool, method: str,
            iterations: int, tol: float) -> LowRankApproximation:
    """Triplets of D from float64 Ritz pairs of ``M M^T`` (``eig.aux = M^T X``, M = D or D^T)."""
    X, Z = eig.X[:, :k], eig.aux[:, :k]
    sigma = Z.norm(dim=0)
    negligible = sigma <= _NEGLIGIBLE * sigma[0]
    sigma = sigma.masked_fill(negligible, 0.0)
    other = Z / sigma.clamp_min(torch.finfo(_F64).tiny)
    other = other.masked_fill(negligible, 0.0)
    mu = eig.mu[:k]
    residual = eig.rho[:k] / torch.maximum(mu, _NEGLIGIBLE ** 2 * mu[:1]).clamp_min(
        torch.finfo(_F64).tiny)
    residual = residual.masked_fill(negligible, 0.0)
    U, V = (other, X) if transposed else (X, other)
    return LowRankApproximation(U, sigma, V.mT, frobenius_sq, residual,
                                bool((residual <= tol).all()), iterations, method)


def _dense(gram: _Gram64, k: int, frobenius_sq: float, transposed: bool,
           tol: float) -> LowRankApproximation:
    """The fallback: a float64 SVD of the layer, certified the same way."""
    U, S, _ = ops.batched_svd(gram.W0)
    X = U[:, :k]
    GX, Z = gram(X)
    mu = S[:k] * S[:k]
    eig = _Eig(mu, X, (GX - X * mu).norm(dim=0), Z, 0)
    return _finish(eig, k, frobenius_sq, transposed, "dense", 0, tol)


def _policy_rank(approx: LowRankApproximation, policy: str, energy: float | None) -> int:
    """How many triplets a layer keeps: all of them (``fixed``), or the fewest whose retained
    energy reaches ``energy`` (all of them when even they fall short: the cap)."""
    nonzero = max(1, int((approx.S > 0).sum()))
    if policy == "fixed":
        return approx.S.shape[0]
    kept = torch.cumsum(approx.S * approx.S, 0) / approx.frobenius_sq
    reach = int((kept < energy).sum()) + 1
    return min(reach, nonzero)


# ---------------------------------------------------------------------------------- records
@dataclass
class LayerExtraction:
    """One extracted layer: ``name`` (module path), ``kind``, ``shape`` (m, n) in map
    orientation, the ``rank`` stored, ``error`` (relative Frobenius error of the rank-``rank``
    approximation, module doc), ``retained`` (the energy fraction kept), the certificate
    (``residual``: the largest of its triplets; ``converged``, ``iterations``, ``method``) and
    the adapter dtype."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int
    error: float
    retained: float
    residual: float
    converged: bool
    iterations: int
    method: str
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "rank": self.rank, "error": self.error, "retained": self.retained,
                "dtype": self.dtype,
                "certificate": {"residual": self.residual, "converged": self.converged,
                                "iterations": self.iterations, "method": self.method}}


@dataclass
class ExtractionReport:
    """What :func:`extract_lora` did: one record per extracted layer, the differing tensors a
    LoRA adapter cannot carry (``skipped``, with the reason), the names of unchanged weight
    matrices, the adapter config and factors (``factors``: name -> ``(B, A)`` in map
    orientation, in the adapter's dtype), and where it was written (``out``, or None)."""

    layers: list[LayerExtraction]
    skipped: list[Skipped]
    unchanged: list[str]
    rank: int
    rank_policy: str
    config: dict
    factors: dict = field(repr=False)
    out: str | None = None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "rank_policy": self.rank_policy, "out": self.out,
                "layers": [layer.to_dict() for layer in self.layers],
                "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
                "unchanged": list(self.unchanged)}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __str__(self) -> str:
        head = ("module", "shape", "rank", "rel. error", "retained", "cert (max residual)")
        rows = [(r.name, "x".join(map(str, r.shape)), r.rank, f"{r.error:.4g}",
                 f"{r.retained:.4f}",
                 ("ok " if r.converged else "NO ") + f"{r.method} {r.residual:.1e}")
                for r in self.layers]
        lines = [text_table(head, rows)]
        lines.append(f"extracted {len(self.layers)} layers (rank {self.rank}, policy "
                     f"{self.rank_policy}); {len(self.unchanged)} weight matrices unchanged, "
                     f"{len(self.skipped)} differing tensors skipped")
        lines += [f"skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- checkpoints
_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"))


def _task_type(base: ModelDirectory) -> str | None:
    """PEFT's task type where ``config.json`` says it unambiguously (a causal or seq2seq LM
    head), else None: PEFT then wraps the model without a head-specific class, which loads any
    adapter, while a wrong task type (sequence classification adds trainable heads) would not."""
    for arch in base.config.get("architectures") or ():
        for suffix, task in _TASK_TYPES:
            if isinstance(arch, str) and arch.endswith(suffix):
                return task
        if isinstance(arch, str) and arch.endswith("ForConditionalGeneration") \
                and base.config.get("is_encoder_decoder"):
            return "SEQ_2_SEQ_LM"
    return None


def _other_differences(base: ModelDirectory, tuned: ModelDirectory, matrices: set[str]):
    """Every tensor besides the weight matrices: ``(skipped, unchanged)`` where skipped lists
    those that differ (or exist on one side only) with the reason: a LoRA adapter carries
    weight-matrix updates only. Read one at a time (norms and biases: small)."""
    skipped, unchanged = [], []
    base_keys, tuned_keys = set(base.store.keys()), set(tuned.store.keys())
    for key in sorted((base_keys | tuned_keys) - matrices, key=natural_key):
        if key.endswith(".weight") and key[:-len(".weight")] in matrices:
            continue
        if key not in tuned_keys:
            skipped.append(Skipped(key, "only in BASE (missing from TUNED)"))
            continue
        if key not in base_keys:
            if not key.endswith(".weight") or len(tuned.store.info(key)[1]) != 2:
                skipped.append(Skipped(key, "only in TUNED (no base tensor to compare with)"))
            continue  # a 2-D weight only in TUNED: checkpoint_pair_layers reports it
        (b_dtype, b_shape), t_shape = base.store.info(key), tuned.store.info(key)[1]
        if tuple(b_shape) != tuple(t_shape):
            raise CheckpointError(f"TUNED does not match BASE: {key} is {tuple(t_shape)} in "
                                  f"TUNED but {tuple(b_shape)} in BASE")
        if torch.equal(base.store.read(key), tuned.store.read(key).to(b_dtype)):
            unchanged.append(key)
            continue
        what = f"{len(b_shape)}-D tensor" if len(b_shape) != 2 else "2-D tensor that is not a " \
            "floating-point weight matrix"
        skipped.append(Skipped(key, f"differs, but is a {what} (shape {list(b_shape)}): a LoRA "
                                    "adapter cannot carry it"))
    return skipped, unchanged


def open_checkpoints(base, tuned):
    """``(base, tuned)`` model directories, checked to be two different models (the command
    line opens them first to check its --json path against them)."""
    base_dir = resolve(str(base), "BASE")
    tuned_dir = resolve(str(tuned), "TUNED")
    if os.path.realpath(base_dir) == os.path.realpath(tuned_dir):
        raise CheckpointError(f"BASE and TUNED are the same model ({str(base)!r}); extraction "
                              "needs the base model and a fine-tune of it")
    if not is_model_dir(tuned_dir):
        raise CheckpointError(f"TUNED {str(tuned)!r} is not a model directory (no model "
                              "weights); extraction needs a fully fine-tuned checkpoint")
    return ModelDirectory(base_dir, "BASE"), ModelDirectory(tuned_dir, "TUNED")


def extract_lora(base, tuned, rank, out=None, *, rank_policy="fixed", dtype=None, device=None,
                 tol=None, max_iter=100, on_failure="dense", progress=True) -> ExtractionReport:
    """Extract a LoRA adapter from a full fine-tune: for every weight matrix that differs between
    the checkpoints ``base`` and ``tuned`` (directories or Hub ids ``org/name[@revision]``), the
    best rank-``rank`` approximation of ``W - W0``, computed by the certified iteration of the
    module doc; written, when ``out`` is given, as a new PEFT LoRA adapter directory that
    ``peft.PeftModel.from_pretrained(base_model, out)`` loads.

    Args:
        rank: the rank of every layer (clamped to min(m, n)), or the cap under ``rank_policy``.
        rank_policy: ``"fixed"``, or ``"energy:F"``: each layer's smallest rank whose retained
            energy ``sum s_i^2 / ||D||_F^2`` reaches F, at most ``rank`` (per-module ranks go to
            ``rank_pattern``/``alpha_pattern``).
        dtype: the adapter's dtype: ``None``/``"auto"`` (each weight's dtype in ``tuned``), or
            ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: where to compute (``"auto"``: CUDA when available; default the CPU).
        tol, max_iter, on_failure: the certificate's tolerance on each triplet's residual
            (default 1e-4), the block Krylov restarts allowed, and what happens to a layer that
            does not converge: ``"dense"`` (a dense SVD of that layer, with a warning) or
            ``"raise"``.
        progress: a tqdm bar over the layers.

    Layers are read and computed one at a time (memory: one layer, plus the adapter). Weights
    that do not differ are listed as unchanged; tensors that differ but are not weight matrices
    (norms, biases) are listed as skipped with the reason. ``out`` must not exist; it is written
    atomically. Returns an :class:`ExtractionReport`.
    """
    rank, tol, max_iter, on_failure = _check_solver(FUNC, rank, tol, max_iter, on_failure)
    policy, energy = checks.extraction_rank_policy(FUNC, rank_policy)
    dtype = checks.extraction_dtype(FUNC, dtype)
    device = checks.device(FUNC, device)
    base_model, tuned_model = open_checkpoints(base, tuned)
    inputs = [("BASE", base_model.directory), ("TUNED", tuned_model.directory)]
    if out is not None:
        out = check_new_output(out, "--out", inputs, directory=True)
    layer_set = checkpoint_pair_layers(FUNC, base_model, tuned_model)
    matrices = {layer.name for layer in layer_set.layers}
    skipped, unchanged_other = _other_differences(base_model, tuned_model, matrices)
    skipped = list(layer_set.skipped) + skipped

    records, factors, unchanged, kinds = [], {}, [], {}
    for layer in tqdm(layer_set.layers, desc="extract", unit="module", disable=not progress):
        W0 = layer.base_weight(device)
        W = layer.tuned_weight(device)
        if torch.equal(W0, W.to(W0.dtype)):
            unchanged.append(layer.name)
            continue
        # Half-precision weights differ exactly in float32; float32 ones need float64, or the
        # rounding of W (eps32 |W|) would be a sizeable part of a small update.
        half = W0.dtype in (torch.bfloat16, torch.float16) and W.dtype == W0.dtype
        work = torch.float32 if half else _F64
        approx = lowrank_approximation(W.to(work) - W0.to(work), rank, tol=tol,
                                       max_iter=max_iter, on_failure=on_failure)
        del W0, W
        kept = _policy_rank(approx, policy, energy)
        out_dtype = dtype or _stored_dtype(tuned_model, layer)
        B, A = approx.factors(kept)
        factors[layer.name] = (B.to(out_dtype).cpu(), A.to(out_dtype).cpu())
        kinds[layer.name] = layer.kind
        records.append(LayerExtraction(
            layer.name, layer.kind, tuple(layer.shape), kept, approx.error(kept),
            approx.retained(kept), float(approx.residual[:kept].max()), approx.converged,
            approx.iterations, approx.method, str(out_dtype).removeprefix("torch.")))
    if not records:
        raise CheckpointError(f"TUNED {str(tuned)!r} has the same weight matrices as BASE "
                              f"{str(base)!r}: there is nothing to extract"
                              + (f" ({len(skipped)} other tensors differ)" if skipped else ""))
    config = adapter_config(str(base), records, rank, kinds, _task_type(base_model))
    report = ExtractionReport(records, skipped, unchanged + unchanged_other, rank,
                              str(rank_policy), config, factors)
    if out is not None:
        with atomic_directory(out) as tmp:
            save_safetensors(tmp / ADAPTER_SAFETENSORS, adapter_tensors(factors, kinds))
            write_json(tmp / ADAPTER_CONFIG, config)
        report.out = str(out)
    return report


def _stored_dtype(tuned: ModelDirectory, layer) -> torch.dtype:
    """The dtype a layer's weight is stored in by the tuned checkpoint (the adapter's default)."""
    return tuned.store.info(layer.name + ".weight")[0]


def adapter_tensors(factors: dict, kinds: dict) -> dict[str, Tensor]:
    """The adapter file's tensors, under PEFT's keys (:func:`intruder_ext.layers.peft_factor_keys`)."""
    tensors = {}
    for name, (B, A) in factors.items():
        a_key, b_key = peft_factor_keys(name, kinds[name])
        tensors[a_key] = A.contiguous()
        tensors[b_key] = B.contiguous()
    return tensors


def adapter_config(base: str, records: list[LayerExtraction], rank: int, kinds: dict,
                   task_type: str | None) -> dict:
    """``adapter_config.json``: rank ``rank`` and alpha = rank (scale 1, no rsLoRA), the exact
    module names as ``target_modules``, and per-module ``rank_pattern``/``alpha_pattern`` (alpha =
    rank again) for every layer stored at another rank. ``fan_in_fan_out`` when the layers are
    Conv1D (stored (in, out)), as PEFT saves Conv1D adapters."""
    patterns = {pattern_key(r.name): r.rank for r in records if r.rank != rank}
    config = {
        "peft_type": "LORA", "base_model_name_or_path": base, "r": rank, "lora_alpha": rank,
        "use_rslora": False, "use_dora": False, "lora_dropout": 0.0, "bias": "none",
        "target_modules": [r.name for r in records],
        "rank_pattern": patterns, "alpha_pattern": dict(patterns),
        "fan_in_fan_out": any(kinds[r.name] == "conv1d" for r in records),
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    if task_type is not None:
        config["task_type"] = task_type
    return config


def write_report_json(report: ExtractionReport, path) -> None:
    """The report as JSON at ``path`` (atomically; the caller has checked it is new)."""
    with atomic_file(path) as f:
        f.write(report.to_json(indent=1))
