"""init_lora_from_spectrum: outputs unchanged at initialisation, parity with PEFT's PiSSA, the
minor triplets against a float64 SVD, the cache, dtypes, and bad input changing nothing."""

import copy
import json

import pytest
import torch
from conftest import LLAMA_TARGETS, tiny_gpt2, tiny_llama
from factory import FAMILIES

import intruder_ext
from intruder_ext import init_lora_from_spectrum
from intruder_ext.cache import SpectrumCache

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import LoraLayer  # noqa: E402

FUNC = "init_lora_from_spectrum"


def lora_layers(model, adapter="default"):
    return {n.removeprefix("base_model.model."): m for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


def transposed(layer):
    return isinstance(layer.get_base_layer(), torch.nn.Embedding) or layer.fan_in_fan_out


def factors(layer, adapter="default"):
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_B[adapter], layer.lora_embedding_A[adapter]
    return layer.lora_B[adapter].weight, layer.lora_A[adapter].weight


def map_update(layer, adapter="default"):
    """``s B A`` in map orientation, float64 (sign-invariant, unlike B and A)."""
    B, A = factors(layer, adapter)
    return layer.scaling[adapter] * (B.detach().double() @ A.detach().double())


def map_base(layer):
    w = layer.get_base_layer().weight.detach().double()
    return w.T if transposed(layer) else w


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def peft_model(model, adapter_init=True, autocast=True, **lora):
    cfg = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=adapter_init)
    cfg.update(lora)
    return peft.get_peft_model(model, peft.LoraConfig(**cfg), autocast_adapter_dtype=autocast)


def tokens(vocab, seed=3):
    return torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(seed))


def outputs(model, x):
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).double()


def bits(t):
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, list(model.peft_config))


def assert_unchanged(model, snap):
    state, grads, adapters = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():  # bit for bit (a NaN weight included)
        assert now[k].dtype == v.dtype and torch.equal(bits(now[k]), bits(v)), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert list(model.peft_config) == adapters


# ---- the function of the model is unchanged ----

CASES = {
    "llama": (lambda: tiny_llama(layers=2), LLAMA_TARGETS + ["embed_tokens"], {}, 97),
    "llama_rslora": (lambda: tiny_llama(), ["q_proj", "down_proj"],
                     {"use_rslora": True, "r": 6, "lora_alpha": 3}, 97),
    "gpt2_conv1d": (tiny_gpt2, ["c_attn", "c_fc", "c_proj", "wte"], {"fan_in_fan_out": True}, 61),
    "bert": (FAMILIES["bert"].make, ["query", "value", "dense", "word_embeddings"], {}, 64),
}


@pytest.mark.parametrize("mode", ["principal", "minor"])
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_unchanged_float32(tmp_path, case, mode):
    make, targets, lora, vocab = CASES[case]
    torch.manual_seed(0)
    model = peft_model(make().eval(), target_modules=targets, **lora)
    x = tokens(vocab)
    before = outputs(model, x)
    records = init_lora_from_spectrum(model, mode=mode, cache_dir=tmp_path)
    assert rel(outputs(model, x), before) < 1e-4
    layers = lora_layers(model)
    assert [r["name"] for r in records] == list(layers)
    for r in records:
        layer = layers[r["name"]]
        assert r["mode"] == mode and r["rank"] == layer.r["default"]
        # The adapter now holds the reported part of the weight (PEFT's default B is zero).
        sigma = torch.tensor(r["sigma"], dtype=torch.float64)
        assert (sigma > 0).all() and r["unresolved"] == 0
        assert float(map_update(layer).norm()) == pytest.approx(float(sigma.norm()), rel=1e-5)
    json.dumps(records)


def test_principal_equals_peft_pissa(tmp_path):
    ours = peft_model(tiny_llama(layers=2))
    theirs = peft_model(tiny_llama(layers=2), adapter_init="pissa")
    init_lora_from_spectrum(ours, cache_dir=tmp_path)
    mine, peft_layers = lora_layers(ours), lora_layers(theirs)
    for name, layer in mine.items():
        other = peft_layers[name]
        assert rel(map_update(layer), map_update(other)) < 1e-4, name
        assert rel(map_base(layer), map_base(other)) < 1e-4, name
        # Balanced as PEFT's: ||B[:, j]|| = ||A[j]|| = sqrt(sigma_j / s).
        B, A = factors(layer)
        torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-5, atol=0)


