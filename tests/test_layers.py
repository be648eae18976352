"""The layer-access rules against what they stand for: kinds by name against transformers'
module classes, target and pattern matching against PEFT's own functions, the key prefix rule,
and the accounting of every tensor of an adapter file."""

import json

import pytest
import torch
from factory import FAMILIES, make_adapter, save_base
from safetensors.torch import load_file, save_file

from intruder_ext.checkpoints import AdapterDirectory, CheckpointError, ModelDirectory
from intruder_ext.layers import (CheckpointAdapter, checkpoint_layers, kind_from_name,
                                 kind_of_module, natural_key, pattern_value, peft_target)

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny(model_type):
    t = transformers
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=4, max_position_embeddings=32)
    configs = {
        "bert": lambda: t.BertConfig(**small),
        "roberta": lambda: t.RobertaConfig(**small),
        "llama": lambda: t.LlamaConfig(**small, num_key_value_heads=2),
        "mistral": lambda: t.MistralConfig(**small, num_key_value_heads=2),
        "qwen2": lambda: t.Qwen2Config(**small, num_key_value_heads=2),
        "gemma": lambda: t.GemmaConfig(**small, num_key_value_heads=2, head_dim=8),
        "phi3": lambda: t.Phi3Config(**small, num_key_value_heads=2, pad_token_id=0),
        "opt": lambda: t.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=48, num_hidden_layers=1,
                                   num_attention_heads=4, max_position_embeddings=32,
                                   word_embed_proj_dim=32),
        "gpt_neox": lambda: t.GPTNeoXConfig(**small),
        "falcon": lambda: t.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=4),
        "gpt2": lambda: t.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                     n_positions=32),
        "openai-gpt": lambda: t.OpenAIGPTConfig(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                                n_positions=32),
        "t5": lambda: t.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1,
                                 num_heads=4),
    }
    cfg = configs[model_type]()
    auto = t.AutoModelForSeq2SeqLM if model_type == "t5" else (
        t.AutoModelForMaskedLM if model_type in ("bert", "roberta") else t.AutoModelForCausalLM)
    return auto.from_config(cfg), cfg.model_type


@pytest.mark.parametrize("model_type", ["bert", "roberta", "llama", "mistral", "qwen2", "gemma",
                                        "phi3", "opt", "gpt_neox", "falcon", "gpt2", "openai-gpt",
                                        "t5"])
def test_kind_by_name_agrees_with_module_classes(model_type):
    """The checkpoint rule (names and model_type only) classifies every 2-D weight of the model
    as its module class does in memory."""
    model, mtype = _tiny(model_type)
    seen = set()
    for name, module in model.named_modules():
        kind = kind_of_module(module)
        if kind is None or getattr(module, "weight", None) is None:
            continue
        assert kind_from_name(name, mtype) == kind, (name, type(module).__name__)
        seen.add(kind)
    assert "embedding" in seen and ("conv1d" in seen) == (model_type in ("gpt2", "openai-gpt"))


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
         "model.layers.12.mlp.up_proj", "model.embed_tokens", "lm_head",
         "transformer.h.3.attn.c_attn", "encoder.block.0.layer.0.SelfAttention.q",
         "model.layers.1.mlp.experts.0.up_proj", "q_proj", "score"]
CONFIGS = [
    {"target_modules": ["q_proj", "up_proj"]},
    {"target_modules": "model\\.layers\\.\\d+\\.self_attn\\.q_proj"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0},
    {"target_modules": ["q_proj", "c_attn", "q"], "layers_to_transform": [0, 3],
     "layers_pattern": ["h", "block"]},
    {"target_modules": ["q_proj", "up_proj"], "exclude_modules": ["up_proj"]},
    {"target_modules": ["q_proj", "score"], "modules_to_save": ["score"]},
    {"target_modules": ["lm_head", "embed_tokens"]},
]


@pytest.mark.parametrize("config", CONFIGS)
def test_peft_target_agrees_with_peft(config):
    from peft.tuners.tuners_utils import check_target_module_exists
    cfg = peft.LoraConfig(**config)
    for name in NAMES:
        assert peft_target(config, name) == bool(check_target_module_exists(cfg, name)), name


def test_pattern_value_agrees_with_peft():
    from peft.utils.other import get_pattern_key
    patterns = {"up_proj": 2, r"layers\.1\.self_attn\.q_proj": 6, "q": 3}
    for name in NAMES:
        key = get_pattern_key(list(patterns), name)
        assert pattern_value(patterns, name, None) == patterns.get(key), name


