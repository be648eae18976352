"""`intruder-ext cache` on one process against `torchrun --nproc-per-node 2` (gloo, CPU) on the
same checkpoint: the 2-layer 2048-wide Llama (hidden 2048, intermediate 5632, bf16), all 14
linear weights. Each run fills its own empty cache in a child process; the two caches must hold
the same entries (the same keys; the values are recorded as bit-identical or not: one process
runs two threads, a rank one, and LAPACK may round differently with the thread count;
tests/test_distributed.py checks bit identity at one thread in both).

On this 2-core machine this shows the mechanism, not a speed-up: one process already uses both
cores (two threads), and two ranks get one thread each (torchrun's default OMP_NUM_THREADS=1),
so both runs have the same two cores. The gain is for machines with more cores, GPUs or nodes
than one process can use.

    pytest benchmarks/bench_distributed_fill.py -p no:cacheprovider -s \\
        --benchmark-json=/tmp/bench_fill.json
"""

import os
import subprocess
import sys
import time

import pytest
import torch
from bench_checkpoint_scale import SCALES, write_base
from safetensors.torch import load_file

MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
COMMANDS = {
    "1 process": [sys.executable, "-m", "intruder_ext"],
    "torchrun, 2 ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "intruder_ext"],
}
CACHES = {}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fill") / "base"
    write_base(directory, layers=2, scale=SCALES["2048"])
    return directory


def run(command, base, cache):
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    res = subprocess.run([*command, "cache", str(base), "--modules", MODULES,
                          "--cache-dir", str(cache), "-q"], capture_output=True, text=True,
                         env=env, cwd=cache.parent)
    if res.returncode != 0:
        raise AssertionError(res.stderr[-4000:])
    return time.perf_counter() - start


@pytest.mark.parametrize("case", list(COMMANDS))
def test_fill(benchmark, base, case, tmp_path):
    cache = tmp_path / "cache"
    seconds = benchmark.pedantic(run, args=(COMMANDS[case], base, cache), rounds=1,
                                 iterations=1)
    CACHES[case] = {p.name: load_file(p) for p in cache.iterdir() if p.suffix == ".safetensors"}
    assert len(CACHES[case]) == 14
    benchmark.extra_info.update(case=case, seconds=seconds, entries=len(CACHES[case]))
    print(f"\n{case}: {seconds:.1f} s", flush=True)
    if len(CACHES) == len(COMMANDS):
        one, two = CACHES.values()
        assert one.keys() == two.keys()
        identical = all(torch.equal(one[n][t], two[n][t]) for n in one for t in one[n])
        sigma_gap = max(float(((one[n]["S"].double() - two[n]["S"].double()).abs()
                               / one[n]["S"].double()[0]).max()) for n in one)
        benchmark.extra_info.update(identical_to_1_process=identical, max_sigma_gap=sigma_gap)
        print(f"entries bit-identical between the two fills: {identical}; "
              f"max |S difference| / s_1: {sigma_gap:.1e}", flush=True)
        assert sigma_gap < 1e-5
