"""Small checkpoints on disk as users have them: models built from configs, saved sharded in
bfloat16, LoRA adapters saved by PEFT (without task_type unless a family needs one), and a fake
Hugging Face Hub cache. Nothing is downloaded."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

SHARD = "24KB"  # small shards: every family is saved in several files, with an index


@dataclass
class Family:
    """A model family of the tests: how to build it and what a LoRA on it targets."""

    make: callable
    targets: list
    lora: dict = field(default_factory=dict)  # extra LoraConfig arguments
    load_class: str = "AutoModelForCausalLM"  # how transformers loads the saved base


def _llama(cls="LlamaForCausalLM", **over):
    import transformers
    cfg = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=97)
    cfg.update(over)
    return getattr(transformers, cls)(transformers.LlamaConfig(**cfg))


def _gpt2():
    import transformers
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=48, n_layer=2, n_head=4, vocab_size=61, n_positions=32, bos_token_id=0,
        eos_token_id=0))


def _bert():
    import transformers
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=32))


def _t5():
    import transformers
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
        decoder_start_token_id=0))


LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = {
    "llama_gqa": Family(_llama, LLAMA_ALL),
    "llama_embedding": Family(_llama, ["embed_tokens", "q_proj"]),
    "llama_rslora": Family(_llama, ["q_proj", "down_proj"], {"use_rslora": True, "r": 6}),
    "llama_rank_pattern": Family(_llama, ["q_proj", "v_proj", "up_proj"], {
        "rank_pattern": {"up_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
        "alpha_pattern": {"v_proj": 3.0}}),
    "gpt2_conv1d": Family(_gpt2, ["c_attn", "c_fc", "c_proj"], {"fan_in_fan_out": True}),
    "bert": Family(_bert, ["query", "value", "dense"], load_class="AutoModel"),
    "t5": Family(_t5, ["q", "v", "wi"], load_class="AutoModelForSeq2SeqLM"),
}


def save_base(family: str, directory: Path, seed: int = 0, dtype=torch.bfloat16) -> Path:
    torch.manual_seed(seed)
    model = FAMILIES[family].make().to(dtype)
    model.save_pretrained(directory, max_shard_size=SHARD)
    return directory


def load_base(family: str, directory: Path, dtype=torch.bfloat16):
    import transformers
    cls = getattr(transformers, FAMILIES[family].load_class)
    return cls.from_pretrained(directory, dtype=dtype).eval()


def randomize_adapter(model, adapter="default", std=0.3, seed=1):
    """PEFT initialises B (or the embedding's A) to zero: give every factor random values, large
    enough that some top singular vectors of W intrude."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and f".{adapter}" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    return model


def make_adapter(family: str, base_dir: Path, directory: Path, seed: int = 1, std: float = 0.3,
                 autocast: bool = True, **lora):
    """A PeftModel on the saved base (loaded in bf16) and its adapter saved to ``directory``;
    returns the PeftModel (whose base weights are bit-identical to the checkpoint's)."""
    import peft
    fam = FAMILIES[family]
    cfg = dict(r=4, lora_alpha=8, target_modules=fam.targets)
    cfg.update(fam.lora)
    cfg.update(lora)
    model = peft.get_peft_model(load_base(family, base_dir), peft.LoraConfig(**cfg),
                                autocast_adapter_dtype=autocast)
    randomize_adapter(model, std=std, seed=seed)
    model.save_pretrained(directory)
    return model.eval()


def fake_hub(cache: Path, repo: str, source: Path, revision: str = "main",
             commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """``source``'s files laid out as huggingface_hub's cache holds a downloaded ``repo``
    (``models--org--name/{blobs,refs,snapshots}``), so that ``HF_HUB_OFFLINE=1`` resolves it."""
    root = cache / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            blob = root / "blobs" / f"{commit[:8]}-{f.name}"
            blob.write_bytes(f.read_bytes())
            link = snapshot / f.name
            if not link.exists():
                os.symlink(os.path.relpath(blob, snapshot), link)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    return snapshot
