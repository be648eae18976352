"""PiSSA initialisation: intruder_ext's init_lora_from_spectrum (base spectra cached) against
PEFT's init_lora_weights="pissa" (a full SVD per layer) and "pissa_niter_4" (a randomized
rank-r SVD per layer), side by side.

Case: a 2-layer, 2048-wide Llama-shaped model built from a config (float32), rank-16 LoRA on all
seven linear module types. Each round starts from a fresh copy of the base model and times the
whole path from the base model to the initialised PeftModel: ``get_peft_model`` with PEFT's
init, or ``get_peft_model`` with the default init followed by ``init_lora_from_spectrum`` (the
default init's work is counted against ours). The cache is warmed by one untimed call on the
same base model; a warm round still hashes every base weight to find its entry. The adapters
of ``pissa`` and ours must agree: each layer's ``s B A`` and the norm of its residual base
weight, to 1e-4 (relative); ``extra_info`` holds each implementation's largest relative distance
from ``pissa``'s ``s B A`` (``pissa_niter_4`` is a randomized approximation).

Run (PEFT's full SVDs take a while at full size; BENCH_SCALE=small for a smoke run):
    pytest benchmarks/bench_init.py -p no:cacheprovider -s \
        --benchmark-columns=min,median,rounds --benchmark-json=/tmp/bench_init.json
    python benchmarks/summarize.py /tmp/bench_init.json

"speedup" in extra_info (and printed with -s) = the PEFT implementation's median / ours.
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCALES = {
    "full": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                 num_key_value_heads=4),
    "small": dict(hidden_size=256, intermediate_size=688, num_attention_heads=8,
                  num_key_value_heads=2),
}
SCALE = os.environ.get("BENCH_SCALE", "full")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
RANK, ALPHA = 16, 32
IMPLS = ["peft_pissa", "peft_pissa_niter_4", "intruder_ext"]  # ours last: it reports the ratios

_base = {}
_medians = {}
_updates = {}  # impl -> [(s B A, ||W0 - s B A||) per layer]
_cache = tempfile.TemporaryDirectory()


def base_model():
    if not _base:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(num_hidden_layers=2, vocab_size=128, **SCALES[SCALE])
        _base["model"] = transformers.LlamaForCausalLM(cfg).eval()
    return copy.deepcopy(_base["model"])


def config(init):
    return peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                           init_lora_weights=init)


def run_peft(init):
    return lambda model: peft.get_peft_model(model, config(init))


def run_ours(cache):
    def run(model):
        peft_model = peft.get_peft_model(model, config(True))
        intruder_ext.init_lora_from_spectrum(peft_model, cache_dir=cache)
        return peft_model
    return run


def layer_updates(peft_model):
    """Each layer's ``s B A`` (float64) and its base weight's norm."""
    from peft.tuners.lora.layer import LoraLayer

    out = []
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            B, A = module.lora_B["default"].weight.detach(), module.lora_A["default"].weight.detach()
            update = module.scaling["default"] * (B.double() @ A.double())
            out.append((update, float(module.get_base_layer().weight.detach().double().norm())))
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_init(benchmark, impl):
    if impl == "intruder_ext":
        cache = SpectrumCache(_cache.name)
        run_ours(cache)(base_model())  # warm the cache, untimed
        fn = run_ours(cache)
    else:
        fn = run_peft(impl.removeprefix("peft_"))
    benchmark.group = f"init llama{SCALES[SCALE]['hidden_size']} r={RANK}"
    result = benchmark.pedantic(fn, setup=lambda: ((base_model(),), {}), rounds=ROUNDS,
                                iterations=1)
    _medians[impl] = benchmark.stats.stats.median
    _updates[impl] = layer_updates(result)
    if impl != "peft_pissa":  # how far from the exact PiSSA update (pissa_niter_4 approximates)
        gap = max(float((u - exact).norm() / exact.norm()) for (u, _), (exact, _) in
                  zip(_updates[impl], _updates["peft_pissa"], strict=True))
        benchmark.extra_info["max_relative_gap_to_pissa"] = gap
        print(f"\n{impl}: s B A within {gap:.1e} (relative, worst layer) of PEFT's pissa")
    if impl != "intruder_ext":
        return
    for (ours_u, ours_w), (peft_u, peft_w) in zip(_updates[impl], _updates["peft_pissa"],
                                                  strict=True):
        assert float((ours_u - peft_u).norm()) <= 1e-4 * float(peft_u.norm())
        assert ours_w == pytest.approx(peft_w, rel=1e-4)
    for other in IMPLS[:-1]:
        speedup = _medians[other] / _medians[impl]
        benchmark.extra_info[f"speedup_vs_{other}"] = speedup
        print(f"\nintruder_ext (warm cache) vs {other}: {speedup:.2f}x "
              f"({_medians[other]:.3f} s against {_medians[impl]:.3f} s)")
