"""The base-spectrum cache filled over torch.distributed: the cost balance, 2 gloo ranks on CPU
against one process, and a rank killed midway then a re-run."""

import itertools
import os
import subprocess
import sys

import pytest
import torch
from factory import save_base
from safetensors.torch import load_file

from intruder_ext.distributed import balance, spectrum_cost

pytest.importorskip("transformers")


def test_balance_is_by_cost_and_near_optimal():
    costs = [spectrum_cost(s) for s in [(4096, 11008), (11008, 4096), (4096, 4096), (4096, 4096),
                                        (1024, 4096), (4096, 4096), (11008, 4096)]]
    for world in (1, 2, 3, 4):
        owner = balance(costs, world)
        loads = [sum(c for c, r in zip(costs, owner) if r == k) for k in range(world)]
        best = min(max(sum(c for c, r in zip(costs, a) if r == k) for k in range(world))
                   for a in itertools.product(range(world), repeat=len(costs)))
        assert max(loads) <= 4 / 3 * best
    # by cost, not by count: one huge weight against many small ones
    assert balance([1000, 1, 1, 1, 1], 2) == [0, 1, 1, 1, 1]


DRIVER = r"""
import os, signal, sys
if os.environ.get("KILL_RANK") == os.environ["RANK"]:
    import intruder_ext.cache as cache
    original, calls = cache.SpectrumCache.get, [0]
    def get(self, *a, **k):
        calls[0] += 1
        if calls[0] == 3:  # after two entries of its own
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *a, **k)
    cache.SpectrumCache.get = get
from intruder_ext.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    (root / "driver.py").write_text(DRIVER)
    return save_base("llama_gqa", root / "base")


def torchrun(tmp_path, *argv, kill_rank=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    if kill_rank is not None:
        env["KILL_RANK"] = str(kill_rank)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(tmp_path.parent / "driver.py"),
                           *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=tmp_path)


def entries(cache):
    return {p.name: load_file(p) for p in sorted(cache.iterdir()) if p.suffix == ".safetensors"}


def test_two_ranks_fill_the_same_cache_as_one_process(base, tmp_path, capsys):
    res = torchrun(base, "cache", base, "--cache-dir", tmp_path / "two", "-q")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("cached 16 base spectra") == 1  # rank 0 reports, once
    single = subprocess.run([sys.executable, "-m", "intruder_ext", "cache", str(base),
                             "--cache-dir", str(tmp_path / "one"), "-q"], capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
                            cwd=tmp_path)  # not the source tree, which holds no built _C
    assert single.returncode == 0, single.stderr
    two, one = entries(tmp_path / "two"), entries(tmp_path / "one")
    assert len(one) == 16 and two.keys() == one.keys()
    for name in one:  # the same computation (one thread per process in both): the same bits
        assert one[name].keys() == two[name].keys()
        for t in one[name]:
            assert torch.equal(one[name][t], two[name][t]), (name, t)


def test_a_rank_killed_midway_then_a_re_run(base, tmp_path):
    from intruder_ext.cache import SpectrumCache
    cache = tmp_path / "cache"
    res = torchrun(base, "cache", base, "--cache-dir", cache, "-q", kill_rank=1)
    assert res.returncode != 0
    partial = SpectrumCache(cache)
    assert partial.verify() == []  # no corrupt entry from the killed rank
    done = len(partial.entries())
    assert 2 <= done < 16
    res = torchrun(base, "cache", base, "--cache-dir", cache)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"({done} already cached)" in res.stderr  # only what was missing was computed
    assert len(SpectrumCache(cache).entries()) == 16 and SpectrumCache(cache).verify() == []
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]
