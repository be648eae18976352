"""SpectrumCache: keys, hits, atomic writes, concurrent fills, corrupt entries, best-effort
behaviour when the directory is unusable, and the management API (entries, verify, prune,
stale temporary files)."""

import errno
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from intruder_ext import cache as cache_mod
from intruder_ext.cache import SpectrumCache, SpectrumCacheWarning, default_cache_dir
from intruder_ext.spectral import base_spectrum


def weight(seed=0, shape=(40, 30)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def entries(directory):
    return sorted(p.name for p in Path(directory).iterdir())


def assert_same_spectrum(a, b):
    stored_a, stored_b = a.stored(), b.stored()
    assert set(stored_a) == set(stored_b) and a.dtype == b.dtype
    for name in stored_a:
        assert torch.equal(stored_a[name], stored_b[name]), name
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)], ids=["tall_right_form", "wide_left_form"])
def test_miss_then_hit(tmp_path, shape):
    cache = SpectrumCache(tmp_path)
    W0 = weight(shape=shape)
    first = cache.get(W0)
    assert (first.V is not None) == (shape[0] > shape[1])
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
            cache.key(W0.double()), cache.key(W0, torch.float64), cache.key(W0.bfloat16())}
    assert len(keys) == 6
    # bfloat16 is hashed as bfloat16 (2 bytes an entry), not upcast first
    assert cache.key(W0.bfloat16()) != cache.key(W0.bfloat16().float())
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


