"""Markdown table from a pytest-benchmark JSON file: each group's implementations side by side,
with time and peak-memory ratios against the group's baseline (the other implementation)."""

import json
import sys
from collections import defaultdict

OURS = "intruder_ext"


def implementation(bench):
    return bench["params"].get("impl") or bench["name"].split("[")[0]


def main(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(dict)
    for bench in data["benchmarks"]:
        groups[bench["group"]][implementation(bench)] = bench
    print(f"Machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
          f"{data['machine_info'].get('cpu', {}).get('count', '?')} cores; {data['datetime']}\n")
    print("| case | implementation | median time (s) | peak extra memory (MiB) | speed vs baseline | memory vs baseline |")
    print("|---|---|---|---|---|---|")
    for group, impls in groups.items():
        baseline = next((b for name, b in impls.items() if name != OURS), None)
        for name, bench in sorted(impls.items(), key=lambda kv: kv[0] != OURS):
            t = bench["stats"]["median"]
            mem = bench["extra_info"].get("peak_extra_MiB")
            speed = mem_ratio = ""
            if name == OURS and baseline is not None:
                speed = f"{baseline['stats']['median'] / t:.2f}x"
                base_mem = baseline["extra_info"].get("peak_extra_MiB")
                if mem is not None and base_mem:
                    mem_ratio = f"{mem / base_mem:.3f}x"
            mem_text = f"{mem:.1f}" if mem is not None else ""
            print(f"| {group} | {name} | {t:.4f} | {mem_text} | {speed} | {mem_ratio} |")


if __name__ == "__main__":
    main(sys.argv[1])
