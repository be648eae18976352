"""The training monitor: IntruderCallback in a real transformers Trainer (its log history and the
callbacks registered before it, as the reporting integrations are, receive the metrics) and
IntruderMonitor in a hand-written loop (no change to the model, its mode or torch's RNG)."""

import copy

import pytest
import torch
from conftest import LLAMA_TARGETS, lora_llama

import intruder_ext

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

KEYS = {"intruders/total", "intruders/layers_with", "intruders/min_max_cos",
        *(f"intruders/{t}" for t in LLAMA_TARGETS)}


class Recorder(transformers.TrainerCallback):
    """Stands for a reporting integration: registered before the monitor, it sees every log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def token_dataset(n=8, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 97, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


@pytest.mark.parametrize("every, steps, checked", [(2, 4, [2, 4]), (3, 4, [3, 4])])
def test_callback_in_a_trainer(tmp_path, every, steps, checked):
    model = lora_llama(std=0.05)
    recorder = Recorder()
    callback = intruder_ext.IntruderCallback(every_n_steps=every, epsilon=0.7)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
        learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=True, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=token_dataset(),
                                   callbacks=[recorder, callback])
    trainer.train()
    entries = [e for e in trainer.state.log_history if "intruders/total" in e]
    assert [e["step"] for e in entries] == checked  # every `every` steps and the last
    for e in entries:
        assert KEYS <= set(e)
        assert e["intruders/total"] == sum(e[f"intruders/{t}"] for t in LLAMA_TARGETS)
        assert 0 <= e["intruders/layers_with"] <= 7 and 0 <= e["intruders/min_max_cos"] <= 1
    seen = [log for log in recorder.logs if "intruders/total" in log]
    assert len(seen) == len(checked) and all(KEYS <= set(log) for log in seen)
    assert any("loss" in e for e in trainer.state.log_history)  # the Trainer's own logs too
    # The last check is the trained adapter's detection.
    want = intruder_ext.find_intruders(model, epsilon=0.7, progress=False).metrics()
    assert {k: entries[-1][k] for k in want} == pytest.approx(want)


def test_callback_outside_a_trainer():
    callback = intruder_ext.IntruderCallback()
    with pytest.raises(RuntimeError, match="IntruderCallback: on_train_begin was not called "
                                           "from a transformers.Trainer's training loop"):
        callback.on_train_begin(None, None, None)


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            torch.get_rng_state())


def assert_untouched(model, snap):
    state, grads, rng = snap
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and \
            (p.grad is None or torch.equal(p.grad, grads[n])), n
    assert torch.equal(torch.get_rng_state(), rng)


def test_monitor_in_a_hand_loop(monkeypatch):
    import intruder_ext.monitor as monitor_module
    from intruder_ext.spectral import base_spectrum

    computed = []

    def counting(cache_dir, model=None):
        def spectrum(layer, device=None):
            computed.append(layer.shape)
            return base_spectrum(layer.base_weight(device))
        return spectrum

    monkeypatch.setattr(monitor_module, "spectrum_source", counting)
    model = lora_llama(std=0.05)
    monitor = intruder_ext.IntruderMonitor(every_n_steps=2, epsilon=0.7)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = token_dataset()
    model.train()
    results = {}
    for step, row in enumerate(data, 1):
        loss = model(input_ids=row["input_ids"][None], labels=row["labels"][None]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        snap = snapshot(model)
        results[step] = monitor.step(model, step)
        assert_untouched(model, snap)
        assert model.training
    assert [s for s, r in results.items() if r is not None] == [2, 4, 6, 8]
    assert all(KEYS <= set(results[s]) for s in (2, 4, 6, 8))
    assert [h["step"] for h in monitor.history] == [2, 4, 6, 8]
    assert len(computed) == 7  # one base spectrum per layer, kept for the later checks
    assert monitor.seconds > 0 and len(monitor.last_report) == 7
    want = intruder_ext.find_intruders(model, epsilon=0.7, progress=False).metrics()
    assert results[8] == pytest.approx(want)
    model.eval()
    monitor.check(model)
    assert not model.training
    # Another model (other weight tensors) gets its own spectra.
    monitor.check(lora_llama(std=0.05, seed=3))
    assert len(computed) == 14


def test_monitor_full_fine_tuning():
    from conftest import tiny_llama

    base = tiny_llama()
    tuned = copy.deepcopy(base)
    monitor = intruder_ext.IntruderMonitor(every_n_steps=1, epsilon=0.7, base_model=base,
                                           modules=["q_proj", "v_proj"])
    first = monitor.step(tuned, 1)
    assert first == {"intruders/total": 0, "intruders/layers_with": 0,
                     "intruders/min_max_cos": pytest.approx(1.0, abs=1e-4),
                     "intruders/q_proj": 0, "intruders/v_proj": 0}
    with torch.no_grad():
        w = tuned.model.layers[0].self_attn.q_proj.weight
        u = torch.randn(w.shape[0], 1)
        w.add_(50 * u @ torch.randn(1, w.shape[1]))  # a strong new direction
    second = monitor.step(tuned, 2)
    assert second["intruders/q_proj"] >= 1 and second["intruders/v_proj"] == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_steps": 0}, r"IntruderMonitor: every_n_steps must be a positive integer \(got 0\)"),
    ({"epsilon": -1}, r"IntruderMonitor: epsilon must be a positive number \(got -1\)"),
    ({"top_k": 0}, r"IntruderMonitor: top_k must be an int >= 1"),
    ({"basis_rtol": -1}, r"IntruderMonitor: basis_rtol must be a finite number >= 0"),
])
def test_monitor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        intruder_ext.IntruderMonitor(**kwargs)


def test_monitor_step_and_model_checks(llama_lora):
    monitor = intruder_ext.IntruderMonitor(every_n_steps=5)
    with pytest.raises(ValueError, match=r"IntruderMonitor: step must be an integer >= 0 "
                                         r"\(got -1\)"):
        monitor.step(llama_lora, -1)
    with pytest.raises(ValueError, match=r"IntruderMonitor: expected a peft.PeftModel"):
        monitor.check(torch.nn.Linear(3, 3), 0)
    assert monitor.step(llama_lora, 3) is None and monitor.history == []