def test_principal_equals_peft_pissa_conv1d_rslora(tmp_path):
    lora = dict(target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True,
                use_rslora=True, r=5, lora_alpha=7)
    ours, theirs = peft_model(tiny_gpt2(), **lora), peft_model(tiny_gpt2(), "pissa", **lora)
    init_lora_from_spectrum(ours, cache_dir=tmp_path)
    peft_layers = lora_layers(theirs)
    for name, layer in lora_layers(ours).items():
        assert rel(map_update(layer), map_update(peft_layers[name])) < 1e-4, name
        assert rel(map_base(layer), map_base(peft_layers[name])) < 1e-4, name


def test_minor_takes_the_bottom_triplets(tmp_path):
    model = peft_model(tiny_llama())
    W0 = {name: map_base(layer) for name, layer in lora_layers(model).items()}
    records = {r["name"]: r for r in init_lora_from_spectrum(model, mode="minor",
                                                            cache_dir=tmp_path)}
    for name, layer in lora_layers(model).items():
        r = layer.r["default"]
        U, S, Vh = torch.linalg.svd(W0[name], full_matrices=False)
        want = U[:, -r:] @ torch.diag(S[-r:]) @ Vh[-r:]
        assert rel(map_update(layer), want) < 1e-4, name
        torch.testing.assert_close(torch.tensor(records[name]["sigma"], dtype=torch.float64),
                                   S[-r:], rtol=1e-5, atol=0)
        assert records[name]["energy"] == pytest.approx(float((S[-r:] ** 2).sum()
                                                              / (S ** 2).sum()), rel=1e-5)
        assert rel(map_base(layer), W0[name] - want) < 1e-5, name


def test_minor_on_a_rank_deficient_weight(tmp_path):
    """The bottom singular values are zero: their pairs are zero (no noise direction), the
    residual keeps what the vectors' rounding leaves, the outputs are unchanged, and it warns."""
    base = tiny_llama()
    q = base.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        q.copy_(torch.randn(64, 58, generator=g) @ torch.randn(58, 64, generator=g) / 8)
    model = peft_model(base, target_modules=["q_proj"])
    x = tokens(97)
    before = outputs(model, x)
    with pytest.warns(RuntimeWarning, match=r"init_lora_from_spectrum: module "
                      r"'model.layers.0.self_attn.q_proj': 4 of the 4 minor singular values "
                      r"are numerically zero"):
        (record,) = init_lora_from_spectrum(model, mode="minor", cache_dir=tmp_path)
    assert record["unresolved"] == 4 and record["sigma"] == [0.0] * 4
    B, A = factors(lora_layers(model)["model.layers.0.self_attn.q_proj"])
    assert not B.any() and not A.any()
    assert rel(outputs(model, x), before) < 1e-4


# ---- options ----

@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_A(tmp_path, freeze):
    model = peft_model(tiny_llama(), target_modules=LLAMA_TARGETS + ["embed_tokens"])
    records = init_lora_from_spectrum(model, freeze_A=freeze, cache_dir=tmp_path)
    for layer in lora_layers(model).values():
        B, A = factors(layer)
        assert A.requires_grad is not freeze and B.requires_grad
    assert all(r["frozen_A"] is freeze for r in records)


def test_modules_and_other_adapters_untouched(tmp_path):
    model = peft_model(tiny_llama())
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=LLAMA_TARGETS))
    model.set_adapter("second")
    x = tokens(97)
    before = outputs(model, x)
    default = {n: p.clone() for n, p in model.named_parameters() if ".default." in n}
    records = init_lora_from_spectrum(model, "second", cache_dir=tmp_path,
                                      modules=["q_proj", "down_proj"])
    assert [r["name"].rsplit(".", 1)[1] for r in records] == ["q_proj", "down_proj"]
    assert all(torch.equal(p, default[n]) for n, p in model.named_parameters() if n in default)
    layers = lora_layers(model, "second")
    for name, layer in layers.items():
        touched = name.endswith(("q_proj", "down_proj"))
        assert bool(factors(layer, "second")[0].any()) is touched, name
    assert rel(outputs(model, x), before) < 1e-4


def test_warm_cache_computes_no_spectrum(tmp_path, monkeypatch):
    first = peft_model(tiny_llama())
    init_lora_from_spectrum(first, cache_dir=tmp_path)

    def no_svd(*args, **kwargs):
        raise AssertionError("a base spectrum was computed although the cache is warm")

    monkeypatch.setattr(intruder_ext.cache, "base_spectrum", no_svd)
    monkeypatch.setattr(intruder_ext.spectral, "base_spectrum", no_svd)
    cache = SpectrumCache(tmp_path)
    second = peft_model(tiny_llama())
    init_lora_from_spectrum(second, cache_dir=cache)
    assert cache.stats.hits == len(lora_layers(second)) and cache.stats.misses == 0
    theirs = lora_layers(first)
    for name, layer in lora_layers(second).items():
        assert torch.equal(map_update(layer), map_update(theirs[name]))
    with pytest.raises(AssertionError, match="cache is warm"):  # the check can fail
        init_lora_from_spectrum(peft_model(tiny_llama(seed=1)), cache_dir=cache)


