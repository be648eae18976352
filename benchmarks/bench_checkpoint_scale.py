"""detect and mitigate on Llama-2-7B-shaped bf16 checkpoints of 1, 2 and 4 layers, and PEFT's
reduce_intruder_dimension on the 1-layer model: time and peak resident memory of each command.

The checkpoints are written by this benchmark, tensor by tensor, as a real Llama-2-7B is stored
(hidden 4096, intermediate 11008, 32 heads, vocabulary 32000, bf16, 2 GB shards), with a rank-16
LoRA on all seven linear module types saved as PEFT saves it (float32, no task type). Every
command runs in its own process; its peak RSS is the kernel's (ru_maxrss) for that process, so
everything counts: torch, the tensors read, the spectra, the writers. "empty" runs start with an
empty base-spectrum cache; "warm" ones with the cache that `intruder-ext cache` filled on the
largest model (measured too: its time per layer is the empty-cache cost of a layer). Layer n of
every model holds the same weights (one generator, one order), and the cache is content-addressed,
so that one fill serves every layer count. `detect` with an empty cache runs on the layer counts
in BENCH_EMPTY_LAYERS (default 1: each of its layers costs seven base spectra, minutes at 7B).

Run (about half an hour at full size on 2 cores; BENCH_SCALE=small for a smoke run):
    pytest benchmarks/bench_checkpoint_scale.py -p no:cacheprovider -s \
        --benchmark-json=/tmp/bench_scale.json
    python benchmarks/summarize_scale.py /tmp/bench_scale.json
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from intruder_ext.checkpoints import SafetensorsWriter, save_safetensors, write_json

SCALES = {
    "7b": dict(hidden=4096, intermediate=11008, heads=32, vocab=32000, shard=2 << 30),
    "small": dict(hidden=256, intermediate=688, heads=8, vocab=1000, shard=4 << 20),
    # the 2048-wide Llama of the other benchmarks (bench_distributed_fill.py)
    "2048": dict(hidden=2048, intermediate=5632, heads=16, vocab=128, shard=64 << 20),
}
SCALE = os.environ.get("BENCH_SCALE", "7b")
SHAPE = SCALES[SCALE]
LAYER_COUNTS = [1, 2, 4]
EMPTY_LAYER_COUNTS = [int(n) for n in os.environ.get("BENCH_EMPTY_LAYERS", "1").split(",")]
RANK = 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# The command measured in a child process; prints its wall time and peak RSS (KiB) as JSON.
CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
kind, argv = sys.argv[1], sys.argv[2:]
if kind == "cli":
    from intruder_ext.cli import main
    rc = main(argv)
else:  # PEFT's own reduce_intruder_dimension on the model loaded with transformers
    import torch, transformers, peft
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    base = transformers.AutoModelForCausalLM.from_pretrained(argv[0], dtype=torch.bfloat16)
    model = peft.PeftModel.from_pretrained(base, argv[1])
    log = []
    reduce_intruder_dimension(model, logging_sink=log.append)
    rc = 0
    json.dump([l for l in log if "Intruders:" in l], open(argv[2], "w"))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def layer_shapes(h, i):
    return {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
            "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i)}


def write_base(directory: Path, layers: int, seed: int = 0, scale: dict = SHAPE):
    """A LlamaForCausalLM checkpoint, random bf16 weights (std 0.02), shards of scale["shard"]."""
    h, i, v = scale["hidden"], scale["intermediate"], scale["vocab"]
    directory.mkdir(parents=True)
    plan = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        plan += [(f"model.layers.{n}.{name}.weight", shape)
                 for name, shape in layer_shapes(h, i).items()]
        plan += [(f"model.layers.{n}.input_layernorm.weight", (h,)),
                 (f"model.layers.{n}.post_attention_layernorm.weight", (h,))]
    plan += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    shards, current, size = [], [], 0
    for key, shape in plan:
        nbytes = torch.Size(shape).numel() * 2
        if current and size + nbytes > scale["shard"]:
            shards.append(current)
            current, size = [], 0
        current.append((key, shape))
        size += nbytes
    shards.append(current)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s, shard in enumerate(shards):
        name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(directory / name,
                                   [(k, torch.bfloat16, shape) for k, shape in shard])
        for key, shape in shard:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
            writer.write(key, t.to(torch.bfloat16))
            weight_map[key] = name
        writer.close()
    write_json(directory / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    write_json(directory / "config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": i, "num_hidden_layers": layers, "num_attention_heads": scale["heads"],
        "num_key_value_heads": scale["heads"], "vocab_size": v, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False})


def write_adapter(directory: Path, layers: int, seed: int = 1):
    """A rank-16 LoRA (alpha 32) on all seven linear types, float32, saved as PEFT saves it;
    B is non-zero and large enough that the update creates intruders."""
    h, i = SHAPE["hidden"], SHAPE["intermediate"]
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n in range(layers):
        for name, (m, k) in layer_shapes(h, i).items():
            prefix = f"base_model.model.model.layers.{n}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, k, generator=g) / k ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(m, RANK, generator=g) * 0.04
    directory.mkdir(parents=True)
    save_safetensors(directory / "adapter_model.safetensors", tensors)
    write_json(directory / "adapter_config.json", {
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": TARGETS,
        "task_type": None, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0})


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = Path(os.environ.get("BENCH_SCALE_DIR") or tmp_path_factory.mktemp("scale"))
    out = {}
    for layers in LAYER_COUNTS:
        d = root / f"{SCALE}-{layers}"
        if not (d / "adapter" / "adapter_config.json").exists():
            write_base(d / "base", layers)
            write_adapter(d / "adapter", layers)
        out[layers] = d
    return out


def run_child(kind, *argv):
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, kind, *map(str, argv)],
                         capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise AssertionError(res.stderr[-4000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(benchmark, layers, label, kind, *argv):
    """One round (a process each); the child's own time and peak RSS go into extra_info."""
    result = benchmark.pedantic(run_child, args=(kind, *argv), rounds=1, iterations=1)
    assert result["rc"] == 0
    benchmark.extra_info.update(layers=layers, case=label, seconds=result["seconds"],
                                peak_rss_mib=result["peak_rss_kib"] / 1024)
    print(f"\n{label} layers={layers}: {result['seconds']:.1f} s, "
          f"peak RSS {result['peak_rss_kib'] / 1024:.0f} MiB", flush=True)
    return result


