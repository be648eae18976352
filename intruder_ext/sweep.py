"""`intruder-ext demo --sweep`: the paper's claims, tested on the demo's model and task.

Runs LoRA with alpha = 2r and rsLoRA (alpha = 2r, scale alpha/sqrt(r)) at every rank of
``ranks``, and full fine-tuning. Comparing intruders across them is only fair at a common task
accuracy, so each run's learning rate is chosen from a grid: the *smallest* rate whose run
reaches ``target_accuracy`` on a validation split (held out from training and from the test
split) within ``epochs`` epochs, training stopping at the end of the first epoch that reaches
it. The least aggressive rate that does the task is chosen, so that no run moves its weights
further than the task needs. The search walks the grid (ascending, factors of 2) from one step
below the previous rank's choice (a higher rank needs no larger rate; at first from the value
nearest :data:`LORA_START` / :data:`FULL_START`): down while the rate below still reaches the
target, else up to the first that does. That is about two trials per run, one of them a full
``epochs`` long. A run that reaches the target at no rate of the grid keeps its best one and is
marked. Every trial's validation accuracy, intruders and drift at its end are kept: how they
move with the rate alone.

For each chosen run: intruders during training (:class:`~intruder_ext.monitor.IntruderMonitor`)
and at the end, test accuracy, and forgetting of out-of-task text (drift and similarity
forgetting, see :mod:`intruder_ext.demo`); for LoRA also after the targeted mitigation and
after its control, the uniform shrinking of the whole update by the same Frobenius norm
(:func:`~intruder_ext.reduce_intruder_dimension`, ``control="uniform"``). Writes
``results.json``, plots and ``report.md``; the numbers are reported as they come out.

Initialisation as one more dimension: at ``init_ranks`` (default: 8 and 64, those of ``ranks``)
plain LoRA is also initialised from the base weights' spectra
(:func:`~intruder_ext.init_lora_from_spectrum`, ``init_modes``: principal = PiSSA, minor =
MiLoRA; random is the LoRA run of that rank), its rate searched the same way from the random
run's. Such a run's base weights are the residual ``W0 - s B0 A0``: comparing with them would
measure against a base the user never had. Its intruders (during training too), forgetting,
mitigation and control are those of its weights ``W = W0 + s (B A - B0 A0)`` against the original
``W0``, through :class:`OriginalBaseView`.

Size: at most about ``(1 + 2 len(ranks) + n_init) * 2 trials * epochs * 0.6 max_examples /
batch_size`` training steps (``n_init`` spectrum-initialised runs), 2850 at the defaults (full
fine-tuning's steps cost twice LoRA's; runs that reach the target stop early). On this
project's 2-core CPU a LoRA step takes 0.16 s with two threads on an idle machine and 0.27 s with
one. The default sweep (19 runs, 2 or 3 learning rates tried each) took 1125 s (18 min 45 s)
with ``--threads 1`` on that machine, otherwise idle (benchmarks/RESULTS.md 5.9). On a busy machine
pass ``--threads 1``: two threads that wait for each other's time slices slowed the small linear
algebra of detection here by up to 100x. ``ranks``, ``epochs``, ``max_examples``, the rate grids,
``init_modes`` and ``init_ranks`` are the knobs.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass

import torch

from . import checks, plots
from .demo import (Prepared, TrainingSetup, accuracy, analyse_run, check_inputs, drift,
                   monitor_history, new_backbone, prepare, save_results, say, train)
from .demo_data import LABELS, OUT_OF_TASK
from .initialization import init_lora_from_spectrum
from .layers import peft_model_layers, write_peft_factors
from .monitor import IntruderMonitor

LORA_START = 2e-3  # the default demo's LoRA rate: where the search starts at the lowest rank
FULL_START = 1e-5
INIT_RANKS = (8, 64)  # the spectrum-initialised runs by default: these of ``ranks``


@dataclass
class SweepConfig(TrainingSetup):
    out: str = "intruder_ext_sweep"
    ranks: tuple = (1, 2, 4, 8, 16, 32, 64)
    epochs: int = 5  # at most: a run stops at the first epoch that reaches the target
    max_examples: int = 400  # 60% train, 20% validation, 20% test
    target_accuracy: float = 0.9  # on the validation split
    # LoRA and rsLoRA (rsLoRA's scale at r = 64 is 8 times LoRA's: it needs rates that low)
    lora_lrs: tuple = tuple(4e-3 / 2 ** i for i in range(8, -1, -1))  # 1.6e-5 ... 4e-3
    full_lrs: tuple = (5e-6, 1e-5, 2e-5, 4e-5, 8e-5)
    # Initialisations compared at ``init_ranks`` (plain LoRA): "random" is the runs above.
    init_modes: tuple = ("random", "principal", "minor")
    init_ranks: tuple | None = None  # None: those of INIT_RANKS in ranks


def init_runs(cfg: SweepConfig) -> list:
    """``(rank, mode)`` of every spectrum-initialised run, checked."""
    func = "run_sweep"
    modes = checks.init_modes(func, "init_modes", cfg.init_modes)
    ranks = tuple(r for r in INIT_RANKS if r in cfg.ranks) if cfg.init_ranks is None \
        else checks.init_ranks(func, "init_ranks", cfg.init_ranks, cfg.ranks)
    return [(r, m) for r in ranks for m in modes if m != "random"]


class OriginalBaseView:
    """A spectrum-initialised LoRA model (its base weights the residual ``W0 - s B0 A0``) seen
    against the original base ``W0``: a PeftModel on a copy of the original base whose adapter,
    of rank 2r and the same scale, holds ``[B, -B0]`` and ``[A; A0]``. Its weights
    ``W0 + s (B A - B0 A0)`` are those the trained model computes with, so that detection,
    forgetting, the mitigation and its control all act on the update ``W - W0`` from the base
    the user started from (PEFT's rank policy then keeps 2r triplets, the view's rank)."""

    def __init__(self, base, backbone, rank: int, targets):
        from peft import LoraConfig, get_peft_model

        self.initial = {layer.name: tuple(t.clone() for t in layer.factors())
                        for layer in peft_model_layers("run_sweep", backbone, "default").layers}
        # alpha = 2 (2r): the trained adapter's scale 2 (alpha = 2r at rank r)
        self.model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=2 * rank, lora_alpha=4 * rank, target_modules=list(targets), lora_dropout=0.0))
        self.layers = {layer.name: layer
                       for layer in peft_model_layers("run_sweep", self.model, "default").layers}

    def sync(self, backbone):
        """The view with ``backbone``'s current factors."""
        for layer in peft_model_layers("run_sweep", backbone, "default").layers:
            B, A = layer.factors()
            B0, A0 = self.initial[layer.name]
            write_peft_factors(self.layers[layer.name], "default", torch.cat([B, -B0], dim=1),
                               torch.cat([A, A0]), like="default")
        return self.model


