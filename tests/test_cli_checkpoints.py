"""The command line on LLM-style checkpoints: sharded bf16 models, adapters saved by PEFT without
a task type, GPT-2 Conv1D adapters, Hub ids from a local cache, and bad input reported as one
line with exit status 2 and nothing written."""

import json
import os
import shutil

import pytest
import torch
from factory import fake_hub, make_adapter, save_base
from test_cli import assert_user_error, cli, run_cli

import intruder_ext

pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    save_base("llama_gqa", root / "llama")
    model = make_adapter("llama_gqa", root / "llama", root / "llama_adapter")
    assert model.peft_config["default"].task_type is None  # PEFT's default: no task type
    save_base("gpt2_conv1d", root / "gpt2")
    make_adapter("gpt2_conv1d", root / "gpt2", root / "gpt2_adapter")
    return root


def files_under(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_detect_llama_adapter_without_task_type(ckpt, tmp_path, capsys):
    """The adapter that the old CLI read as zero (max_cos 1.000 everywhere) is read in full."""
    res = cli(capsys, "detect", ckpt / "llama", ckpt / "llama_adapter", "--json",
              tmp_path / "r.json", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert len(data["modules"]) == 14 and data["skipped"] == []
    assert data["totals"]["intruders"] > 0
    want = intruder_ext.find_intruders(ckpt / "llama", ckpt / "llama_adapter", progress=False,
                                       cache_dir=tmp_path / "cache")
    assert data["totals"] == want.totals


def test_gpt2_conv1d_adapter(ckpt, tmp_path, capsys):
    res = cli(capsys, "detect", ckpt / "gpt2", ckpt / "gpt2_adapter", "--json",
              tmp_path / "r.json", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    c_attn = [m for m in data["modules"] if m["name"].endswith("attn.c_attn")][0]
    assert c_attn["kind"] == "conv1d" and c_attn["shape"] == [144, 48]
    res = cli(capsys, "mitigate", ckpt / "gpt2", ckpt / "gpt2_adapter", "--out",
              tmp_path / "mitigated", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr


def test_plots_use_no_dense_svd_of_a_weight(ckpt, tmp_path, capsys, monkeypatch):
    """With the base spectra cached, detect --report draws heatmaps and spectra from the cache
    and the structured top-k: no SVD of any m x n weight."""
    cache = tmp_path / "cache"
    assert cli(capsys, "cache", ckpt / "llama", "--cache-dir", cache, "-q").returncode == 0
    shapes = []
    for owner, name in [(torch.linalg, "svd"), (torch.linalg, "svdvals"),
                        (intruder_ext.ops, "batched_svd")]:
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda A, *a, _f=original, **k: (
            shapes.append(tuple(A.shape)), _f(A, *a, **k))[1])
    res = cli(capsys, "detect", ckpt / "llama", ckpt / "llama_adapter", "--report",
              tmp_path / "report.md", "--cache-dir", cache, "-q")
    assert res.returncode == 0, res.stderr
    assert all(max(s[-2:]) <= 16 for s in shapes), shapes  # only r x r cores, if anything
    pngs = {p.name for p in (tmp_path / "report_plots").iterdir()}
    assert {"heatmap_0.png", "spectrum_0.png", "intruders_per_layer.png"} <= pngs


def test_hub_ids_from_the_local_cache(ckpt, tmp_path):
    hub = tmp_path / "hub"
    fake_hub(hub, "acme/tiny-llama", ckpt / "llama")
    fake_hub(hub, "acme/tiny-llama-lora", ckpt / "llama_adapter", revision="v1",
             commit="fedcba9876543210fedcba9876543210fedcba98")
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    res = run_cli("detect", "acme/tiny-llama", "acme/tiny-llama-lora@v1", "--json",
                  tmp_path / "r.json", "--cache-dir", tmp_path / "cache", "-q", env=env)
    assert res.returncode == 0, res.stderr
    want = intruder_ext.find_intruders(ckpt / "llama", ckpt / "llama_adapter", progress=False,
                                       cache_dir=tmp_path / "cache")
    assert json.loads((tmp_path / "r.json").read_text())["totals"] == want.totals
    res = run_cli("detect", "acme/not-there", "acme/tiny-llama-lora@v1", env=env)
    assert_user_error(res, "BASE 'acme/not-there' is not a local directory, and the Hub "
                           "repository is not in the local cache", "HF_HUB_OFFLINE")


def test_device_option(ckpt, tmp_path, capsys):
    res = cli(capsys, "detect", ckpt / "llama", ckpt / "llama_adapter", "--device", "cpu",
              "--modules", "q_proj", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    if not torch.cuda.is_available():
        assert_user_error(cli(capsys, "detect", ckpt / "llama", ckpt / "llama_adapter",
                              "--device", "cuda"), "CUDA is not available")


def broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _drop_shard(d):
    os.unlink(sorted(d.glob("model-*.safetensors"))[1])


def _truncate(d):
    f = sorted(d.glob("model-*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[:-100])


def _adapter_edit(fn):
    def edit(d):
        from safetensors.torch import load_file, save_file
        t = load_file(d / "adapter_model.safetensors")
        save_file({k: v.contiguous() for k, v in fn(t).items()}, d / "adapter_model.safetensors")
    return edit


EXTRA = "base_model.model.model.layers.0.self_attn.x_proj.lora_"
BAD = {
    "missing shard": ("base", _drop_shard, ["shard model-", "is missing"]),
    "truncated shard": ("base", _truncate, ["truncated: tensor"]),
    "key without base tensor": ("adapter", _adapter_edit(lambda t: {
        **t, EXTRA + "A.weight": torch.zeros(4, 64), EXTRA + "B.weight": torch.zeros(64, 4)}),
        ["LoRA module 'model.layers.0.self_attn.x_proj' has no base weight"]),
    "shape mismatch": ("adapter", _adapter_edit(lambda t: {
        k: (v[:3] if k.endswith("layers.1.mlp.up_proj.lora_B.weight") else v)
        for k, v in t.items()}), ["does not match BASE", "model.layers.1.mlp.up_proj"]),
    "transposed shapes": ("adapter", _adapter_edit(lambda t: {
        **t, "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.zeros(4, 32),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.zeros(64, 4)}),
        ["would fit transposed"]),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("command", ["detect", "mitigate"])
def test_bad_input_is_one_line_and_writes_nothing(ckpt, tmp_path, capsys, case, command):
    which, edit, fragments = BAD[case]
    base, adapter = ckpt / "llama", ckpt / "llama_adapter"
    if which == "base":
        base = broken_copy(base, tmp_path / "base", edit)
    else:
        adapter = broken_copy(adapter, tmp_path / "adapter", edit)
    before = files_under(tmp_path)
    out = ["--json", tmp_path / "r.json"] if command == "detect" else ["--out", tmp_path / "o"]
    res = cli(capsys, command, base, adapter, *out, "--cache-dir", tmp_path / "cache")
    assert_user_error(res, *fragments)
    assert files_under(tmp_path) == before  # nothing written, not even the cache


def test_conv1d_adapter_without_fan_in_fan_out(ckpt, tmp_path, capsys):
    def edit(d):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg["fan_in_fan_out"] = False
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    adapter = broken_copy(ckpt / "gpt2_adapter", tmp_path / "a", edit)
    assert_user_error(cli(capsys, "mitigate", ckpt / "gpt2", adapter, "--out", tmp_path / "o"),
                      "is a Conv1D layer", "fan_in_fan_out=false")
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_is_one_line(ckpt, tmp_path):
    """Online mode with the Hub out of reach (a closed local port as its endpoint)."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE":
           str(tmp_path / "hub"), "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}
    res = run_cli("detect", "acme/tiny-llama", ckpt / "llama_adapter", env=env)
    assert_user_error(res, "BASE 'acme/tiny-llama' is not a local directory",
                      "the Hub cannot be reached")


def test_cache_management(ckpt, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert cli(capsys, "cache", ckpt / "llama", "--cache-dir", cache, "-q").returncode == 0
    res = cli(capsys, "cache", "--list", "--cache-dir", cache)
    assert res.returncode == 0, res.stderr
    assert "model.layers.1.mlp.up_proj" in res.stdout and "96x64" in res.stdout
    assert f"16 entries" in res.stdout and str(ckpt / "llama") in res.stdout  # model labels
    res = cli(capsys, "cache", "--verify", "--cache-dir", cache)
    assert res.returncode == 0 and "16 of 16 entries verified" in res.stdout
    victim = sorted(cache.glob("*.safetensors"))[3]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the tensor data
    victim.write_bytes(bytes(data))
    res = cli(capsys, "cache", "--verify", "--cache-dir", cache)
    assert res.returncode == 1 and f"corrupt: {victim}" in res.stdout
    assert "15 of 16 entries verified" in res.stdout
    res = cli(capsys, "cache", "--prune", "--max-size", "40K", "--cache-dir", cache)
    assert res.returncode == 0, res.stderr
    from intruder_ext.cache import SpectrumCache
    left = SpectrumCache(cache).entries()
    assert sum(e.size for e in left) <= 40 * 1024 and len(left) >= 1
    assert "left" in res.stdout and "removed" in res.stdout
    res = cli(capsys, "cache", "--prune", "--max-age", "0", "--cache-dir", cache)
    assert res.returncode == 0 and SpectrumCache(cache).entries() == []
    assert_user_error(cli(capsys, "cache", "--list", "--max-age", "1"),
                      "--max-age and --max-size go with --prune")
    assert_user_error(cli(capsys, "cache"), "give BASE to fill the cache, or one of --list")
    assert_user_error(cli(capsys, "cache", ckpt / "llama", "--verify"), "(not both)")
    res = cli(capsys, "cache", "--prune", "--max-size", "lots")
    assert res.returncode == 2 and "--max-size must be a size such as 500M" in res.stderr
