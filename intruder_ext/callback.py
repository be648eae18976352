"""The transformers ``Trainer`` callback: intruder counts in the Trainer's logs while it trains.

A ``TrainerCallback`` is given the model, the state and the arguments, never the Trainer, and the
``logs`` dict of its ``on_log`` event has by then been stored in ``state.log_history`` and passed
to the reporting integrations (they are registered before user callbacks): values added there
reach neither. The one route to both is ``Trainer.log`` (what the loss takes: it appends to
``log_history`` and calls every callback's ``on_log``, the TensorBoard, W&B, ... integrations
among them). So the callback looks up the Trainer that runs it once, when training begins, on the
call stack of its ``on_train_begin`` event (the Trainer's training loop calls it), and logs each
check through it as its own log entry, at the step of the check.
"""

from __future__ import annotations

import sys
import weakref

from transformers import Trainer, TrainerCallback

from .monitor import IntruderMonitor

__all__ = ["IntruderCallback"]


class IntruderCallback(TrainerCallback):
    """Logs ``intruders/total``, ``intruders/layers_with``, ``intruders/min_max_cos`` and
    ``intruders/<module type>`` every ``every_n_steps`` optimizer steps (and at the last step)
    of a ``transformers.Trainer`` into its log history and its ``report_to`` integrations::

        trainer = Trainer(model=peft_model, args=args, train_dataset=ds,
                          callbacks=[IntruderCallback(every_n_steps=50)])

    Arguments as for :class:`~intruder_ext.monitor.IntruderMonitor` (the active LoRA adapter of
    the Trainer's model, or ``base_model=`` for full fine-tuning). ``callback.monitor`` holds the
    history of the checks and the last report. Every process of a distributed run checks its
    own (identical) copy of the adapter, as every process logs the loss.
    """

    def __init__(self, every_n_steps: int = 50, top_k=10, epsilon=0.5, **monitor_kwargs):
        self.monitor = IntruderMonitor(every_n_steps, top_k, epsilon, **monitor_kwargs)
        self._trainer = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._trainer = weakref.ref(_running_trainer())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if not (self.monitor.due(step) or step == state.max_steps):
            return
        trainer = self._trainer() if self._trainer is not None else None
        if trainer is None:
            raise RuntimeError("IntruderCallback: on_step_end before on_train_begin (the "
                               "callback logs through the Trainer that starts training)")
        trainer.log(self.monitor.check(model, step))


def _running_trainer() -> Trainer:
    """The ``transformers.Trainer`` whose method is on the call stack (its training loop)."""
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back
    raise RuntimeError("IntruderCallback: on_train_begin was not called from a "
                       "transformers.Trainer's training loop; in a loop of your own use "
                       "intruder_ext.IntruderMonitor")
