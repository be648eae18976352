"""Intruder dimensions during training: :class:`IntruderMonitor` for any training loop (the
Trainer callback, :class:`intruder_ext.callback.IntruderCallback`, wraps it).

A check is a detection (:func:`intruder_ext.detection.analyse_against`) of the model's active
LoRA adapter, or of a fully fine-tuned model against its base, at the current step. The base
weights do not change while LoRA trains (and a full fine-tune is compared with a fixed base), so
each layer's base spectrum is computed (or read from the disk cache) at the first check and kept
in memory, keyed by the layer, for the later ones; a check then costs the structured top-k of
each layer, milliseconds per layer. It computes without gradients, reads the weights without
changing them, runs no forward pass (the model's train/eval mode is left alone) and draws no
random numbers from torch's generators.
"""

from __future__ import annotations

import time
import weakref

import torch

from . import checks
from .calibration import BASIS_RTOL, warn_below_null
from .detection import analyse_against, layer_sources, spectrum_source
from .report import IntruderReport

__all__ = ["IntruderMonitor"]


class IntruderMonitor:
    """Counts intruder dimensions every ``every_n_steps`` steps of a training loop.

    ``monitor.step(model, step)`` returns ``None`` when ``step`` is not a multiple of
    ``every_n_steps``, else the metrics of :meth:`check`::

        monitor = IntruderMonitor(every_n_steps=50)
        for step, batch in enumerate(loader, 1):
            ...  # forward, backward, optimizer step
            if (metrics := monitor.step(model, step)) is not None:
                log(metrics, step=step)

    Args:
        every_n_steps: check at the steps that are multiples of it.
        top_k, epsilon, basis_rtol, cache_dir, device: as for
            :func:`intruder_ext.find_intruders` (``cache_dir`` is read once per layer).
        adapter_name: which LoRA adapter (default: the active one, looked up at every check).
        modules: restrict to these module names or suffixes.
        base_model: for full fine-tuning, the base model the trained model is compared with
            (every ``nn.Linear``/``Conv1D``/``nn.Embedding``, or ``modules``); ``None`` for LoRA.

    Attributes: ``history`` (one dict per check: ``step`` and the metrics), ``last_report``
    (the :class:`~intruder_ext.report.IntruderReport` of the last check) and ``seconds`` (time
    spent in checks).
    """

    def __init__(self, every_n_steps: int = 50, top_k=10, epsilon=0.5, *, adapter_name=None,
                 modules=None, base_model=None, cache_dir=None, device=None,
                 basis_rtol=BASIS_RTOL):
        func = "IntruderMonitor"
        self.every_n_steps = checks.positive_int(func, "every_n_steps", every_n_steps)
        self.top_k = checks.top_k(func, top_k)
        self.epsilon = checks.epsilon(func, "epsilon", epsilon)
        self.basis_rtol = checks.basis_rtol(func, basis_rtol)
        self.device = checks.device(func, device)
        self.adapter_name = adapter_name
        self.modules = modules
        self.base_model = base_model
        self._spectrum = spectrum_source(cache_dir)
        # layer name -> (weak reference to the stored base weight, its BaseSpectrum)
        self._bases: dict[str, tuple] = {}
        self.history: list[dict] = []
        self.last_report: IntruderReport | None = None
        self.seconds = 0.0

    def due(self, step: int) -> bool:
        """Whether ``step`` is a check step (a multiple of ``every_n_steps``)."""
        return checks.step("IntruderMonitor", step) % self.every_n_steps == 0

    def step(self, model, step: int) -> dict | None:
        """The metrics of :meth:`check` at the steps that are multiples of ``every_n_steps``,
        else ``None`` (nothing is computed)."""
        return self.check(model, step) if self.due(step) else None

    def check(self, model, step: int | None = None) -> dict:
        """Detect now: ``{"intruders/total", "intruders/layers_with", "intruders/min_max_cos",
        "intruders/<module type>" ...}`` (:meth:`IntruderReport.metrics`), recorded in
        ``history`` with ``step``."""
        func = "IntruderMonitor"
        if step is not None:
            step = checks.step(func, step)
        t0 = time.perf_counter()
        with torch.no_grad():
            if self.base_model is None:
                layer_set = layer_sources(func, model, None, self.adapter_name, self.modules)
            else:
                layer_set = layer_sources(func, self.base_model, model, self.adapter_name,
                                          self.modules)
            records = [analyse_against(layer, self._base(layer), self.top_k, self.epsilon,
                                       self.basis_rtol).record for layer in layer_set.layers]
        if not self.history:  # the shapes do not change: once is enough
            warn_below_null(records, self.epsilon, stacklevel=4)
        self.last_report = IntruderReport(records, self.top_k, self.epsilon,
                                          layer_set.adapter_name, [], self.basis_rtol)
        metrics = self.last_report.metrics()
        self.seconds += time.perf_counter() - t0
        self.history.append({"step": step, **metrics})
        return metrics

    def _base(self, layer):
        """The layer's base spectrum, from memory when its stored base weight is the same tensor
        as at the first check (a monitor reused on another model recomputes)."""
        weight = layer.read_base()
        entry = self._bases.get(layer.name)
        if entry is not None and entry[0]() is weight:
            return entry[1]
        base = self._spectrum(layer, self.device)
        self._bases[layer.name] = (weakref.ref(weight), base)
        return base
