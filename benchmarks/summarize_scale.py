"""Markdown table from bench_checkpoint_scale.py's pytest-benchmark JSON: time and peak RSS per
command and layer count, the peak RSS relative to the 1-layer run (flat memory is 1.0x), the
marginal time per layer, and the extrapolation to a 32-layer (7B) model."""

import json
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        data = json.load(f)
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        rows[info["case"]][info["layers"]] = info
    cpu = data["machine_info"].get("cpu", {})
    print(f"Machine: {cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores; "
          f"{data['datetime']}\n")
    print("| command | layers | time (s) | peak RSS (MiB) | RSS vs 1 layer | time per layer (s) "
          "| 32 layers (extrapolated) |")
    print("|---|---|---|---|---|---|---|")
    for case, by_layers in rows.items():
        one = by_layers.get(1)
        counts = sorted(by_layers)
        # marginal cost of a layer from the largest and smallest runs (start-up cancels out)
        lo, hi = by_layers[counts[0]], by_layers[counts[-1]]
        per_layer = ((hi["seconds"] - lo["seconds"]) / (counts[-1] - counts[0])
                     if len(counts) > 1 else lo["seconds"] / counts[0])
        for n in counts:
            r = by_layers[n]
            ratio = f"{r['peak_rss_mib'] / one['peak_rss_mib']:.2f}x" if one else ""
            last = n == counts[-1]
            per = f"{per_layer:.1f}" if last else ""
            extra = f"{lo['seconds'] + per_layer * (32 - counts[0]):.0f} s" if last else ""
            print(f"| {case} | {n} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} | {ratio} | "
                  f"{per} | {extra} |")

if __name__ == "__main__":
    main(sys.argv[1])
