"""reduce_intruder_dimension / merge_and_unload_with_reduced_intruder_dimensions: parity with
PEFT's own implementation, exactness of rank="exact", persistence, and failure behaviour."""

import copy
import math

import pytest
import torch
from conftest import lora_llama, randomize_lora, tiny_gpt2, tiny_llama
from reference import dense_mitigated_delta

import intruder_ext
from intruder_ext import (merge_and_unload_with_reduced_intruder_dimensions,
                          reduce_intruder_dimension)

peft = pytest.importorskip("peft")
from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce  # noqa: E402
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

NEW = "intruder_reduced"


def lora_layers(model, adapter):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


def map_delta(layer, adapter):
    d = layer.get_delta_weight(adapter).detach().double()
    transposed = isinstance(layer.get_base_layer(), torch.nn.Embedding) or layer.fan_in_fan_out
    return d.T if transposed else d


def map_base(layer):
    w = layer.get_base_layer().weight.detach().double()
    transposed = isinstance(layer.get_base_layer(), torch.nn.Embedding) or layer.fan_in_fan_out
    return w.T if transposed else w


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, list(model.peft_config),
            list(model.active_adapters))


def assert_unchanged(model, snap):
    state, adapters, active = snap
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert list(model.peft_config) == adapters and list(model.active_adapters) == active


def check_exact(model, old, new, top_k=10, eps=0.5, lam=0.75):
    """The new adapter holds (W' - W0) of the dense float64 reference, to float32 round-off."""
    layers = lora_layers(model, old)
    n_intruders = 0
    for name, layer in layers.items():
        s = layer.scaling[old]
        B = layer.lora_embedding_B[old] if old in layer.lora_embedding_B else layer.lora_B[old].weight
        A = layer.lora_embedding_A[old] if old in layer.lora_embedding_A else layer.lora_A[old].weight
        want, I = dense_mitigated_delta(map_base(layer), B.detach(), A.detach(), s,
                                        min(top_k, *map_base(layer).shape), eps, lam)
        n_intruders += len(I)
        assert layer.scaling[new] == pytest.approx(s, rel=1e-6)
        assert layer.r[new] == layer.r[old] + len(I), name
        assert rel(map_delta(layer, new), want) < 2e-5, name
    assert n_intruders > 0


def test_parity_with_peft():
    ours = lora_llama(std=0.05, layers=2)
    theirs = copy.deepcopy(ours)
    peft_log, our_log = [], []
    peft_reduce(theirs, logging_sink=peft_log.append)
    report = reduce_intruder_dimension(ours, logging_sink=our_log.append)
    assert ours.active_adapters == [NEW] and list(ours.peft_config) == ["default", NEW]
    # Same intruders, layer by layer (PEFT logs full module names).
    assert [m.removeprefix("base_model.model.") for m in peft_log] == our_log
    assert report.totals["intruders"] > 0
    theirs_layers = lora_layers(theirs, NEW)
    for name, layer in lora_layers(ours, NEW).items():
        assert layer.r[NEW] == 4
        assert rel(map_delta(layer, NEW), map_delta(theirs_layers[name], NEW)) < 1e-4, name
        # The old adapter is untouched.
        assert torch.equal(layer.lora_B["default"].weight, theirs_layers[name].lora_B["default"].weight)


def test_exact_rank_reconstruction():
    model = lora_llama(std=0.05)
    reduce_intruder_dimension(model, rank="exact", logging_sink=None)
    check_exact(model, "default", NEW)
    assert model.peft_config[NEW].rank_pattern  # per-module ranks went through the config
    assert model.peft_config["default"].rank_pattern == {}


def test_exact_rslora_two_adapters():
    model = lora_llama(targets=["q_proj", "down_proj"], use_rslora=True)
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, use_rslora=True,
                                               target_modules=["down_proj"]))
    randomize_lora(model, "other", std=0.3, seed=5)
    before = snapshot(model)[0]
    reduce_intruder_dimension(model, "other", "other_reduced", rank="exact", logging_sink=None)
    check_exact(model, "other", "other_reduced")
    assert model.active_adapters == ["other_reduced"]
    assert len(lora_layers(model, "other_reduced")) == 1
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in before.items())  # old adapters untouched


def test_conv1d_and_embedding_exact():
    gpt = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    randomize_lora(gpt, std=0.3)
    reduce_intruder_dimension(gpt, rank="exact", logging_sink=None)
    check_exact(gpt, "default", NEW)

    llama = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "v_proj"]))
    randomize_lora(llama, std=0.3)
    reduce_intruder_dimension(llama, rank="exact", logging_sink=None)
    check_exact(llama, "default", NEW)