def test_natural_order():
    names = ["l.10.a", "l.2.b", "l.2.a", "emb"]
    assert sorted(names, key=natural_key) == ["emb", "l.2.a", "l.2.b", "l.10.a"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = save_base("llama_gqa", root / "base")
    make_adapter("llama_gqa", base, root / "adapter", target_modules=["q_proj", "v_proj"])
    return root


def copy_adapter(src, dst, config=None, tensors=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    t = load_file(src / "adapter_model.safetensors")
    if tensors is not None:
        t = tensors(t)
    save_file(t, dst / "adapter_model.safetensors")
    return dst


def test_prefix_rule_bare_model_adapter_on_a_task_checkpoint(llama, tmp_path):
    """An adapter made on LlamaModel (keys without "model.") against a LlamaForCausalLM base,
    and the reverse: the one translation that fits every LoRA module is found."""
    renamed = copy_adapter(llama / "adapter", tmp_path / "bare", tensors=lambda t: {
        k.replace("base_model.model.model.", "base_model.model."): v for k, v in t.items()})
    layer_set, _ = checkpoint_layers("t", llama / "base", renamed)
    assert [l.name for l in layer_set.layers][:2] == ["layers.0.self_attn.q_proj",
                                                      "layers.0.self_attn.v_proj"]
    direct, _ = checkpoint_layers("t", llama / "base", llama / "adapter")
    for a, b in zip(layer_set.layers, direct.layers):
        assert torch.equal(a.base_weight(), b.base_weight())
    # a base saved from LlamaModel (no "model." prefix) under the causal-LM adapter
    bare_base = tmp_path / "bare_base"
    bare_base.mkdir()
    model = ModelDirectory(llama / "base")
    save_file({k.removeprefix("model."): model.store.read(k) for k in model.store.keys()},
              bare_base / "model.safetensors")
    other, _ = checkpoint_layers("t", bare_base, llama / "adapter")
    assert [l.name for l in other.layers] == [l.name for l in direct.layers]
    assert torch.equal(other.layers[0].base_weight(), direct.layers[0].base_weight())


def test_every_adapter_tensor_is_accounted_for(llama, tmp_path):
    def edit(t):
        t["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        t["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
        t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"] = torch.zeros(96, 4)
        return t
    with_extra = copy_adapter(llama / "adapter", tmp_path / "extra", tensors=edit)
    layer_set, _ = checkpoint_layers("t", llama / "base", with_extra)
    skipped = {s.name: s.reason for s in layer_set.skipped}
    assert "incomplete LoRA pair (only lora_A.weight)" in skipped["model.layers.9.self_attn.q_proj"]
    assert "not targeted by adapter_config.json" in skipped["model.layers.1.mlp.up_proj"]
    assert len(layer_set.layers) == 4


@pytest.mark.parametrize("edit, message", [
    (lambda t: {**t, "base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight":
                torch.zeros(4, 64), "base_model.model.model.layers.0.self_attn.x_proj.lora_B.weight":
                torch.zeros(64, 4)},
     r"LoRA module 'model.layers.0.self_attn.x_proj' has no base weight"),
    (lambda t: {k: (v[:, :32].contiguous() if k.endswith("q_proj.lora_A.weight") else v) for k, v in t.items()},
     r"does not match BASE: 'model.layers.0.self_attn.q_proj' has lora_B @ lora_A of shape "
     r"\(64, 32\) but the base weight"),
    (lambda t: {**t, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
                torch.ones(64)}, r"is a DoRA module"),
    (lambda t: {k: v for k, v in t.items() if "lora_" not in k}, r"holds no LoRA weights"),
])
def test_adapters_that_do_not_fit(llama, tmp_path, edit, message):
    bad = copy_adapter(llama / "adapter", tmp_path / "bad", tensors=edit)
    with pytest.raises(CheckpointError, match=message):
        checkpoint_layers("t", llama / "base", bad)


def test_transposed_shapes_are_named(llama, tmp_path):
    """v_proj maps 64 -> 32: factors made for the transposed weight fit only transposed."""
    def transpose(t):
        a = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
        b = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        return {**t, a: torch.zeros(4, 32), b: torch.zeros(64, 4)}
    bad = copy_adapter(llama / "adapter", tmp_path / "t", tensors=transpose)
    with pytest.raises(CheckpointError, match=r"they would fit transposed: check fan_in_fan_out"):
        checkpoint_layers("t", llama / "base", bad)


def test_rank_contradicting_the_config(llama, tmp_path):
    bad = copy_adapter(llama / "adapter", tmp_path / "r", config={"r": 8})
    with pytest.raises(CheckpointError, match=r"gives 'model.layers.0.self_attn.q_proj' rank 8 "
                                              r"but its lora_A has 4 rows"):
        checkpoint_layers("t", llama / "base", bad)


def test_conv1d_adapter_without_fan_in_fan_out(tmp_path):
    base = save_base("gpt2_conv1d", tmp_path / "base")
    make_adapter("gpt2_conv1d", base, tmp_path / "adapter")
    bad = copy_adapter(tmp_path / "adapter", tmp_path / "nofifo", config={"fan_in_fan_out": False})
    with pytest.raises(CheckpointError, match=r"'transformer.h.0.attn.c_attn' is a Conv1D layer "
                                              r"\(stored as \(in, out\)\) but adapter_config.json "
                                              r"has fan_in_fan_out=false"):
        checkpoint_layers("t", base, bad)
    good = CheckpointAdapter(ModelDirectory(base), AdapterDirectory(tmp_path / "adapter"))
    assert {l.kind for l in good.layers} == {"conv1d"}
    assert good.layers[0].shape == (144, 48)  # c_attn maps 48 -> 144


def test_nonfinite_factor_is_named(llama, tmp_path):
    from intruder_ext.layers import NonFiniteError

    def poison(t):
        key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
        t[key] = t[key].clone()
        t[key][3, 1] = float("nan")
        return t
    bad = copy_adapter(llama / "adapter", tmp_path / "nan", tensors=poison)
    layer_set, _ = checkpoint_layers("t", llama / "base", bad)
    layer = [l for l in layer_set.layers if l.name == "model.layers.1.self_attn.v_proj"][0]
    with pytest.raises(NonFiniteError, match=r"module 'model.layers.1.self_attn.v_proj': lora_B "
                                             r"has non-finite values \(1 NaN, 0 inf of 128\)"):
        layer.factors()


def test_families_all_load(tmp_path):
    for family in FAMILIES:
        base = save_base(family, tmp_path / family / "base")
        make_adapter(family, base, tmp_path / family / "adapter")
        layer_set, ckpt = checkpoint_layers("t", base, tmp_path / family / "adapter")
        assert layer_set.layers and not layer_set.skipped, family
        for layer in layer_set.layers:
            B, A = layer.factors()
            assert B.shape == (layer.shape[0], layer.rank) and A.shape == (layer.rank, layer.shape[1])
            assert layer.base_weight().shape == layer.shape
