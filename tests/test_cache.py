"""SpectrumCache: keys, hits, atomic writes, concurrent fills, corrupt entries."""

import multiprocessing as mp
import os
from pathlib import Path

import pytest
import torch

from intruder_ext import cache as cache_mod
from intruder_ext.cache import SpectrumCache, default_cache_dir
from intruder_ext.spectral import base_spectrum


def weight(seed=0, shape=(40, 30)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def entries(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def assert_same_spectrum(a, b):
    for name in ("U", "S"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.weight, b.weight)


def test_miss_then_hit(tmp_path):
    cache = SpectrumCache(tmp_path)
    W0 = weight()
    first = cache.get(W0)
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)
    second = SpectrumCache(tmp_path).get(W0)  # a fresh object (another run) reads the file
    assert_same_spectrum(first, second)
    assert_same_spectrum(first, base_spectrum(W0))
    assert cache.get(W0) is not first and cache.stats.hits == 1
    assert entries(tmp_path) == [cache.path(W0).name]


def test_key_changes_with_content_shape_and_dtype(tmp_path):
    cache = SpectrumCache(tmp_path)
    W0 = weight()
    changed = W0.clone()
    changed[7, 3] += 1e-6
    keys = {cache.key(W0), cache.key(changed), cache.key(W0.reshape(30, 40)),
            cache.key(W0.double()), cache.key(W0, torch.float64)}
    assert len(keys) == 5
    assert cache.key(W0) == cache.key(W0.clone()) == cache.key(W0.T.contiguous().T)
    cache.get(W0)
    spectrum = cache.get(changed)
    assert cache.stats.misses == 2 and cache.stats.hits == 0
    assert spectrum.weight is changed
    torch.testing.assert_close(spectrum.S, torch.linalg.svdvals(changed), atol=1e-5, rtol=0)
    f64 = cache.get(W0, dtype=torch.float64)
    assert f64.U.dtype == torch.float64 and cache.stats.misses == 3
    assert len(entries(tmp_path)) == 3


def test_default_directory_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INTRUDER_EXT_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert SpectrumCache().directory == tmp_path / "explicit"
    monkeypatch.delenv("INTRUDER_EXT_CACHE_DIR")
    assert SpectrumCache().directory == tmp_path / "xdg" / "intruder_ext"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "intruder_ext"


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "garbage", "empty", "foreign_key"])
def test_corrupt_entry_is_detected_and_recomputed(tmp_path, damage):
    cache = SpectrumCache(tmp_path)
    W0 = weight(1)
    good = cache.get(W0)
    path = cache.path(W0)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip_data_byte":  # a bit flip in the tensor data: only the checksum sees it
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a valid entry of another weight copied under this name
        other = SpectrumCache(tmp_path / "other")
        other.get(weight(2))
        path.write_bytes(other.path(weight(2)).read_bytes())
    fresh = SpectrumCache(tmp_path)
    spectrum = fresh.get(W0)
    assert (fresh.stats.corrupt, fresh.stats.misses, fresh.stats.hits) == (1, 1, 0)
    assert_same_spectrum(spectrum, good)
    again = SpectrumCache(tmp_path)  # the rewritten entry is whole again
    assert_same_spectrum(again.get(W0), good)
    assert again.stats.hits == 1 and again.stats.corrupt == 0


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an entry")
        raise OSError("disk full")
    monkeypatch.setattr(cache_mod, "save_file", crash)
    cache = SpectrumCache(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        cache.get(weight())
    assert entries(tmp_path) == []


def _fill(directory, barrier, queue):
    torch.set_num_threads(1)
    W0 = weight(3, shape=(300, 260))
    barrier.wait()  # both processes miss and write the same entry at the same moment
    spectrum = SpectrumCache(directory).get(W0)
    # numpy, not tensors: torch would share tensor memory through file descriptors that die
    # with this process.
    queue.put(tuple(t.numpy() for t in (spectrum.U, spectrum.S)))


def test_two_processes_fill_the_same_entry(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for a, b in zip(*results):
        assert (a == b).all()
    cache = SpectrumCache(tmp_path)
    W0 = weight(3, shape=(300, 260))
    assert entries(tmp_path) == [cache.path(W0).name]  # one entry, no temporary files left
    assert (cache.get(W0).U.numpy() == results[0][0]).all() and cache.stats.hits == 1


def test_errors(tmp_path):
    with pytest.raises(TypeError, match=r"SpectrumCache: directory must be a str or path \(got int\)"):
        SpectrumCache(3)
    cache = SpectrumCache(tmp_path)
    with pytest.raises(ValueError, match=r"SpectrumCache.get: W0 must be 2-D \(got shape \(4,\)\)"):
        cache.get(torch.randn(4))
    with pytest.raises(TypeError, match=r"SpectrumCache.get: W0 must be a torch.Tensor \(got list\)"):
        cache.get([[1.0]])
    with pytest.raises(TypeError, match=r"base_spectrum: dtype must be torch.float32 or torch.float64"):
        cache.get(weight(), dtype=torch.float16)
    assert not os.path.exists(tmp_path / "x") and entries(tmp_path) == []
