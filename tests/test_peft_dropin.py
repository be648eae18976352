"""intruder_ext.reduce_intruder_dimension as a drop-in for PEFT's: the equivalent of PEFT's own
tests for the feature (peft/tests/test_lora_intruders.py), run on a local model shaped like the
Hub model they use, plus a forward pass and shape checks after mitigation; and the adapters PEFT's
own implementation cannot mitigate (bias="all", rank above min(m, n))."""

import copy
from functools import partial
from io import StringIO

import pytest
import torch
from conftest import randomize_lora
from factory import make_adapter, save_base
from reference import dense_mitigated_delta

from intruder_ext import mitigate_checkpoint, reduce_intruder_dimension

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora.layer import LoraLayer  # noqa: E402


def tiny_random_llama(dtype=torch.float32):
    """The shape of trl-internal-testing/tiny-random-LlamaForCausalLM, built locally."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=32000)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def forward(model):
    ids = torch.arange(10)[None] * 7 % 32000
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert out.shape == (1, 10, 32000) and torch.isfinite(out.float()).all()
    return out


def lora_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def test_lora_intruders_linear():
    model = peft.get_peft_model(tiny_random_llama(), peft.LoraConfig(target_modules=["q_proj"]))
    original = {n: m.lora_B["default"].weight.detach().clone()
                for n, m in lora_modules(model).items()}
    buffer = StringIO()
    reduce_intruder_dimension(model, threshold_epsilon=999,
                              logging_sink=partial(print, file=buffer))
    assert model.active_adapters == ["intruder_reduced"]
    assert set(model.peft_config) == {"default", "intruder_reduced"}
    lines = buffer.getvalue().splitlines()
    assert lines and any("q_proj" in line for line in lines)
    for name, module in lora_modules(model).items():
        assert torch.equal(module.lora_B["default"].weight, original[name])
        new = module.lora_B["intruder_reduced"].weight
        assert new.shape == original[name].shape and not torch.equal(new, original[name])
        assert module.lora_A["intruder_reduced"].weight.shape == \
            module.lora_A["default"].weight.shape
    forward(model)


def test_lora_intruders_linear_bf16_no_autocast():
    model = peft.get_peft_model(tiny_random_llama(torch.bfloat16),
                                peft.LoraConfig(target_modules=["q_proj"]),
                                autocast_adapter_dtype=False)
    dtypes = {n: m.lora_B["default"].weight.dtype for n, m in lora_modules(model).items()}
    assert set(dtypes.values()) == {torch.bfloat16}
    reduce_intruder_dimension(model, threshold_epsilon=999)
    assert model.active_adapters == ["intruder_reduced"]
    for name, module in lora_modules(model).items():
        assert module.lora_B["intruder_reduced"].weight.dtype == dtypes[name]
        assert module.lora_A["intruder_reduced"].weight.dtype == dtypes[name]
        assert module.lora_B["intruder_reduced"].weight.device == \
            module.lora_B["default"].weight.device
    forward(model)


def test_new_adapter_keeps_a_float32_adapter_on_a_bf16_base():
    """autocast_adapter_dtype=True (PEFT's default) keeps float32 adapters on a bf16 base: the
    new adapter is float32 too (the old adapter's dtype, whatever autocast was)."""
    model = peft.get_peft_model(tiny_random_llama(torch.bfloat16),
                                peft.LoraConfig(target_modules=["q_proj"]))
    reduce_intruder_dimension(model, threshold_epsilon=999, logging_sink=None)
    for module in lora_modules(model).values():
        assert module.lora_B["default"].weight.dtype == torch.float32
        assert module.lora_B["intruder_reduced"].weight.dtype == torch.float32


def test_lora_intruders_embedding():
    model = peft.get_peft_model(tiny_random_llama(),
                                peft.LoraConfig(target_modules=["embed_tokens"]))
    original = {n: m.lora_embedding_B["default"].detach().clone()
                for n, m in lora_modules(model).items()}
    buffer = StringIO()
    reduce_intruder_dimension(model, threshold_epsilon=999,
                              logging_sink=partial(print, file=buffer))
    assert model.active_adapters == ["intruder_reduced"]
    assert any("embed_tokens" in line for line in buffer.getvalue().splitlines())
    for name, module in lora_modules(model).items():
        assert torch.equal(module.lora_embedding_B["default"], original[name])
        new = module.lora_embedding_B["intruder_reduced"]
        assert new.shape == original[name].shape and not torch.equal(new, original[name])
    forward(model)


def test_non_lora_raises():
    model = peft.get_peft_model(tiny_random_llama(), peft.IA3Config(
        target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="only LoRA adapters are supported"):
        reduce_intruder_dimension(model, threshold_epsilon=999)


def test_epsilon_of_one_or_more_flags_every_vector():
    model = randomize_lora(peft.get_peft_model(tiny_random_llama(), peft.LoraConfig(
        target_modules=["q_proj"])), std=0.1)
    report = reduce_intruder_dimension(model, threshold_epsilon=1.0, logging_sink=None)
    assert all(m.intruders == list(range(len(m.sigma))) for m in report)


# ---------------------------------------------------------------------------------- bias="all"
def test_bias_all_in_memory_and_on_disk(tmp_path):
    """PEFT allows one adapter with biases; the trained biases live in the base layers, so the
    new adapter needs none in memory, and the written adapter carries them unchanged."""
    base = save_base("gpt2_conv1d", tmp_path / "base")
    model = make_adapter("gpt2_conv1d", base, tmp_path / "adapter", bias="all")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.5)  # "trained" biases
    model.save_pretrained(tmp_path / "adapter")
    want = copy.deepcopy(model)
    reduce_intruder_dimension(want, logging_sink=None, cache_dir=tmp_path / "cache")
    assert want.peft_config["intruder_reduced"].bias == "none"
    mitigate_checkpoint(base, tmp_path / "adapter", tmp_path / "out", cache_dir=tmp_path / "cache",
                        progress=False)
    from factory import load_base
    got = peft.PeftModel.from_pretrained(load_base("gpt2_conv1d", base), tmp_path / "out")
    ids = torch.arange(8)[None]
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, want(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    merged = tmp_path / "merged"
    mitigate_checkpoint(base, tmp_path / "adapter", merged, merge=True,
                        cache_dir=tmp_path / "cache", progress=False)
    merged_model = load_base("gpt2_conv1d", merged)
    with torch.no_grad():
        assert torch.equal(merged_model.transformer.h[0].ln_1.bias,
                           model.base_model.model.transformer.h[0].ln_1.bias)


# ---------------------------------------------------------------------------------- rank > min(m, n)
@pytest.mark.parametrize("rank", ["peft", "exact"])
def test_rank_above_min_dimension(tmp_path, rank):
    """r = 40 on q_proj (16 x 16): PEFT's own function fails there; the update has rank <= 16,
    so keeping rank r pads with zero columns and the exact rank is clamped to 16, both exact."""
    torch.manual_seed(0)
    model = peft.get_peft_model(tiny_random_llama(), peft.LoraConfig(
        r=40, lora_alpha=40, target_modules=["q_proj"]))
    randomize_lora(model, std=0.3)
    log = []
    reduce_intruder_dimension(model, rank=rank, logging_sink=log.append)
    assert any("exceeds min(m, n) = 16" in m or "clamped to min(m, n) = 16" in m for m in log)
    for module in lora_modules(model).values():
        B_old = module.lora_B["default"].weight.detach()
        A_old = module.lora_A["default"].weight.detach()
        W0 = module.get_base_layer().weight.detach()
        want, _ = dense_mitigated_delta(W0, B_old, A_old, module.scaling["default"], 10, 0.5, 0.75)
        got = module.get_delta_weight("intruder_reduced").double()
        assert module.r["intruder_reduced"] == (40 if rank == "peft" else 16)
        assert ((got - want).norm() / want.norm()).item() < 1e-5
    forward(model)