@pytest.mark.parametrize("rank", ["peft", "exact"])
def test_save_and_reload(tmp_path, rank):
    model = lora_llama(std=0.05)
    reduce_intruder_dimension(model, rank=rank, logging_sink=None)
    ids = torch.arange(12)[None] % 97
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path, selected_adapters=[NEW])
    fresh = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / NEW, adapter_name=NEW).eval()
    with torch.no_grad():
        got = fresh(input_ids=ids).logits
    assert torch.equal(got, want)
    assert {n: m.r[NEW] for n, m in lora_layers(fresh, NEW).items()} == \
        {n: m.r[NEW] for n, m in lora_layers(model, NEW).items()}


def test_merge_and_unload():
    model = lora_llama(std=0.05)
    layers = lora_layers(model, "default")
    want = {}
    for name, layer in layers.items():
        delta, _ = dense_mitigated_delta(map_base(layer), layer.lora_B["default"].weight.detach(),
                                         layer.lora_A["default"].weight.detach(),
                                         layer.scaling["default"], 10, 0.5, 0.75)
        want[name] = map_base(layer) + delta
    merged = merge_and_unload_with_reduced_intruder_dimensions(model)
    assert not isinstance(merged, peft.PeftModel)
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    modules = dict(merged.named_modules())
    for name, w in want.items():
        assert rel(modules[name].weight.detach().double(), w) < 1e-5, name


def test_layers_without_intruders_copy_old_factors():
    model = lora_llama(std=1e-4)  # too small an update to create intruders
    log = []
    report = reduce_intruder_dimension(model, logging_sink=log.append)
    assert report.totals["intruders"] == 0 and all(m.endswith("No intruders") for m in log[:-1])
    for layer in lora_layers(model, NEW).values():
        assert torch.equal(layer.lora_A[NEW].weight, layer.lora_A["default"].weight)
        assert torch.equal(layer.lora_B[NEW].weight, layer.lora_B["default"].weight)


