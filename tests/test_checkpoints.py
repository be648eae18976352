"""Checkpoint files: the safetensors reader and writer against the safetensors library, sharded
and .bin model directories, adapter configs, and every malformed input as one clear error."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from intruder_ext.checkpoints import (AdapterDirectory, CheckpointError, ModelDirectory,
                                      SafetensorsFile, SafetensorsWriter, atomic_directory,
                                      atomic_file, check_new_output, save_safetensors)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8,
          torch.bool, torch.uint8]


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        t = torch.randn(3, 5, generator=g) * 10
        out[f"t{i}"] = t > 0 if dtype == torch.bool else t.to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["noncontiguous"] = torch.randn(6, 4, generator=g).T
    return out


def test_reader_matches_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "a.safetensors",
              metadata={"x": "y"})
    f = SafetensorsFile(tmp_path / "a.safetensors")
    assert sorted(f.keys()) == sorted(tensors) and f.metadata == {"x": "y"}
    for key, want in tensors.items():
        got = f.read(key)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_writer_output_loads_with_the_safetensors_library(tmp_path):
    tensors = sample_tensors()
    save_safetensors(tmp_path / "b.safetensors", tensors, {"format": "pt"})
    with safe_open(tmp_path / "b.safetensors", framework="pt") as f:
        assert list(f.keys()) == sorted(tensors) or set(f.keys()) == set(tensors)
        for key, want in tensors.items():
            assert torch.equal(f.get_tensor(key), want)


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    writer = SafetensorsWriter(tmp_path / "c.safetensors", [("a", torch.float32, (2,))])
    with pytest.raises(RuntimeError, match=r"expected 'a' torch.float32 \[2\], got 'a' "
                                           r"torch.float64 \[2\]"):
        writer.write("a", torch.zeros(2, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"closed after 0 of 1 tensors"):
        writer.close()
    writer.abort()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-7], r"truncated: tensor 'w' ends at byte \d+ but the file has \d+"),
    (lambda b: b[:5], r"not a safetensors file \(only 5 bytes\)"),
    (lambda b: b"garbage!" * 40, r"not a safetensors file or truncated \(header of"),
    (lambda b: struct.pack("<Q", 12) + b"not json !!!" + b[20:], r"its header is not JSON"),
    (lambda b: struct.pack("<Q", 2) + b"[]", r"header is not an object"),
])
def test_damaged_files(tmp_path, damage, message):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(8, 8)}, path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=message) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_inconsistent_offsets(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with pytest.raises(CheckpointError, match=r"tensor 'w' has inconsistent offsets \[0, 12\] "
                                              r"for shape \[2, 2\] \(F32\)"):
        SafetensorsFile(path)


def save_sharded(model_dir, tensors, shards):
    model_dir.mkdir()
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, model_dir / name)
        weight_map.update(dict.fromkeys(keys, name))
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))


def test_sharded_model_directory(tmp_path):
    tensors = {f"layer.{i}.weight": torch.randn(4, 3) for i in range(5)}
    save_sharded(tmp_path / "m", tensors, [["layer.0.weight", "layer.1.weight"],
                                           ["layer.2.weight"], ["layer.3.weight", "layer.4.weight"]])
    model = ModelDirectory(tmp_path / "m")
    assert model.model_type == "llama" and len(model.weight_files()) == 3
    for key, want in tensors.items():
        assert model.store.info(key) == (torch.float32, (4, 3))
        assert torch.equal(model.store.read(key), want)


def test_missing_shard_and_wrong_index(tmp_path):
    tensors = {"a.weight": torch.randn(2, 2), "b.weight": torch.randn(2, 2)}
    save_sharded(tmp_path / "m", tensors, [["a.weight"], ["b.weight"]])
    (tmp_path / "m" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors named in "
                                              r"model.safetensors.index.json is missing"):
        ModelDirectory(tmp_path / "m")
    save_sharded(tmp_path / "n", tensors, [["a.weight"], ["b.weight"]])
    index = json.loads((tmp_path / "n" / "model.safetensors.index.json").read_text())
    index["weight_map"]["b.weight"] = "model-00001-of-00002.safetensors"
    (tmp_path / "n" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"puts 'b.weight' in model-00001-of-00002"
                                              r".safetensors, which does not contain it"):
        ModelDirectory(tmp_path / "n")


def test_bin_fallback_single_and_sharded(tmp_path):
    tensors = {"a.weight": torch.randn(3, 2), "b.weight": torch.randn(2, 2).bfloat16()}
    (tmp_path / "single").mkdir()
    torch.save(tensors, tmp_path / "single" / "pytorch_model.bin")
    model = ModelDirectory(tmp_path / "single")
    assert all(torch.equal(model.store.read(k), v) for k, v in tensors.items())
    (tmp_path / "sharded").mkdir()
    torch.save({"a.weight": tensors["a.weight"]}, tmp_path / "sharded" / "p1.bin")
    torch.save({"b.weight": tensors["b.weight"]}, tmp_path / "sharded" / "p2.bin")
    (tmp_path / "sharded" / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {"a.weight": "p1.bin", "b.weight": "p2.bin"}}))
    model = ModelDirectory(tmp_path / "sharded")
    assert model.store.info("b.weight") == (torch.bfloat16, (2, 2))
    assert torch.equal(model.store.read("b.weight"), tensors["b.weight"])
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "pytorch_model.bin").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: not a PyTorch weights file"):
        ModelDirectory(tmp_path / "evil").store.keys()


def test_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"model '.*' has no model weights"):
        ModelDirectory(tmp_path)


def lora_config(**over):
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("config, message", [
    ([1, 2], r"expected a JSON object, got list"),
    (lora_config(r="four"), r"r must be a positive integer \(got 'four'\)"),
    (lora_config(r=0), r"r must be a positive integer \(got 0\)"),
    (lora_config(lora_alpha="x"), r"lora_alpha must be a finite number \(got 'x'\)"),
    (lora_config(rank_pattern={"q": 2.5}), r"rank_pattern must be an object of positive"),
    (lora_config(use_dora=True), r"use_dora is true; DoRA adapters .* not supported"),
    (lora_config(peft_type="IA3"), r"peft_type is 'IA3'; only LoRA adapters are supported"),
    (lora_config(layers_to_transform="0"), r"layers_to_transform must be an integer or a list"),
    (lora_config(bias="some"), r"bias must be 'none', 'all' or 'lora_only' \(got 'some'\)"),
])
def test_adapter_config_is_checked(tmp_path, config, message):
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        AdapterDirectory(tmp_path)


def test_adapter_config_not_json(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"adapter_config.json is not valid JSON"):
        AdapterDirectory(tmp_path)


def test_check_new_output(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "exists.json").write_text("{}")
    assert check_new_output(tmp_path / "new.json", "--json") == tmp_path / "new.json"
    with pytest.raises(CheckpointError, match=r"already exists \(use --force to overwrite it\)"):
        check_new_output(tmp_path / "exists.json", "--json")
    assert check_new_output(tmp_path / "exists.json", "--json", force=True)
    with pytest.raises(CheckpointError, match=r"is inside the ADAPTER directory"):
        check_new_output(tmp_path / "in" / "r.json", "--json", [("ADAPTER", tmp_path / "in")],
                         force=True)
    with pytest.raises(CheckpointError, match=r"already exists; choose a new directory"):
        check_new_output(tmp_path / "in", "--out", directory=True)
    with pytest.raises(CheckpointError, match=r"parent directory .* does not exist"):
        check_new_output(tmp_path / "no" / "r.json", "--json")


def test_atomic_outputs_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half").write_text("x")
            raise RuntimeError("interrupted")
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "r.json") as f:
            f.write("{")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "done").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