def test_bf16_adapter_stays_bf16(tmp_path):
    model = peft_model(tiny_llama(dtype=torch.bfloat16), autocast=False)
    theirs = peft_model(tiny_llama(dtype=torch.bfloat16), "pissa", autocast=False)
    x = tokens(97)
    before = outputs(model, x)
    init_lora_from_spectrum(model, cache_dir=tmp_path)
    for layer in lora_layers(model).values():
        assert all(f.dtype == torch.bfloat16 for f in factors(layer))
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
    ours_err = rel(outputs(model, x), before)
    peft_err = rel(outputs(theirs, x), before)
    # bf16 rounding of the residual and of the factors; no worse than PEFT's own PiSSA.
    assert ours_err < 2e-2 and ours_err <= 1.5 * peft_err


def test_float32_adapter_on_bf16_base(tmp_path):
    model = peft_model(tiny_llama(dtype=torch.bfloat16))  # PEFT autocasts the adapter
    init_lora_from_spectrum(model, mode="minor", cache_dir=tmp_path)
    for layer in lora_layers(model).values():
        assert all(f.dtype == torch.float32 for f in factors(layer))
        assert layer.get_base_layer().weight.dtype == torch.bfloat16


# ---- bad input changes nothing ----

@pytest.mark.parametrize("kwargs, error, match", [
    ({"mode": "middle"}, ValueError,
     r"init_lora_from_spectrum: mode must be one of \('principal', 'minor'\) \(got 'middle'\)"),
    ({"adapter_name": "nope"}, ValueError,
     r"init_lora_from_spectrum: adapter_name='nope' is not an adapter of this model"),
    ({"freeze_A": "yes"}, ValueError,
     r"init_lora_from_spectrum: freeze_A must be True or False \(got 'yes'\)"),
    ({"device": "tpu"}, ValueError, r"init_lora_from_spectrum: device must be .*got 'tpu'"),
    ({"modules": ["nowhere"]}, ValueError,
     r"init_lora_from_spectrum: modules \['nowhere'\] match no layer"),
    ({"cache_dir": 123}, TypeError, r"SpectrumCache: directory must be a str or path"),
])
def test_bad_arguments_change_nothing(tmp_path, kwargs, error, match):
    model = peft_model(tiny_llama())
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        init_lora_from_spectrum(model, **{"cache_dir": tmp_path, **kwargs})
    assert_unchanged(model, snap)


def dora():
    return peft_model(tiny_llama(), use_dora=True)


def rank_too_high():
    return peft_model(tiny_llama(), r=40, target_modules=["q_proj", "k_proj"])


def tied():
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                   tie_word_embeddings=True)
    return peft_model(transformers.LlamaForCausalLM(cfg).eval(),
                      target_modules=["q_proj", "embed_tokens"])


def merged():
    model = peft_model(tiny_llama(), target_modules=["q_proj", "v_proj"])
    lora_layers(model)["model.layers.0.self_attn.v_proj"].merge()
    return model


def nonfinite():
    model = peft_model(tiny_llama())
    with torch.no_grad():
        model.base_model.model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    return model


@pytest.mark.parametrize("make, match", [
    (dora, r"init_lora_from_spectrum: module 'model.layers.0.self_attn.q_proj' uses DoRA"),
    (rank_too_high, r"init_lora_from_spectrum: module 'model.layers.0.self_attn.k_proj' has "
                    r"rank 40 but its weight \(32, 64\) has only min\(m, n\) = 32"),
    (tied, r"init_lora_from_spectrum: the base weight of module 'model.embed_tokens' is shared"),
    (merged, r"init_lora_from_spectrum: module 'model.layers.0.self_attn.v_proj' has adapters "
             r"merged into its base weight \(\['default'\]\)"),
    (nonfinite, r"module 'model.layers.0.mlp.down_proj': the base weight has non-finite values"),
])
def test_unsupported_models_change_nothing(tmp_path, make, match):
    model = make()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        init_lora_from_spectrum(model, cache_dir=tmp_path)
    assert_unchanged(model, snap)


def test_not_a_peft_model():
    with pytest.raises(ValueError, match=r"init_lora_from_spectrum: expected a peft.PeftModel"):
        init_lora_from_spectrum(tiny_llama())