def test_full_disk_leaves_nothing_and_warns_once(tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an entry")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(cache_mod, "save_file", crash)
    cache = SpectrumCache(tmp_path)
    with pytest.warns(SpectrumCacheWarning) as record:
        spectrum = cache.get(weight())
        cache.get(weight(1))  # no second warning, and no second attempt to write
    assert len(record) == 1
    message = str(record[0].message)
    assert str(tmp_path) in message and "no space left on the device" in message
    assert_same_spectrum(spectrum, base_spectrum(weight()))
    assert entries(tmp_path) == [] and cache.stats.unstored == 2


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


# ---------------------------------------------------------------------------------------------
# Best effort: an unusable directory never stops a run

def one_warning(cache, W0):
    """get() twice: the right spectrum both times, exactly one SpectrumCacheWarning; returns it."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first, second = cache.get(W0), cache.get(W0)
    ours = [w for w in record if issubclass(w.category, SpectrumCacheWarning)]
    assert len(ours) == 1, [str(w.message) for w in record]
    assert_same_spectrum(first, base_spectrum(W0))
    assert_same_spectrum(second, first)
    return str(ours[0].message)


def test_a_file_in_place_of_the_directory(tmp_path):
    blocker = tmp_path / "spectra"
    blocker.write_bytes(b"not a directory")
    for directory in (blocker, blocker / "sub"):  # the directory, or one of its parents
        cache = SpectrumCache(directory)
        message = one_warning(cache, weight())
        assert str(directory) in message and "a file is in the way (not a directory)" in message
        assert cache.stats.unstored == 2 and cache.stats.hits == 0
    assert blocker.read_bytes() == b"not a directory" and entries(tmp_path) == ["spectra"]


@pytest.mark.parametrize("code, cause", [(errno.EACCES, "permission denied"),
                                         (errno.EROFS, "read-only file system"),
                                         (errno.ENOENT, "missing (no such file or directory)")])
def test_unwritable_directory(tmp_path, monkeypatch, code, cause):
    """Permissions cannot be simulated by chmod when the tests run as root
    (test_read_only_directory_by_chmod covers that where it can), nor a directory removed under a
    running cache: the failure is injected where the cache creates its temporary file. Entries
    already there are still served."""
    filled = SpectrumCache(tmp_path)
    filled.get(weight(0))

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(cache_mod.tempfile, "mkstemp", refuse)
    cache = SpectrumCache(tmp_path)
    assert_same_spectrum(cache.get(weight(0)), filled.get(weight(0)))  # a hit needs no write
    message = one_warning(cache, weight(1))
    assert str(tmp_path) in message and cause in message
    assert cache.stats.hits == 1 and cache.stats.unstored == 2
    assert entries(tmp_path) == [filled.path(weight(0)).name]


def test_unreadable_entry(tmp_path, monkeypatch):
    cache = SpectrumCache(tmp_path)
    W0 = weight()
    cache.get(W0)

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(cache_mod, "safe_open", refuse)
    fresh = SpectrumCache(tmp_path)
    with pytest.warns(SpectrumCacheWarning,
                      match=r"cannot read the cache directory .*permission denied"):
        assert_same_spectrum(fresh.get(W0), base_spectrum(W0))
    assert fresh.stats.corrupt == 0 and fresh.stats.misses == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="chmod does not stop root from writing: covered by the injected "
                           "EACCES and the real read-only tmpfs")
def test_read_only_directory_by_chmod(tmp_path):
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        message = one_warning(SpectrumCache(directory), weight())
        assert "permission denied" in message
        assert entries(directory) == []
    finally:
        directory.chmod(0o755)


@pytest.fixture
def tmpfs(tmp_path):
    """Mounts small tmpfs file systems (root only; skipped where mount is not allowed): a real
    full disk and a real read-only file system, which chmod cannot give root."""
    mounts = []

    def mount(size="64k"):
        if os.name != "posix" or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        target = tmp_path / f"mnt{len(mounts)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounts.append(target)
        return target

    yield mount
    for target in reversed(mounts):
        subprocess.run(["umount", str(target)], check=True)


def remount_read_only(target):
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)


def test_real_full_disk(tmpfs):
    """safetensors reports ENOSPC as SafetensorError('... (os error 28)'): still a warning, no
    partial file."""
    directory = tmpfs("64k") / "spectra"
    cache = SpectrumCache(directory)
    message = one_warning(cache, weight(0, shape=(200, 150)))  # U alone is 117 KiB
    assert str(directory) in message and "no space left on the device" in message
    assert entries(directory) == []


def test_real_read_only_file_system(tmpfs):
    root = tmpfs("1m")
    filled = SpectrumCache(root / "spectra")
    filled.get(weight(0))
    remount_read_only(root)
    cache = SpectrumCache(root / "spectra")
    assert_same_spectrum(cache.get(weight(0)), filled.get(weight(0)))  # hits still served
    message = one_warning(cache, weight(1))
    assert "read-only file system" in message and cache.stats.hits == 1
    message = one_warning(SpectrumCache(root / "elsewhere"), weight(1))  # cannot even mkdir
    assert str(root / "elsewhere") in message and "read-only file system" in message


# ---------------------------------------------------------------------------------------------
# Management: entries, verify, prune, stale temporary files

def test_entries_list_metadata(tmp_path):
    cache = SpectrumCache(tmp_path)
    cache.get(weight(0), model="org/base", layer="model.layers.0.mlp.up_proj")
    cache.get(weight(1, shape=(30, 50)).bfloat16(), torch.float64)
    listed = cache.entries()
    assert [e.key for e in listed] == sorted(
        [cache.key(weight(0)), cache.key(weight(1, shape=(30, 50)).bfloat16(), torch.float64)],
        key=lambda k: (tmp_path / f"{k}.safetensors").stat().st_mtime)
    by_key = {e.key: e for e in listed}
    first = by_key[cache.key(weight(0))]
    assert (first.shape, first.dtype, first.weight_dtype) == ((40, 30), "float32", "float32")
    assert (first.model, first.layer) == ("org/base", "model.layers.0.mlp.up_proj")
    assert first.current and first.format == cache_mod.FORMAT_VERSION
    assert first.size == first.path.stat().st_size and 0 <= first.age < 600
    second = by_key[cache.key(weight(1, shape=(30, 50)).bfloat16(), torch.float64)]
    assert (second.shape, second.dtype, second.weight_dtype) == ((30, 50), "float64", "bfloat16")
    assert second.model is None and second.layer is None
    assert SpectrumCache(tmp_path / "missing").entries() == []


@pytest.mark.parametrize("shape, stored, size", [
    ((48, 64), {"U": ((48, 48), torch.float32), "S": ((48,), torch.float32)}, (48 * 48 + 48) * 4),
    ((160, 48), {"V": ((48, 48), torch.float64), "S": ((48,), torch.float64)}, (48 * 48 + 48) * 8),
])
def test_entries_store_only_what_the_fast_path_reads(tmp_path, shape, stored, size):
    # Wide or square: U and S in the working dtype. Tall: V (n x n) and S in float64, smaller
    # than U (m x n) in float32 once m > 2n, as for Llama's gate/up_proj (11008 x 4096).
    cache = SpectrumCache(tmp_path)
    W0 = weight(0, shape=shape)
    first = cache.get(W0)
    from safetensors import safe_open
    with safe_open(str(cache.path(W0)), framework="pt") as f:
        assert {name: (tuple(f.get_tensor(name).shape), f.get_tensor(name).dtype)
                for name in f.keys()} == stored
    assert cache.path(W0).stat().st_size < size + 2048  # plus a small header
    hit = cache.get(W0)
    assert cache.stats.hits == 1 and (hit.V is None) == ("U" in stored)
    assert hit.dtype == torch.float32 and torch.equal(hit.U, first.U) and torch.equal(hit.S, first.S)


@pytest.mark.parametrize("shape", [(40, 30), (30, 40)], ids=["tall_right_form", "wide_left_form"])
def test_verify_reports_corrupt_entries(tmp_path, shape):
    cache = SpectrumCache(tmp_path)
    for seed in range(3):
        cache.get(weight(seed, shape))
    assert cache.verify() == []
    damaged = cache.path(weight(1, shape))
    data = damaged.read_bytes()
    damaged.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    garbage = tmp_path / ("f" * 64 + ".safetensors")
    garbage.write_bytes(b"garbage")
    assert sorted(e.path.name for e in cache.verify()) == sorted([damaged.name, garbage.name])


def write_old_format_entry(directory, name="0" * 64):
    path = Path(directory) / f"{name}.safetensors"
    save_file({"U": torch.zeros(4, 4), "S": torch.zeros(4), "Vh": torch.zeros(4, 4)}, str(path),
              metadata={"format": "2", "key": name, "sha256": "x"})
    return path


def test_prune_by_age_size_and_format(tmp_path):
    cache = SpectrumCache(tmp_path)
    now = time.time()
    paths = []
    for age_days, seed in [(30, 0), (10, 1), (1, 2), (0, 3)]:
        cache.get(weight(seed))
        path = cache.path(weight(seed))
        os.utime(path, (now - age_days * 86400, now - age_days * 86400))
        paths.append(path)
    old = write_old_format_entry(tmp_path)
    listed = cache.entries()
    assert not next(e for e in listed if e.path == old).current
    assert cache.verify() == []  # older formats are never read, so never "corrupt"

    removed = cache.prune(max_age=20 * 86400)
    assert sorted(e.path for e in removed) == sorted([paths[0], old])
    size = paths[1].stat().st_size
    removed = cache.prune(max_bytes=2 * size)  # least recently used first
    assert [e.path for e in removed] == [paths[1]]
    assert entries(tmp_path) == sorted(p.name for p in paths[2:])
    # A hit makes an entry recent again.
    os.utime(paths[2], (now - 5 * 86400, now - 5 * 86400))
    SpectrumCache(tmp_path).get(weight(2))
    assert cache.prune(max_age=86400) == []
    with pytest.raises(ValueError, match=r"SpectrumCache.prune: max_bytes must be a number >= 0 "
                                         r"or None \(got -1\)"):
        cache.prune(max_bytes=-1)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_temporary_spares_live_writers(tmp_path):
    host = socket.gethostname()
    now = time.time()
    files = {
        "dead": f".{'a' * 16}.{host}.{dead_pid()}.x1.tmp",
        "live": f".{'b' * 16}.{host}.{os.getpid()}.x2.tmp",
        "other_host_recent": f".{'c' * 16}.elsewhere.example.{os.getpid()}.x3.tmp",
        "other_host_old": f".{'d' * 16}.elsewhere.example.1.x4.tmp",
        "unknown_recent": ".weird.tmp",
    }
    for label, name in files.items():
        (tmp_path / name).write_bytes(b"partial")
    old = now - cache_mod.STALE_TMP_SECONDS - 60
    os.utime(tmp_path / files["other_host_old"], (old, old))
    removed = SpectrumCache(tmp_path).clean_temporary()
    assert sorted(p.name for p in removed) == sorted([files["dead"], files["other_host_old"]])
    assert sorted(entries(tmp_path)) == sorted([files["live"], files["other_host_recent"],
                                                files["unknown_recent"]])


def _killed_midway(directory):
    def die(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half an entry")
        os.kill(os.getpid(), signal.SIGKILL)
    cache_mod.save_file = die
    SpectrumCache(directory).get(weight(7))


def test_killed_writer_leaves_no_entry_and_a_later_run_cleans_up(tmp_path):
    proc = mp.get_context("spawn").Process(target=_killed_midway, args=(str(tmp_path),))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == -signal.SIGKILL
    left = entries(tmp_path)
    assert len(left) == 1 and left[0].endswith(".tmp")  # a partial temp file, no entry
    cache = SpectrumCache(tmp_path)
    spectrum = cache.get(weight(7))  # the re-run computes, stores, and removes the leftover
    assert entries(tmp_path) == [cache.path(weight(7)).name]
    # A run that only reads (every entry a hit) cleans up as well.
    leftover = tmp_path / f".{'e' * 16}.{socket.gethostname()}.{dead_pid()}.x5.tmp"
    leftover.write_bytes(b"partial")
    again = SpectrumCache(tmp_path)
    assert_same_spectrum(again.get(weight(7)), spectrum)
    assert again.stats.hits == 1 and entries(tmp_path) == [cache.path(weight(7)).name]


def test_get_argument_errors(tmp_path):
    cache = SpectrumCache(tmp_path)
    with pytest.raises(TypeError,
                       match=r"SpectrumCache.get: model must be a str or None \(got int\)"):
        cache.get(weight(), model=3)


@pytest.mark.parametrize("case", ["V of a wide weight", "float32 V", "V of the wrong shape",
                                  "U and V"])
def test_entries_of_the_wrong_layout_are_recomputed(tmp_path, case):
    # Entries whose key and checksum are right but whose layout does not fit the weight (a
    # forged or buggy writer) are corrupt: recomputed, never read.
    cache = SpectrumCache(tmp_path)
    W0 = weight(0, shape=(30, 40) if case == "V of a wide weight" else (40, 30))
    V, S = torch.eye(30, dtype=torch.float64), torch.linspace(2, 1, 30, dtype=torch.float64)
    tensors = {"V of a wide weight": {"V": V, "S": S}, "float32 V": {"V": V.float(), "S": S},
               "V of the wrong shape": {"V": V[:, :29].contiguous(), "S": S},
               "U and V": {"U": torch.zeros(40, 30), "V": V, "S": S}}[case]
    key = cache.key(W0)
    save_file(tensors, str(cache.path(W0)), metadata={
        "format": cache_mod.FORMAT_VERSION, "key": key, "sha256": cache_mod._checksum(tensors)})
    spectrum = cache.get(W0)
    assert cache.stats.corrupt == 1 and cache.stats.misses == 1
    assert_same_spectrum(spectrum, base_spectrum(W0))
    assert_same_spectrum(SpectrumCache(tmp_path).get(W0), spectrum)  # rewritten