def test_modules_to_save_carried_over():
    model = lora_llama(targets=["q_proj"], modules_to_save=["lm_head"])
    head = model.base_model.model.lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.mul_(2.0)  # "trained"
    reduce_intruder_dimension(model, logging_sink=None)
    assert torch.equal(head.modules_to_save[NEW].weight, head.modules_to_save["default"].weight)
    assert head.active_adapter == NEW


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base(dtype):
    model = peft.get_peft_model(tiny_llama(dtype=dtype), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    randomize_lora(model, std=0.05)
    old_dtype = next(iter(lora_layers(model, "default").values())).lora_A["default"].weight.dtype
    reduce_intruder_dimension(model, rank="exact", logging_sink=None)
    for layer in lora_layers(model, NEW).values():
        assert layer.lora_A[NEW].weight.dtype == old_dtype
    check_exact(model, "default", NEW)


# ---- bad input and failures: the model is left exactly as it was ----

@pytest.mark.parametrize("kwargs, match", [
    ({"threshold_epsilon": 0.0}, r"reduce_intruder_dimension: threshold_epsilon must be a "
                                 r"positive number \(got 0.0\)"),
    ({"threshold_epsilon": math.inf}, r"threshold_epsilon .*got inf"),
    ({"mitigation_lambda": -0.1}, r"mitigation_lambda must be a finite number >= 0 \(got -0.1\)"),
    ({"mitigation_lambda": math.nan}, r"mitigation_lambda .*got nan"),
    ({"top_k": 0}, r"top_k must be an int >= 1 or a float in \(0, 1\) \(got 0\)"),
    ({"top_k": 2.5}, r"top_k .*got 2.5"),
    ({"rank": "full"}, r"rank must be one of \('peft', 'exact'\) \(got 'full'\)"),
    ({"control": "random"}, r"control must be one of \(None, 'uniform'\) \(got 'random'\)"),
    ({"old_adapter_name": "nope"}, r"old_adapter_name='nope' is not an adapter of this model"),
    ({"new_adapter_name": "default"}, r"new_adapter_name='default' already exists"),
    ({"new_adapter_name": ""}, r"new_adapter_name must be a non-empty string \(got ''\)"),
])
def test_bad_arguments_change_nothing(llama_lora, kwargs, match):
    snap = snapshot(llama_lora)
    with pytest.raises(ValueError, match=match):
        reduce_intruder_dimension(llama_lora, logging_sink=None, **kwargs)
    assert_unchanged(llama_lora, snap)


@pytest.mark.parametrize("rank", ["peft", "exact"])
def test_uniform_control_changes_each_weight_by_the_targeted_norm(rank):
    """The control scales each layer's whole update by one factor; per layer, the weight change
    it makes (PEFT's own delta weights, float64) has the Frobenius norm of the targeted
    mitigation's under the same rank policy, and it is a multiple of the old update."""
    targeted, control = lora_llama(std=0.05), lora_llama(std=0.05)
    t_report = reduce_intruder_dimension(targeted, rank=rank, logging_sink=None)
    c_report = reduce_intruder_dimension(control, rank=rank, control="uniform", logging_sink=None)
    assert t_report.totals["intruders"] > 0
    changed = 0
    for name, layer in lora_layers(control, "default").items():
        old = map_delta(layer, "default")
        t_change = (map_delta(lora_layers(targeted, NEW)[name], NEW) - old).norm().item()
        c_delta = map_delta(layer, NEW)
        c_change = (c_delta - old).norm().item()
        assert c_change == pytest.approx(t_change, rel=1e-4, abs=1e-6), name
        factor = c_report[name].mitigation["uniform_factor"]
        torch.testing.assert_close(c_delta, factor * old, rtol=1e-5, atol=1e-7)
        assert layer.r[NEW] == layer.r["default"]  # rank r: nothing truncated, no pattern
        assert c_report[name].mitigation["change_norm"] == pytest.approx(c_change, rel=1e-4,
                                                                         abs=1e-6)
        assert t_report[name].mitigation["change_norm"] == pytest.approx(t_change, rel=1e-4,
                                                                         abs=1e-6)
        if t_report[name].intruders:
            assert 0 < factor < 1
            changed += 1
        else:
            assert factor == 1.0 and c_change == 0.0
    assert changed == t_report.totals["modules_with_intruders"] > 0
    assert c_report[name].mitigation["control"] == "uniform"
    assert t_report[name].mitigation["control"] == "intruders"


def test_uniform_control_removes_an_update_smaller_than_the_targeted_change():
    """Vectors whose singular values are mostly base-weight energy (epsilon >= 1 flags every
    top-k vector, as in PEFT): scaling them by lambda changes W by more than the whole, small
    LoRA update's norm, which the control cannot match; it removes the update and says so."""
    model = lora_llama(std=0.05, targets=["q_proj"])
    layer = next(iter(lora_layers(model, "default").values()))
    with torch.no_grad():
        layer.lora_B["default"].weight.mul_(1e-3)
    log = []
    report = reduce_intruder_dimension(model, control="uniform", threshold_epsilon=2.0,
                                       logging_sink=log.append)
    rec = report.modules[0]
    assert rec.intruders and rec.mitigation["uniform_factor"] == 0.0
    assert rec.mitigation["change_norm"] < rec.mitigation["targeted_change_norm"]
    assert any("the uniform control removes the update" in line for line in log)
    assert map_delta(layer, NEW).abs().max().item() == 0.0


def test_merge_bad_arguments(llama_lora):
    snap = snapshot(llama_lora)
    with pytest.raises(ValueError, match="merge_and_unload_with_reduced_intruder_dimensions: "
                                         "adapter_name='x' is not an adapter"):
        merge_and_unload_with_reduced_intruder_dimensions(llama_lora, adapter_name="x")
    with pytest.raises(ValueError, match="merge_and_unload_with_reduced_intruder_dimensions: "
                                         "mitigation_lambda"):
        merge_and_unload_with_reduced_intruder_dimensions(llama_lora, mitigation_lambda=-1)
    assert_unchanged(llama_lora, snap)


def test_model_without_lora_layers():
    with pytest.raises(ValueError, match=r"reduce_intruder_dimension: expected a peft.PeftModel"):
        reduce_intruder_dimension(tiny_llama(), logging_sink=None)


def _fail_on_second(monkeypatch, owner, attr):
    original = getattr(owner, attr)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)


@pytest.mark.parametrize("rank", ["peft", "exact"])
def test_failure_in_detection_changes_nothing(monkeypatch, llama_lora, rank):
    snap = snapshot(llama_lora)
    _fail_on_second(monkeypatch, intruder_ext.detection, "lora_topk")
    with pytest.raises(RuntimeError, match="injected failure"):
        reduce_intruder_dimension(llama_lora, rank=rank, logging_sink=None)
    assert_unchanged(llama_lora, snap)


@pytest.mark.parametrize("rank", ["peft", "exact"])
def test_failure_while_writing_removes_the_new_adapter(monkeypatch, llama_lora, rank):
    snap = snapshot(llama_lora)
    _fail_on_second(monkeypatch, intruder_ext.mitigation, "write_peft_factors")
    with pytest.raises(RuntimeError, match="injected failure"):
        reduce_intruder_dimension(llama_lora, rank=rank, logging_sink=None)
    assert_unchanged(llama_lora, snap)
    assert not lora_layers(llama_lora, NEW)
    # and it works afterwards
    monkeypatch.undo()
    reduce_intruder_dimension(llama_lora, rank=rank, logging_sink=None)
    assert llama_lora.active_adapters == [NEW]
