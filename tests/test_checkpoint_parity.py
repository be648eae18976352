"""The checkpoint path (tensors read from disk, no model built) gives what the in-memory PeftModel
path gives, for every model family of the tests: the same report, and written adapters and
merged models equal to reduce_intruder_dimension's and merge_and_unload's."""

import copy

import pytest
import torch
from factory import FAMILIES, load_base, make_adapter, save_base

import intruder_ext
from intruder_ext import (find_intruders, merge_and_unload_with_reduced_intruder_dimensions,
                          mitigate_checkpoint, reduce_intruder_dimension)

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (base dir, adapter dir, the PeftModel the adapter was saved from)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        base = save_base(family, root / family / "base")
        model = make_adapter(family, base, root / family / "adapter")
        out[family] = (base, root / family / "adapter", model)
    return out


def assert_same_report(mem, disk):
    assert {m.name for m in mem} == {m.name for m in disk}
    assert mem.totals == disk.totals and mem.totals["intruders"] > 0
    for a in mem:
        b = disk[a.name]
        assert (a.kind, a.shape, a.rank) == (b.kind, b.shape, b.rank), a.name
        assert b.scale == pytest.approx(a.scale, rel=1e-12)
        assert a.intruders == b.intruders, a.name
        torch.testing.assert_close(b.max_cos, a.max_cos, atol=1e-5, rtol=0)
        torch.testing.assert_close(b.sigma, a.sigma, rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_detect_parity(saved, family, tmp_path):
    base, adapter, model = saved[family]
    cache = tmp_path / "cache"
    mem = find_intruders(model, progress=False, cache_dir=cache)
    disk = find_intruders(base, adapter, progress=False, cache_dir=cache)
    assert disk.adapter_name == "default" and disk.skipped == []
    assert_same_report(mem, disk)


def adapter_deltas(model, adapter):
    """module name -> delta weight (as PEFT computes and stores it) of every LoRA layer."""
    from peft.tuners.lora.layer import LoraLayer
    return {n: m.get_delta_weight(adapter).double() for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


@pytest.mark.parametrize("family,rank", [(f, "peft") for f in FAMILIES]
                         + [("llama_rank_pattern", "exact"), ("gpt2_conv1d", "exact"),
                            ("llama_embedding", "exact")])
def test_mitigated_adapter_parity(saved, family, rank, tmp_path):
    base, adapter, model = saved[family]
    cache = tmp_path / "cache"
    out = tmp_path / "mitigated"
    report = mitigate_checkpoint(base, adapter, out, rank=rank, cache_dir=cache, progress=False)
    assert report.totals["intruders"] > 0
    want_model = copy.deepcopy(model)
    reduce_intruder_dimension(want_model, rank=rank, logging_sink=None, cache_dir=cache)
    got_model = peft.PeftModel.from_pretrained(load_base(family, base), out)
    got, want = adapter_deltas(got_model, "default"), adapter_deltas(want_model, "intruder_reduced")
    assert got.keys() == want.keys()
    for name in want:
        rel = ((got[name] - want[name]).norm() / want[name].norm()).item()
        assert rel < 1e-5, (name, rel)
    # The written adapter keeps the original's dtypes and is what PEFT itself loads.
    assert {p.dtype for n, p in got_model.named_parameters() if "lora_" in n} == {torch.float32}


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2_conv1d", "llama_embedding", "t5", "bert"])
def test_merged_model_parity(saved, family, tmp_path):
    base, adapter, model = saved[family]
    cache = tmp_path / "cache"
    out = tmp_path / "merged"
    mitigate_checkpoint(base, adapter, out, rank="exact", merge=True, cache_dir=cache,
                        progress=False)
    files = sorted(p.name for p in out.iterdir())
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert sorted(files) == sorted(p.name for p in base.iterdir())  # BASE's shard layout
    want = merge_and_unload_with_reduced_intruder_dimensions(copy.deepcopy(model), rank="exact",
                                                             cache_dir=cache).state_dict()
    got = load_base(family, out).state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.bfloat16
        assert torch.equal(got[key], want[key]), key


def test_adapter_in_bf16_keeps_bf16(saved, tmp_path):
    """An adapter saved in bf16 (autocast_adapter_dtype=False) is written back in bf16."""
    base = saved["llama_gqa"][0]
    make_adapter("llama_gqa", base, tmp_path / "bf16", autocast=False)
    out = tmp_path / "out"
    mitigate_checkpoint(base, tmp_path / "bf16", out, cache_dir=tmp_path / "cache",
                        progress=False)
    from intruder_ext.checkpoints import SafetensorsFile
    dtypes = {t.dtype for t in SafetensorsFile(out / "adapter_model.safetensors").tensors.values()}
    assert dtypes == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama_gqa", "gpt2_conv1d", "bert", "t5"])
def test_full_fine_tuning_parity(saved, family, tmp_path):
    """A fully fine-tuned checkpoint: every weight matrix of the checkpoint is analysed with the
    kind (hence orientation) its module class has in memory."""
    base = saved[family][0]
    torch.manual_seed(3)
    tuned = load_base(family, base)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.dim() == 2:
                p.add_(0.05 * torch.randn_like(p))
    tuned.save_pretrained(tmp_path / "tuned", max_shard_size="24KB")
    tuned = load_base(family, tmp_path / "tuned")  # the saved (rounded) values
    cache = tmp_path / "cache"
    disk = find_intruders(base, tmp_path / "tuned", progress=False, cache_dir=cache, top_k=4)
    names = [m.name for m in disk]
    mem = find_intruders(load_base(family, base), tuned, modules=names, progress=False,
                         cache_dir=cache, top_k=4)
    assert sorted(m.name for m in mem) == sorted(names)
    for a in mem:
        b = disk[a.name]
        assert (a.kind, a.shape) == (b.kind, b.shape), a.name
        torch.testing.assert_close(b.max_cos, a.max_cos, atol=1e-5, rtol=0)
    kinds = {m.kind for m in disk}
    assert "embedding" in kinds and ("conv1d" in kinds) == (family == "gpt2_conv1d")
    assert intruder_ext.find_intruders(base, tmp_path / "tuned", modules=names[:1],
                                       progress=False, cache_dir=cache).totals["modules"] == 1


def test_lora_bias_merges_as_peft_merges_it(tmp_path):
    """lora_bias=True: the written adapter keeps lora_B's bias, the merge adds scale * bias."""
    base = save_base("gpt2_conv1d", tmp_path / "base")
    model = make_adapter("gpt2_conv1d", base, tmp_path / "adapter", lora_bias=True)
    cache = tmp_path / "cache"
    mitigate_checkpoint(base, tmp_path / "adapter", tmp_path / "merged", merge=True,
                        rank="exact", cache_dir=cache, progress=False)
    want = merge_and_unload_with_reduced_intruder_dimensions(copy.deepcopy(model), rank="exact",
                                                             cache_dir=cache).state_dict()
    got = load_base("gpt2_conv1d", tmp_path / "merged").state_dict()
    bias = "transformer.h.0.attn.c_attn.bias"
    assert not torch.equal(got[bias], load_base("gpt2_conv1d", base).state_dict()[bias])
    for key in want:
        assert torch.equal(got[key], want[key]), key
