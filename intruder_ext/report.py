"""Result classes of :func:`intruder_ext.find_intruders`: one record per layer
(:class:`ModuleReport`), from which every view is derived (JSON, the text table, Markdown
reports and plots, written adapters)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch


@dataclass
class ModuleReport:
    """Intruder analysis of one layer, in the map orientation (``shape = (m, n)``, outputs first).

    ``sigma``, ``max_cos``, ``argmax`` and ``residual`` are per top-k singular vector of the tuned
    weight, largest first: ``max_cos[j] = max_i |cos(y_j, x_i)|`` over all left singular vectors
    ``x_i`` of the base weight, attained at ``i = argmax[j]``. ``intruders`` indexes into the
    top-k. ``residual``, ``converged``, ``iterations`` and ``method`` are the spectral engine's
    certificate for the top-k. ``rank`` and ``scale`` are ``None`` for full fine-tuning.
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
    converged: bool
    iterations: int
    method: str

    @property
    def num_intruders(self) -> int:
        return len(self.intruders)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
            "scale": self.scale, "sigma": self.sigma.tolist(), "max_cos": self.max_cos.tolist(),
            "argmax": self.argmax.tolist(), "intruders": list(self.intruders),
            "certificate": {"residual": self.residual.tolist(), "converged": self.converged,
                            "iterations": self.iterations, "method": self.method},
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
    totals: dict = field(init=False)

    def __post_init__(self):
        self.totals = {
            "modules": len(self.modules),
            "modules_with_intruders": sum(1 for m in self.modules if m.intruders),
            "intruders": sum(m.num_intruders for m in self.modules),
            "unconverged": sum(1 for m in self.modules if not m.converged),
            "skipped": len(self.skipped),
        }

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
                "totals": dict(self.totals), "modules": [m.to_dict() for m in self.modules],
                "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped]}

    def to_json(self, **kwargs) -> str:
        """The report as JSON; always valid JSON (a NaN or inf is an error, never written)."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)

    def __str__(self) -> str:
        head = ("module", "shape", "rank", "intruders", "min max_cos", "top sigma", "cert")
        rows = []
        for m in self.modules:
            rows.append((
                m.name, "x".join(map(str, m.shape)), "-" if m.rank is None else str(m.rank),
                f"{m.num_intruders}/{len(m.sigma)}",
                f"{m.max_cos.min().item():.3f}" if len(m.max_cos) else "-",
                f"{m.sigma[0].item():.4g}" if len(m.sigma) else "-",
                ("ok " if m.converged else "NO ") + m.method,
            ))
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
                  for i, h in enumerate(head)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        t = self.totals
        src = f"adapter {self.adapter_name!r}" if self.adapter_name else "full fine-tuning"
        lines.append(f"{src}: {t['intruders']} intruders in {t['modules_with_intruders']} of "
                     f"{t['modules']} modules (top_k={self.top_k}, epsilon={self.epsilon})"
                     + (f", {t['unconverged']} not converged" if t["unconverged"] else ""))
        lines += [f"skipped {s.name}: {s.reason}" for s in self.skipped]
        return "\n".join(lines)
