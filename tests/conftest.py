"""Shared fixtures and tiny PEFT models built from configs (nothing is downloaded)."""

import signal

import pytest
import torch

import intruder_ext

# A runner that starts the tests in the background without job control (`cmd &` in a script)
# leaves SIGINT ignored, and the processes the tests start inherit that: the Ctrl-C tests would
# wait in vain for an interruption. At a terminal Ctrl-C is delivered; with a handler here,
# children start with the default disposition again (exec resets handlers, not SIG_IGN).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

requires_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and intruder_ext.cuda_built()),
                                   reason="needs a GPU and the CUDA kernels")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_llama(seed=0, hidden=64, inter=96, layers=1, dtype=torch.float32):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=97)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=48, n_layer=1, n_head=4, vocab_size=61, n_positions=32)
    return transformers.GPT2Model(cfg).eval()


def randomize_lora(model, adapter="default", std=1.0, seed=1):
    """Non-zero lora_B (PEFT initialises it to zero), so the adapter changes the weights:
    large enough that some top singular vectors of W are intruders."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for holder in ("lora_B", "lora_embedding_B", "lora_embedding_A"):
                d = getattr(module, holder, None)
                if d is None or adapter not in d:
                    continue
                p = d[adapter] if holder.startswith("lora_embedding") else d[adapter].weight
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
    return model


def lora_llama(r=4, alpha=8, seed=0, std=0.05, targets=LLAMA_TARGETS, layers=1, **config):
    import peft

    model = tiny_llama(seed, layers=layers)
    lcfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **config)
    return randomize_lora(peft.get_peft_model(model, lcfg), std=std, seed=seed + 1)


@pytest.fixture(autouse=True)
def _private_spectrum_cache(tmp_path, monkeypatch):
    """cache_dir=None means the default cache directory: keep it out of the home directory."""
    monkeypatch.setenv("INTRUDER_EXT_CACHE_DIR", str(tmp_path / "spectra"))


@pytest.fixture
def llama_lora():
    return lora_llama()