class OriginalBaseMonitor(IntruderMonitor):
    """An :class:`IntruderMonitor` checking a spectrum-initialised run through its
    :class:`OriginalBaseView`."""

    def __init__(self, view: OriginalBaseView, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.view = view

    def check(self, model, step=None):
        return super().check(self.view.sync(model), step)


def _nearest(grid, value) -> int:
    return min(range(len(grid)), key=lambda i: abs(grid[i] - value))


def choose_rate(run_at, grid, start: int):
    """The index of the smallest rate of ``grid`` (ascending) whose run reaches the target,
    searched from ``start`` as the module doc says, and every trial made (index -> trial).
    ``run_at(lr)`` trains and returns a dict with ``reached`` and ``validation_accuracy``."""
    tried = {}

    def run(i):
        if i not in tried:
            tried[i] = run_at(grid[i])
        return tried[i]

    i = start
    if run(i)["reached"]:
        while i > 0 and run(i - 1)["reached"]:
            i -= 1
        return i, tried
    for j in range(i + 1, len(grid)):
        if run(j)["reached"]:
            return j, tried
    return max(tried, key=lambda j: tried[j]["validation_accuracy"]), tried


def _trial(prep: Prepared, cfg: SweepConfig, label: str, rank, rslora: bool, lr: float,
           init: str = "random") -> dict:
    """Train one run at rate ``lr``, stopping at the first epoch that reaches the target. A
    spectrum-initialised run's model is its :class:`OriginalBaseView`, and its ``init_energy``
    the mean over layers of the share of ``||W0||_F^2`` its initial adapter took."""
    backbone = new_backbone(prep.base, rank, rslora, cfg.targets, cfg.seed)
    view, initialised = None, {}
    if init != "random":
        energy = [r["energy"] for r in init_lora_from_spectrum(backbone, mode=init,
                                                                cache_dir=cfg.cache_dir)]
        initialised["init_energy"] = sum(energy) / len(energy)
        view = OriginalBaseView(prep.base, backbone, rank, cfg.targets)
    head = prep.new_head()
    if view is None:
        monitor = IntruderMonitor(cfg.monitor_every, cfg.top_k, cfg.epsilon,
                                  cache_dir=cfg.cache_dir,
                                  base_model=prep.base if rank is None else None,
                                  modules=list(cfg.targets) if rank is None else None)
    else:
        monitor = OriginalBaseMonitor(view, cfg.monitor_every, cfg.top_k, cfg.epsilon,
                                      cache_dir=cfg.cache_dir)
    validation = []

    def stop(epoch):
        validation.append(accuracy(prep.enc, backbone, head, *prep.validation))
        return validation[-1] >= cfg.target_accuracy

    t0 = time.perf_counter()
    trained = train(prep.enc, backbone, head, prep.train, epochs=cfg.epochs,
                    batch_size=cfg.batch_size, lr=lr, seed=cfg.seed, monitor=monitor, stop=stop,
                    desc=f"{label} lr={lr:g}", quiet=cfg.quiet)
    model = backbone if view is None else view.sync(backbone)
    # Every trial's own end state too: how intruders and drift move with the rate alone.
    return {"lr": lr, "reached": validation[-1] >= cfg.target_accuracy,
            "validation_accuracy": validation[-1], "epochs": len(validation), **trained,
            **initialised,
            "intruders": monitor.history[-1]["intruders/total"],
            "drift": drift(prep.base_ood, prep.enc.embed(model, prep.ood)),
            "train_seconds": round(time.perf_counter() - t0, 2),
            "monitor_seconds": round(monitor.seconds, 3),
            "intruders_vs_steps": monitor_history(monitor),
            "model": (model, head)}


def run_sweep(cfg: SweepConfig) -> dict:
    """Train every configuration at its chosen rate, measure, write results, plots and report."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    check_inputs(cfg.out, cfg.model_path)
    inits = init_runs(cfg)
    prep = prepare(cfg.model_path, cfg.max_examples, cfg.seed, cfg.threads, validation=True)
    say(cfg.quiet, f"task: {len(LABELS)} classes, {len(prep.train[1])} train / "
                   f"{len(prep.validation[1])} validation / {len(prep.test[1])} test sentences; "
                   f"target validation accuracy {cfg.target_accuracy}")
    results = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in vars(cfg).items() if k != "quiet"},
               "model_path": prep.path, "n_train": len(prep.train[1]),
               "n_validation": len(prep.validation[1]), "n_test": len(prep.test[1]),
               "linear_probe_accuracy": prep.probe_accuracy,
               "init_ranks": sorted({r for r, _ in inits}), "runs": []}
    lora_lrs, full_lrs = sorted(cfg.lora_lrs), sorted(cfg.full_lrs)
    specs = [("LoRA", r, False, "random") for r in cfg.ranks] + \
        [("rsLoRA", r, True, "random") for r in cfg.ranks]
    specs.append(("full FT", None, False, None))
    specs += [("LoRA", r, False, mode) for r, mode in inits]
    start = {False: _nearest(lora_lrs, LORA_START), True: _nearest(lora_lrs, LORA_START),
             None: _nearest(full_lrs, FULL_START)}
    lora_chosen = {}  # rank -> the random-initialised LoRA run's rate index
    for family, rank, rslora, init in tqdm(specs, desc="sweep", unit="run", disable=cfg.quiet):
        label = family if rank is None else f"{family} r={rank}"
        grid = full_lrs if rank is None else lora_lrs
        key = None if rank is None else rslora
        random = init in (None, "random")
        if not random:
            label += f" {init}"
        # A spectrum-initialised run from the rate of the same rank's random-initialised one.
        chosen, tried = choose_rate(lambda lr: _trial(prep, cfg, label, rank, rslora, lr,
                                                      init or "random"), grid,
                                    start[key] if random else lora_chosen[rank])
        if random:
            start[key] = max(chosen - 1, 0)
        if family == "LoRA" and random:
            lora_chosen[rank] = chosen
        best = tried[chosen]
        backbone, head = best.pop("model")
        run = {"label": label, "family": family, "rank": rank, "rslora": rslora, "init": init,
               "alpha": None if rank is None else 2 * rank,
               "scale": None if rank is None else (2 * rank ** 0.5 if rslora else 2.0),
               **{k: v for k, v in best.items() if k not in ("intruders", "drift")},
               "trials": [{k: v for k, v in t.items()
                           if k not in ("model", "intruders_vs_steps")}
                          for _, t in sorted(tried.items())],
               **prep.measure(backbone, head),
               **analyse_run(prep, backbone, head, rank, targets=cfg.targets, top_k=cfg.top_k,
                             epsilon=cfg.epsilon, mitigation_lambda=cfg.mitigation_lambda,
                             cache_dir=cfg.cache_dir, control=True, quiet=True)}
        for t in tried.values():
            t.pop("model", None)  # free the other trials' models
        results["runs"].append(run)
        say(cfg.quiet, _line(run))

    os.makedirs(cfg.out, exist_ok=True)
    results["plots"] = _plots(cfg, results)
    return save_results(cfg, results, t_start, _write_report)


def _line(run) -> str:
    m, c = run.get("mitigated"), run.get("control")
    text = (f"{run['label']:>18}: lr {run['lr']:g}{'' if run['reached'] else ' (target missed)'}"
            f", acc {run['accuracy']:.3f}, intruders {run['detection']['total_intruders']}, "
            f"drift {run['drift']:.4f}, sim {run['similarity_forgetting']:.4f}")
    if m:
        text += (f" | mitigated: drift {m['drift']:.4f}, acc {m['accuracy']:.3f}"
                 f" | control: drift {c['drift']:.4f}, acc {c['accuracy']:.3f}")
    return text


def _plots(cfg: SweepConfig, results: dict) -> dict:
    out, runs = cfg.out, results["runs"]
    full = next(r for r in runs if r["rank"] is None)
    families = [(f, [r for r in runs if r["family"] == f and r["init"] == "random"])
                for f in ("LoRA", "rsLoRA")]
    ranks = list(cfg.ranks)
    files = {"intruders_vs_rank": plots.plot_series(
        {f"{f} (alpha = 2r)": (ranks, [r["detection"]["total_intruders"] for r in rs])
         for f, rs in families}, "rank r", "intruders (all layers)",
        f"Intruders against rank at validation accuracy >= {cfg.target_accuracy} "
        f"(top-{cfg.top_k}, epsilon={cfg.epsilon})", os.path.join(out, "intruders_vs_rank.png"),
        logx=True, hlines={"full fine-tuning": full["detection"]["total_intruders"]},
        counts=True)}
    for f, rs in families:
        tag = f.lower()
        files[f"intruders_vs_steps_{tag}"] = plots.plot_series(
            {**{f"r={r['rank']}": tuple(zip(*r["intruders_vs_steps"])) for r in rs},
             "full FT": tuple(zip(*full["intruders_vs_steps"]))},
            "training step", "intruders (all layers)", f"{f}: intruders during training",
            os.path.join(out, f"intruders_vs_steps_{tag}.png"), counts=True)
        for measure, ylabel in (("drift", "drift: 1 - mean cos(base, tuned)"),
                                ("similarity_forgetting", "1 - corr(pair similarities)"),
                                ("accuracy", "test accuracy")):
            files[f"{measure}_{tag}"] = plots.plot_series(
                {"tuned": (ranks, [r[measure] for r in rs]),
                 f"mitigated (lambda={cfg.mitigation_lambda})":
                     (ranks, [r["mitigated"][measure] for r in rs]),
                 "uniform control (same norm)": (ranks, [r["control"][measure] for r in rs])},
                "rank r", ylabel, f"{f}: {measure.replace('_', ' ')} against rank",
                os.path.join(out, f"{measure}_{tag}.png"), logx=True,
                hlines={"full fine-tuning": full[measure]})
    if results["init_ranks"]:
        lora = {(r["rank"], r["init"]): r for r in runs if r["family"] == "LoRA"}
        for measure, ylabel in (("intruders", "intruders (all layers)"),
                                ("drift", "drift: 1 - mean cos(base, tuned)")):
            files[f"{measure}_vs_init"] = plots.plot_grouped_bars(
                [f"r={rank}" for rank in results["init_ranks"]],
                {mode: [lora[rank, mode]["detection"]["total_intruders"] if measure == "intruders"
                        else lora[rank, mode][measure] for rank in results["init_ranks"]]
                 for mode in cfg.init_modes}, ylabel,
                f"LoRA: {measure} per initialisation, against the original base",
                os.path.join(out, f"{measure}_vs_init.png"))
    return {k: os.path.basename(v) for k, v in files.items()}


def _write_report(cfg: SweepConfig, results: dict) -> None:
    runs = results["runs"]
    rows = []
    for r in runs:
        m, c = r.get("mitigated"), r.get("control")
        rows.append([
            r["label"], "-" if r["scale"] is None else f"{r['scale']:.3g}",
            f"{r['lr']:g}" + ("" if r["reached"] else " (missed)"),
            ", ".join(f"{t['lr']:g}: {t['validation_accuracy']:.2f} / {t['intruders']}"
                      for t in r["trials"]),
            r["steps"], f"{r['accuracy']:.3f}", r["detection"]["total_intruders"],
            f"{r['detection']['min_max_cos']:.3f}",
            f"{r['detection']['layers_with_intruders']}/{r['detection']['n_layers']}",
            f"{r['drift']:.4f}", f"{r['similarity_forgetting']:.4f}",
            m["detection"]["total_intruders"] if m else "-",
            f"{m['accuracy']:.3f} / {c['accuracy']:.3f}" if m else "-",
            f"{m['drift']:.4f} / {c['drift']:.4f}" if m else "-",
            f"{m['similarity_forgetting']:.4f} / {c['similarity_forgetting']:.4f}" if m else "-",
            f"{m['change_norm']:.3g} / {c['change_norm']:.3g}" if m else "-"])
    table = plots.markdown_table(
        ["run", "scale", "lr", "tried (lr: val acc / intruders)", "steps", "test acc",
         "intruders", "min max abs cos", "layers with", "drift", "sim. forgetting", "intruders mitigated",
         "acc mitigated / control", "drift mitigated / control",
         "sim. forgetting mitigated / control", "change norm mitigated / control"], rows)
    c = results["config"]
    setup = (
        f"Model: pretrained all-MiniLM-L6-v2 (`{results['model_path']}`), mean pooling + linear "
        f"head. Task: {len(LABELS)}-way topic x sentiment classification, "
        f"{results['n_train']} train / {results['n_validation']} validation / "
        f"{results['n_test']} test sentences, seed {c['seed']}; batch {c['batch_size']}, AdamW "
        f"(head lr 1e-2).\n\n"
        f"Runs: LoRA (alpha = 2r, scale 2) and rsLoRA (alpha = 2r, scale 2 sqrt(r)) on "
        f"{', '.join(c['targets'])} at ranks {', '.join(map(str, c['ranks']))}, and full "
        f"fine-tuning (intruders counted on the same modules).\n\n"
        f"Learning rate: per run, the smallest of the grid (LoRA and rsLoRA: "
        f"{', '.join(f'{x:g}' for x in c['lora_lrs'])}; full fine-tuning: "
        f"{', '.join(f'{x:g}' for x in c['full_lrs'])}) whose run reaches validation accuracy "
        f"{c['target_accuracy']} within {c['epochs']} epochs; training stops at the first epoch "
        f"that reaches it. 'tried' lists every rate trained, the validation accuracy it ended "
        f"with and its intruders then; '(missed)': no rate of the grid reached the target, the "
        f"best is shown.\n\n"
        f"Intruders: top-{c['top_k']} left singular vectors, max |cos| with every base singular "
        f"vector < {c['epsilon']}; counted during training every {c['monitor_every']} steps.\n\n"
        f"Forgetting, on {len(OUT_OF_TASK)} out-of-task sentences: drift = 1 - mean cosine of "
        f"base and tuned embeddings; similarity forgetting = 1 - Pearson correlation of the "
        f"base and tuned cosine similarities of all sentence pairs.\n\n"
        f"Mitigation: lambda = {c['mitigation_lambda']} on the intruders (PEFT's rank policy); "
        f"control: the whole update scaled so that each layer's weight changes by the same "
        f"Frobenius norm ('change norm': over all layers).\n\n"
        f"Reference: a linear probe on the frozen base model reaches test accuracy "
        f"{results['linear_probe_accuracy']:.3f}.")
    if results["init_ranks"]:
        setup += (
            f"\n\nInitialisation: LoRA at ranks {', '.join(map(str, results['init_ranks']))} "
            f"also from the base weights' top (principal, PiSSA) or bottom (minor, MiLoRA) "
            f"singular triplets (`init_lora_from_spectrum`; compared: "
            f"{', '.join(c['init_modes'])}; random is the LoRA run above), the rate searched "
            f"from the random run's. Their base weights are the residual W0 - s B0 A0, so "
            f"everything is measured against the original W0: intruders, drift and forgetting "
            f"of W = W0 + s (B A - B0 A0), and the mitigation and its control act on that "
            f"update (rank 2r, PEFT's rank policy keeping 2r triplets).")
    captions = {"intruders_vs_rank": "Intruders against rank",
                "intruders_vs_init": "LoRA: intruders per initialisation at each rank",
                "drift_vs_init": "LoRA: drift per initialisation at each rank"}
    for f in ("LoRA", "rsLoRA"):
        tag = f.lower()
        captions.update({
            f"intruders_vs_steps_{tag}": f"{f}: intruders during training",
            f"drift_{tag}": f"{f}: drift against rank, tuned, mitigated and control",
            f"similarity_forgetting_{tag}": f"{f}: similarity forgetting against rank",
            f"accuracy_{tag}": f"{f}: test accuracy against rank"})
    plots.write_markdown(
        os.path.join(cfg.out, "report.md"),
        "intruder_ext sweep: intruders, rank, learning rate and forgetting in MiniLM",
        [("Results", table + f"\n\nTotal run time: {results['total_seconds']:.0f} s. "
          "Raw numbers: `results.json`."), ("Set-up", setup)],
        [(captions[k], os.path.join(cfg.out, v)) for k, v in results["plots"].items()])
