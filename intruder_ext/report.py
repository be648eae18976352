"""Result classes of :func:`intruder_ext.find_intruders`: one record per layer
(:class:`ModuleReport`), from which every view is derived (JSON, the text table, Markdown
reports and plots, written adapters)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .calibration import BASIS_RTOL, below_null
from .layers import module_type


def text_table(head, rows) -> str:
    """Columns aligned with two spaces, under a rule: how tables print on a terminal."""
    rows = [[str(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    return "\n".join(line.rstrip() for line in [*lines, *(fmt.format(*r) for r in rows)])


@dataclass
class ModuleReport:
    """Intruder analysis of one layer, in the map orientation (``shape = (m, n)``, outputs first).

    ``sigma``, ``max_cos``, ``argmax`` and ``residual`` are per top-k singular vector of the tuned
    weight, largest first: ``max_cos[j] = max_i |cos(y_j, x_i)|`` over all left singular vectors
    ``x_i`` of the base weight, attained at ``i = argmax[j]``. ``intruders`` indexes into the
    top-k. ``residual``, ``angle_bound``, ``max_cos_bound``, ``converged``, ``iterations`` and
    ``method`` are the spectral engine's certificate (:mod:`intruder_ext.spectral`): per vector,
    its residual relative to its own sigma, a bound on its angle to the exact singular vector,
    and the bound on its ``max_cos`` error that follows. ``rank`` and ``scale`` are ``None`` for
    full fine-tuning.

    Calibration (:mod:`intruder_ext.calibration`): ``null_max_cos`` and ``null_max_cos_p99`` are
    the median and 99th percentile of ``max_cos`` for a uniformly random direction in this
    layer's shape; ``alignment[j]`` places ``max_cos[j]`` between that median (0) and a base
    vector (1). ``[max_cos_lo[j], max_cos_hi[j]]`` is the range ``max_cos[j]`` takes over the
    base bases that rotate within groups of near-equal base singular values (``basis_rtol`` of
    the report), and ``basis_sensitive`` indexes the vectors whose intruder status depends on
    that choice (``max_cos_lo < epsilon <= max_cos_hi``). ``mitigation`` is set by the
    mitigation (:func:`~intruder_ext.reduce_intruder_dimension`): which one, lambda, and the
    Frobenius norm of the change it made to this layer's weight.
    """

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int | None
    scale: float | None
    sigma: torch.Tensor
    max_cos: torch.Tensor
    argmax: torch.Tensor
    intruders: list[int]
    residual: torch.Tensor
    angle_bound: torch.Tensor
    max_cos_bound: torch.Tensor
    converged: bool
    iterations: int
    method: str
    null_max_cos: float
    null_max_cos_p99: float
    alignment: torch.Tensor
    max_cos_lo: torch.Tensor
    max_cos_hi: torch.Tensor
    basis_sensitive: list[int]
    mitigation: dict | None = None

    @property
    def num_intruders(self) -> int:
        return len(self.intruders)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
            "scale": self.scale, "sigma": self.sigma.tolist(), "max_cos": self.max_cos.tolist(),
            "argmax": self.argmax.tolist(), "intruders": list(self.intruders),
            "null_max_cos": self.null_max_cos, "null_max_cos_p99": self.null_max_cos_p99,
            "alignment": self.alignment.tolist(), "max_cos_lo": self.max_cos_lo.tolist(),
            "max_cos_hi": self.max_cos_hi.tolist(), "basis_sensitive": list(self.basis_sensitive),
            "mitigation": None if self.mitigation is None else dict(self.mitigation),
            "certificate": {"residual": self.residual.tolist(),
                            "angle_bound": self.angle_bound.tolist(),
                            "max_cos_bound": self.max_cos_bound.tolist(),
                            "converged": self.converged, "iterations": self.iterations,
                            "method": self.method},
        }


@dataclass
class IntruderReport:
    """Per-module results plus the settings they were found with. Iterate it, index it by module
    name, ``print`` it for a table, or serialize with :meth:`to_dict` / :meth:`to_json`."""

    modules: list[ModuleReport]
    top_k: int | float
    epsilon: float
    adapter_name: str | None = None  # None for a (base, tuned) full fine-tuning pair
    skipped: list = field(default_factory=list)  # layers.Skipped: found, not analysed, and why
    basis_rtol: float = BASIS_RTOL  # grouping of near-equal base singular values
    totals: dict = field(init=False)

    def __post_init__(self):
        self.totals = {
            "modules": len(self.modules),
            "modules_with_intruders": sum(1 for m in self.modules if m.intruders),
            "intruders": sum(m.num_intruders for m in self.modules),
            "basis_sensitive": sum(len(m.basis_sensitive) for m in self.modules),
            "modules_epsilon_below_null": len(self.below_null),
            "unconverged": sum(1 for m in self.modules if not m.converged),
            "skipped": len(self.skipped),
        }

    @property
    def below_null(self) -> list[ModuleReport]:
        """Modules where epsilon is at or below the null's 99th percentile: there chance-level
        directions count as aligned (:func:`intruder_ext.calibration.below_null`)."""
        return below_null(self.modules, self.epsilon)

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules)

    def __getitem__(self, name: str) -> ModuleReport:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"adapter_name": self.adapter_name, "top_k": self.top_k, "epsilon": self.epsilon,
                "basis_rtol": self.basis_rtol, "totals": dict(self.totals), "modules": [m.to_dict() for m in self.modules],
                "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped]}

    def metrics(self) -> dict:
        """The scalars a training monitor logs: ``intruders/total``, ``intruders/layers_with``,
        ``intruders/min_max_cos`` (over every examined vector) and ``intruders/<type>`` per
        module type (``q_proj``, ...), in model order."""
        out = {"intruders/total": self.totals["intruders"],
               "intruders/layers_with": self.totals["modules_with_intruders"],
               "intruders/min_max_cos": min(float(m.max_cos.min()) for m in self.modules)}
        for m in self.modules:
            key = f"intruders/{module_type(m.name)}"
            out[key] = out.get(key, 0) + m.num_intruders
        return out

    def to_json(self, **kwargs) -> str:
        """The report as JSON; always valid JSON (a NaN or inf is an error, never written)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __str__(self) -> str:
        head = ("module", "shape", "rank", "intruders", "min max_cos", "null med/p99",
                "min align", "basis-dep", "top sigma", "cert (max_cos ±)")
        rows = []
        for m in self.modules:
            rows.append((
                m.name, "x".join(map(str, m.shape)), "-" if m.rank is None else str(m.rank),
                f"{m.num_intruders}/{len(m.sigma)}",
                f"{m.max_cos.min().item():.3f}" if len(m.max_cos) else "-",
                f"{m.null_max_cos:.3f}/{m.null_max_cos_p99:.3f}",
                f"{m.alignment.min().item():.3f}" if len(m.alignment) else "-",
                str(len(m.basis_sensitive)),
                f"{m.sigma[0].item():.4g}" if len(m.sigma) else "-",
                ("ok " if m.converged else "NO ") + m.method + (
                    f" ±{m.max_cos_bound.max().item():.0e}" if len(m.max_cos_bound) else ""),
            ))
        lines = [text_table(head, rows)]
        t = self.totals
        src = f"adapter {self.adapter_name!r}" if self.adapter_name else "full fine-tuning"
        lines.append(f"{src}: {t['intruders']} intruders in {t['modules_with_intruders']} of "
                     f"{t['modules']} modules (top_k={self.top_k}, epsilon={self.epsilon})"
                     + (f", {t['unconverged']} not converged" if t["unconverged"] else ""))
        if t["basis_sensitive"]:
            lines.append(f"{t['basis_sensitive']} vectors are intruders in some valid bases of "
                         f"the base weight and not in others (basis-dep; near-equal base "
                         f"singular values, basis_rtol={self.basis_rtol:g})")
        lines += [f"skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)
