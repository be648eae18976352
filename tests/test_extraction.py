"""LoRA extraction from full fine-tunes (intruder_ext.extraction, `intruder-ext extract`): the
certified rank-r approximation against a dense float64 SVD, adapters PEFT loads to W0 + D_r, the
energy rank policy, and bad input reported in one line with nothing written."""

import json
import math

import pytest
import torch
from factory import load_base, save_base
from test_cli import assert_user_error, cli

import intruder_ext
from intruder_ext.extraction import NotCertifiedError, lowrank_approximation
from intruder_ext.layers import to_map

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def dense_optimum(D: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the relative Frobenius error of the best rank-r approximation."""
    S = torch.linalg.svd(D.double()).S
    return math.sqrt(max(0.0, 1 - float((S[:rank] ** 2).sum() / (S ** 2).sum())))


def save_tuned(family, base_dir, tuned_dir, perturb, dtype=torch.bfloat16):
    """A full fine-tune of ``family`` saved as the base is: the base model with ``perturb(name,
    weight)`` (stored orientation, float32) added to every 2-D weight it returns a tensor for."""
    model = load_base(family, base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                delta = perturb(name, p)
                if delta is not None:
                    p.add_(delta)
    model.to(dtype).save_pretrained(tuned_dir, max_shard_size="24KB")
    return tuned_dir


def low_rank_plus_noise(rank, seed=0, noise=0.1):
    g = torch.Generator().manual_seed(seed)

    def perturb(name, p):
        m, n = p.shape
        low = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
        return 0.05 * (low / math.sqrt(n) + noise * torch.randn(m, n, generator=g))
    return perturb


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    save_base("llama_embedding", root / "llama")
    save_tuned("llama_embedding", root / "llama", root / "llama_tuned", low_rank_plus_noise(6))
    save_base("gpt2_conv1d", root / "gpt2")
    save_tuned("gpt2_conv1d", root / "gpt2", root / "gpt2_tuned", low_rank_plus_noise(5, 1))
    return root


def checkpoint_deltas(root, family):
    """name -> D = W - W0 (map orientation, float64) of every differing weight matrix."""
    from intruder_ext.checkpoints import ModelDirectory
    from intruder_ext.layers import checkpoint_pair_layers
    base = ModelDirectory(root / family, "BASE")
    tuned = ModelDirectory(root / f"{family}_tuned", "TUNED")
    out = {}
    for layer in checkpoint_pair_layers("test", base, tuned).layers:
        D = layer.tuned_weight().double() - layer.base_weight().double()
        if D.abs().max() > 0:
            out[layer.name] = (layer.kind, D)
    return out


# ---------------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (300, 200)])
@pytest.mark.parametrize("rank", [1, 4, 17])
def test_error_matches_the_dense_optimum(shape, rank):
    g = torch.Generator().manual_seed(rank)
    m, n = shape
    D = torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g) \
        + 0.3 * torch.randn(m, n, generator=g)
    approx = lowrank_approximation(D, rank)
    optimum = dense_optimum(D, rank)
    assert approx.converged and approx.method == "subspace"
    assert abs(approx.error() - optimum) <= 1e-3 * optimum
    # The reported error is the error of the factors themselves (Pythagoras).
    B, A = approx.factors()
    true = float((D.double() - B @ A).norm() / D.double().norm())
    assert true == pytest.approx(approx.error(), rel=1e-6)
    assert float(approx.residual.max()) <= 1e-4


def test_planted_low_rank_difference_is_recovered_exactly():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(120, 5, generator=g, dtype=torch.float64) \
        @ torch.randn(5, 80, generator=g, dtype=torch.float64)
    # The default tolerance stops at the float32 stage's accuracy, reported as such...
    assert lowrank_approximation(D, 5).error() < 1e-6
    # ...a tighter one refines in float64 down to rounding.
    approx = lowrank_approximation(D, 5, tol=1e-10)
    B, A = approx.factors()
    assert approx.error() < 1e-7
    assert torch.allclose(B @ A, D, atol=1e-12 * float(D.abs().max()))
    # Asking for more than the difference holds: the extra singular values are stored as zero.
    wide = lowrank_approximation(D, 9)
    assert wide.converged and (wide.S[5:] == 0).all() and wide.error() < 1e-6


def test_unconverged_layer_falls_back_or_raises():
    g = torch.Generator().manual_seed(0)
    D = torch.randn(300, 300, generator=g)  # a flat spectrum: no certificate at tol 1e-12
    with pytest.warns(RuntimeWarning, match="did not converge.*dense SVD"):
        approx = lowrank_approximation(D, 10, tol=1e-12, max_iter=1)
    assert approx.method == "dense"
    assert approx.error() == pytest.approx(dense_optimum(D, 10), rel=1e-9)
    with pytest.raises(NotCertifiedError, match="did not converge"):
        lowrank_approximation(D, 10, tol=1e-12, max_iter=1, on_failure="raise")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(rank=0), "rank must be a positive integer (got 0)"),
    (dict(rank=2.5), "rank must be a positive integer (got 2.5)"),
    (dict(rank=2, tol=-1), "tol must be a positive number (got -1)"),
    (dict(rank=2, on_failure="ignore"), "on_failure must be one of"),
])
def test_lowrank_approximation_checks_its_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        lowrank_approximation(torch.randn(5, 4), **kwargs)


# ---------------------------------------------------------------------------------- adapters
def merged_weights(family, base_dir, adapter_dir):
    model = peft.PeftModel.from_pretrained(load_base(family, base_dir, dtype=torch.float32),
                                           adapter_dir)
    return dict(model.merge_and_unload().named_parameters())


@pytest.mark.parametrize("family", ["llama_embedding", "gpt2_conv1d"])
def test_adapter_loads_in_peft_to_the_rank_r_approximation(ckpt, tmp_path, family):
    short = family.split("_")[0]
    rank = 3
    report = intruder_ext.extract_lora(ckpt / short, ckpt / f"{short}_tuned", rank,
                                       tmp_path / "adapter", dtype="float32", progress=False)
    deltas = checkpoint_deltas(ckpt, short)
    assert sorted(r.name for r in report.layers) == sorted(deltas)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [r.name for r in report.layers]
    assert config["r"] == config["lora_alpha"] == rank and config["base_model_name_or_path"] \
        == str(ckpt / short)
    assert config["fan_in_fan_out"] == (family == "gpt2_conv1d")
    kinds = {r.name: r.kind for r in report.layers}
    assert "embedding" in kinds.values()  # embed_tokens; wte and wpe
    assert ("conv1d" in kinds.values()) == (family == "gpt2_conv1d")

    merged = merged_weights(family, ckpt / short, tmp_path / "adapter")
    base = dict(load_base(family, ckpt / short, dtype=torch.float32).named_parameters())
    for record in report.layers:
        kind, D = deltas[record.name]
        assert record.error == pytest.approx(dense_optimum(D, rank), rel=1e-3)
        U, S, Vh = torch.linalg.svd(D)
        best = (U[:, :rank] * S[:rank]) @ Vh[:rank]
        key = record.name + ".weight"
        got = to_map(kind, merged[key].detach().double() - base[key].detach().double())
        assert torch.allclose(got, best, atol=1e-5 * float(best.abs().max()) + 1e-7), key


def test_bf16_adapter_by_default(ckpt, tmp_path):
    report = intruder_ext.extract_lora(ckpt / "llama", ckpt / "llama_tuned", 2,
                                       tmp_path / "adapter", progress=False)
    assert {r.dtype for r in report.layers} == {"bfloat16"}
    merged = merged_weights("llama_embedding", ckpt / "llama", tmp_path / "adapter")
    base = dict(load_base("llama_embedding", ckpt / "llama", dtype=torch.float32)
                .named_parameters())
    deltas = checkpoint_deltas(ckpt, "llama")
    for name, (kind, D) in deltas.items():
        B, A = report.factors[name]
        stored = B.double() @ A.double()
        got = to_map(kind, merged[name + ".weight"].detach().double()
                     - base[name + ".weight"].detach().double())
        assert torch.allclose(got, stored, atol=1e-2 * float(stored.abs().max())), name


def test_energy_policy_writes_rank_pattern_that_peft_loads(ckpt, tmp_path):
    report = intruder_ext.extract_lora(ckpt / "llama", ckpt / "llama_tuned", 12,
                                       tmp_path / "adapter", rank_policy="energy:0.5",
                                       dtype="float32", progress=False)
    deltas = checkpoint_deltas(ckpt, "llama")
    ranks = {r.name: r.rank for r in report.layers}
    assert min(ranks.values()) < 12
    for record in report.layers:
        S = torch.linalg.svdvals(deltas[record.name][1])
        kept = torch.cumsum(S ** 2, 0) / (S ** 2).sum()
        assert record.rank == int((kept < 0.5).sum()) + 1, record.name
        assert record.retained >= 0.5
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    model = peft.PeftModel.from_pretrained(load_base("llama_embedding", ckpt / "llama",
                                                     dtype=torch.float32), tmp_path / "adapter")
    for name, module in model.named_modules():
        short = name.removeprefix("base_model.model.")
        if short in ranks:
            assert module.r["default"] == ranks[short], short
            assert module.scaling["default"] == 1.0


def test_unchanged_and_non_matrix_differences_are_accounted_for(ckpt, tmp_path):
    only_q = (lambda name, p: 0.01 * torch.ones_like(p) if name.endswith("layers.0.self_attn."
                                                                          "q_proj.weight") else None)
    tuned = save_tuned("llama_embedding", ckpt / "llama", tmp_path / "tuned", only_q)
    # a norm weight changes too: LoRA cannot carry it, the report must say so
    from safetensors.torch import load_file, save_file
    index = json.loads((tuned / "model.safetensors.index.json").read_text())
    key = "model.layers.0.input_layernorm.weight"
    shard = tuned / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key] * 2
    save_file(tensors, shard, metadata={"format": "pt"})
    report = intruder_ext.extract_lora(ckpt / "llama", tuned, 2, progress=False)
    assert [r.name for r in report.layers] == ["model.layers.0.self_attn.q_proj"]
    assert [s.name for s in report.skipped] == [key]
    assert "cannot carry" in report.skipped[0].reason
    assert "model.layers.1.mlp.up_proj" in report.unchanged
    assert report.out is None


# ---------------------------------------------------------------------------------- CLI
def test_cli_writes_adapter_json_and_table(ckpt, tmp_path, capsys):
    res = cli(capsys, "extract", ckpt / "llama", ckpt / "llama_tuned", "--rank", "3", "--out",
              tmp_path / "adapter", "--json", tmp_path / "r.json", "-q")
    assert res.returncode == 0, res.stderr
    assert "rel. error" in res.stdout and "model.embed_tokens" in res.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert {layer["rank"] for layer in data["layers"]} == {3}
    assert all(layer["certificate"]["converged"] for layer in data["layers"])
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    # --json never overwrites
    res = cli(capsys, "extract", ckpt / "llama", ckpt / "llama_tuned", "--rank", "3", "--out",
              tmp_path / "adapter2", "--json", tmp_path / "r.json", "-q")
    assert_user_error(res, "--json", "already exists")
    assert not (tmp_path / "adapter2").exists()


def test_cli_detect_flag_prints_the_intruder_table(ckpt, tmp_path, capsys):
    res = cli(capsys, "extract", ckpt / "llama", ckpt / "llama_tuned", "--rank", "2", "--out",
              tmp_path / "adapter", "--detect", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    assert "intruders in" in res.stdout and "adapter 'default'" in res.stdout
    want = intruder_ext.find_intruders(ckpt / "llama", tmp_path / "adapter", progress=False,
                                       cache_dir=tmp_path / "cache")
    assert str(want) in res.stdout


@pytest.mark.parametrize("args, fragments", [
    (["--rank", "0"], ["--rank", "positive integer", "0"]),
    (["--rank", "two"], ["--rank", "expected a positive integer", "'two'"]),
    (["--rank", "2", "--rank-policy", "energy:1.5"], ["--rank-policy", "energy:1.5"]),
    (["--rank", "2", "--rank-policy", "energy"], ["--rank-policy", "'energy'"]),
])
def test_cli_bad_arguments(ckpt, tmp_path, capsys, args, fragments):
    res = cli(capsys, "extract", ckpt / "llama", ckpt / "llama_tuned", *args, "--out",
              tmp_path / "adapter")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert all(f in lines[-1] for f in fragments), res.stderr
    assert not (tmp_path / "adapter").exists()


def test_cli_bad_inputs_one_line_nothing_written(ckpt, tmp_path, capsys):
    def extract(base, tuned, out="adapter"):
        return cli(capsys, "extract", base, tuned, "--rank", "2", "--out", tmp_path / out, "-q")

    (tmp_path / "exists").mkdir()
    assert_user_error(extract(ckpt / "llama", ckpt / "llama_tuned", "exists"), "--out",
                      "already exists")
    assert_user_error(extract(ckpt / "llama", ckpt / "gpt2_tuned"), "TUNED")
    assert_user_error(extract(tmp_path / "missing", ckpt / "llama_tuned"), "BASE",
                      "does not exist")
    assert_user_error(extract(ckpt / "llama", ckpt / "llama"), "same model")
    copy = save_tuned("llama_embedding", ckpt / "llama", tmp_path / "copy", lambda n, p: None)
    assert_user_error(extract(ckpt / "llama", copy), "nothing to extract")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "exists"]
    assert list((tmp_path / "exists").iterdir()) == []


def test_cli_mismatched_shapes(tmp_path, capsys):
    import transformers
    save_base("llama_embedding", tmp_path / "base")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=97)).to(torch.bfloat16).save_pretrained(
            tmp_path / "other")
    res = cli(capsys, "extract", tmp_path / "base", tmp_path / "other", "--rank", "2", "--out",
              tmp_path / "adapter", "-q")
    assert_user_error(res, "TUNED does not match BASE", "mlp")
    assert not (tmp_path / "adapter").exists()