@pytest.mark.parametrize("layers", EMPTY_LAYER_COUNTS)
def test_detect_empty_cache(benchmark, checkpoints, layers, tmp_path):
    d = checkpoints[layers]
    measure(benchmark, layers, "detect, empty cache", "cli", "detect", d / "base", d / "adapter",
            "--cache-dir", tmp_path / "cache", "-q", "--json", tmp_path / "r.json")


WARM = {}  # the cache filled by test_cache_fill, shared by the warm runs


def test_cache_fill(benchmark, checkpoints, tmp_path_factory):
    layers = max(LAYER_COUNTS)
    cache = tmp_path_factory.mktemp("warm") / "cache"
    measure(benchmark, layers, "cache (fill, empty cache)", "cli", "cache",
            checkpoints[layers] / "base", "--modules", ",".join(TARGETS), "--cache-dir", cache, "-q")
    WARM["cache"] = cache


def warm_cache(checkpoints):
    if "cache" not in WARM:  # test_cache_fill deselected: fill it unmeasured
        largest = checkpoints[max(LAYER_COUNTS)]
        WARM["cache"] = largest / "cache-warm"
        run_child("cli", "cache", largest / "base", "--modules", ",".join(TARGETS),
                  "--cache-dir", WARM["cache"], "-q")
    return WARM["cache"]


@pytest.mark.parametrize("layers", LAYER_COUNTS)
def test_detect_warm_cache(benchmark, checkpoints, layers, tmp_path):
    d = checkpoints[layers]
    measure(benchmark, layers, "detect, warm cache", "cli", "detect", d / "base", d / "adapter",
            "--cache-dir", warm_cache(checkpoints), "-q", "--json", tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["modules"]) == 7 * layers and data["totals"]["intruders"] > 0
    benchmark.extra_info["intruders"] = data["totals"]["intruders"]


@pytest.mark.parametrize("layers", LAYER_COUNTS)
def test_mitigate_warm_cache(benchmark, checkpoints, layers, tmp_path):
    d = checkpoints[layers]
    measure(benchmark, layers, "mitigate, warm cache", "cli", "mitigate", d / "base",
            d / "adapter", "--out", tmp_path / "out", "--cache-dir", warm_cache(checkpoints), "-q")


@pytest.mark.parametrize("layers", LAYER_COUNTS)
def test_merge_warm_cache(benchmark, checkpoints, layers, tmp_path):
    d = checkpoints[layers]
    measure(benchmark, layers, "mitigate --merge, warm cache", "cli", "mitigate", d / "base",
            d / "adapter", "--out", tmp_path / "out", "--merge", "--cache-dir",
            warm_cache(checkpoints), "-q")


def test_peft_reduce_one_layer(benchmark, checkpoints, tmp_path):
    """PEFT's reduce_intruder_dimension on the 1-layer model (loaded with transformers): the
    same intruders as ours, layer by layer."""
    d = checkpoints[1]
    measure(benchmark, 1, "PEFT reduce_intruder_dimension", "peft", d / "base", d / "adapter",
            tmp_path / "peft.json")
    theirs = sorted(json.loads((tmp_path / "peft.json").read_text()))
    run_child("cli", "detect", d / "base", d / "adapter", "--cache-dir",
              warm_cache(checkpoints), "-q",
              "--json", tmp_path / "ours.json")
    ours = sorted(f"base_model.model.{m['name']}: Intruders: {len(m['intruders'])}"
                  for m in json.loads((tmp_path / "ours.json").read_text())["modules"]
                  if m["intruders"])
    benchmark.extra_info["same_intruders"] = ours == theirs
    assert ours == theirs
