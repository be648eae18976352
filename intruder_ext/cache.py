"""On-disk cache of base spectra: a base weight's spectrum is computed once and reused by every
adapter.

Entries are safetensors files holding what the fast path reads (``W0`` itself is the caller's):
``U`` and ``S`` in the working dtype, or for a tall weight ``V`` and ``S`` in float64 (the two
forms of :class:`~intruder_ext.spectral.BaseSpectrum`), and metadata: the format version, the
key, a sha256 of the tensors, the weight's shape and dtypes, when the entry was made, and the
model and layer it was first computed for where the caller said so. They are named by a content
hash of the weight (its bytes in its own dtype, shape and dtype, the working dtype and the
format version), so a changed weight never reads a stale entry and entries of older formats are
never read (:meth:`SpectrumCache.prune` removes them).

Writes go to a temporary file in the cache directory, named after the host and process that
write it, and are renamed into place (``os.replace`` is atomic): a crash never leaves a
half-written entry under the final name, and two processes filling the same entry at once both
leave a complete file; the first :meth:`SpectrumCache.get` of a cache object removes temporary
files of writers that died (:meth:`SpectrumCache.clean_temporary`). An entry that fails to load
or to verify is recomputed and rewritten.
Both digests hash 4 MiB pieces in parallel threads (hashlib releases the GIL), then the list of
piece digests: about twice as fast on two cores, and a cache hit is mostly hashing.

The cache is best-effort: when its directory cannot be read or written (permissions, a
read-only or full file system, a file in its place), :meth:`SpectrumCache.get` still returns the
spectrum, computed, with one :class:`SpectrumCacheWarning` per cache object naming the
directory and the cause, and stores nothing more from that object.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checkpoints import describe_os_error, process_alive
from .spectral import BaseSpectrum, base_spectrum

__all__ = ["CacheEntry", "CacheStats", "SpectrumCache", "SpectrumCacheWarning",
           "default_cache_dir"]

# Bump when the stored layout or the way spectra are computed changes: old entries are ignored.
FORMAT_VERSION = "4"
_LAYOUTS = ({"U", "S"}, {"V", "S"})  # the left and the right form
_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"
_PIECE = 1 << 22  # bytes per independently hashed piece
# A temporary file of another host (a shared cache directory) whose writer cannot be asked
# whether it is alive is stale after this long: writing one entry takes seconds to minutes.
STALE_TMP_SECONDS = 24 * 3600
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


class SpectrumCacheWarning(UserWarning):
    """The cache directory could not be used; spectra are computed and not stored."""


def default_cache_dir() -> Path:
    """``$INTRUDER_EXT_CACHE_DIR``, else ``$XDG_CACHE_HOME/intruder_ext``, else
    ``~/.cache/intruder_ext``."""
    explicit = os.environ.get("INTRUDER_EXT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "intruder_ext"


def _tensor_bytes(t: torch.Tensor):
    """The raw bytes of a tensor as a buffer (no copy when it is a contiguous CPU tensor)."""
    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().data


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                       thread_name_prefix="intruder_ext-hash")
        return _pool


def _digest(parts) -> str:
    """sha256 over ``(label, buffer)`` parts, each buffer hashed as 4 MiB pieces in parallel."""
    jobs = []  # (label, [piece buffers])
    for label, buf in parts:
        view = memoryview(buf).cast("B")
        jobs.append((label, [view[i:i + _PIECE] for i in range(0, len(view), _PIECE)]))
    pieces = [piece for _, ps in jobs for piece in ps]
    hash_piece = lambda piece: hashlib.sha256(piece).digest()  # noqa: E731
    digests = iter(_hash_pool().map(hash_piece, pieces) if len(pieces) > 1
                   else map(hash_piece, pieces))
    h = hashlib.sha256()
    for label, ps in jobs:
        h.update(label.encode() + f";{len(ps)};".encode())
        for _ in ps:
            h.update(next(digests))
    return h.hexdigest()


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    return _digest((f"{name}:{tensors[name].dtype}:{tuple(tensors[name].shape)}",
                    _tensor_bytes(tensors[name])) for name in sorted(tensors))


def _tmp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary file named ``.<key16>.<host>.<pid>.<random>.tmp``."""
    parts = name[:-len(_TMP_SUFFIX)].split(".")
    if len(parts) < 5 or not parts[-2].isdigit():
        return None
    return ".".join(parts[2:-2]), int(parts[-2])


@dataclass
class CacheStats:
    """Counters of :meth:`SpectrumCache.get` outcomes since the cache object was made."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # entries found unreadable or failing their checksum (then recomputed)
    unstored: int = 0  # spectra computed but not stored (cache directory unusable)


@dataclass
class CacheEntry:
    """One file of the cache, as :meth:`SpectrumCache.entries` lists it.

    ``shape`` (m, n), ``dtype`` (the working dtype: of U and S, or of what is read from V and S,
    stored in float64, for a tall weight), ``weight_dtype``, ``model``, ``layer`` come from the
    entry's metadata and are None where unknown (an unreadable file, or labels not given);
    ``format`` is the entry's format version (entries of other versions are never read).
    ``mtime`` is the last write or hit (seconds since the epoch), ``age`` seconds since then.
    """

    key: str
    path: Path
    size: int
    mtime: float
    age: float
    format: str | None
    shape: tuple[int, int] | None
    dtype: str | None
    weight_dtype: str | None
    model: str | None
    layer: str | None

    @property
    def current(self) -> bool:
        """Whether :meth:`SpectrumCache.get` can read this entry (current format)."""
        return self.format == FORMAT_VERSION


class SpectrumCache:
    """Base spectra (:class:`~intruder_ext.spectral.BaseSpectrum`) cached as safetensors files.

    Args:
        directory: where entries live; default :func:`default_cache_dir`. Created on first write.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        if directory is not None and not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"SpectrumCache: directory must be a str or path "
                            f"(got {type(directory).__name__})")
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        self.stats = CacheStats()
        self._writable = True  # False after a write failed: the rest of the run stores nothing
        self._warned = False
        self._cleaned = False  # clean_temporary() ran (on the first get)

    # -- keys --------------------------------------------------------------------------------
    def key(self, W0: torch.Tensor, dtype: torch.dtype = torch.float32) -> str:
        """sha256 of the weight's bytes (in its own dtype), shape and dtype, the spectrum's dtype
        and the format."""
        return _digest([(f"intruder_ext-spectrum-v{FORMAT_VERSION};{dtype};{W0.dtype};"
                         f"{tuple(W0.shape)}", _tensor_bytes(W0))])

    def path(self, W0: torch.Tensor, dtype: torch.dtype = torch.float32) -> Path:
        """The file that holds (or would hold) the entry of ``W0``."""
        return self.directory / f"{self.key(W0, dtype)}{_SUFFIX}"

    # -- get ---------------------------------------------------------------------------------
    def get(self, W0: torch.Tensor, dtype: torch.dtype = torch.float32, *,
            model: str | None = None, layer: str | None = None) -> BaseSpectrum:
        """The base spectrum of ``W0`` in ``dtype`` on ``W0``'s device, with ``W0`` attached:
        read from the cache, or computed with :func:`~intruder_ext.spectral.base_spectrum` and
        stored. ``model`` and ``layer`` are stored with a new entry for :meth:`entries`."""
        fn = "SpectrumCache.get"
        if not isinstance(W0, torch.Tensor):
            raise TypeError(f"{fn}: W0 must be a torch.Tensor (got {type(W0).__name__})")
        if W0.dim() != 2:
            raise ValueError(f"{fn}: W0 must be 2-D (got shape {tuple(W0.shape)})")
        for name, value in (("model", model), ("layer", layer)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{fn}: {name} must be a str or None (got {type(value).__name__})")
        if not self._cleaned:  # once per cache object: leftovers of killed writers go first
            self._cleaned = True
            try:
                self.clean_temporary()
            except OSError:
                pass  # an unreadable directory: reported below, when the entry is looked up
        key = self.key(W0, dtype)
        path = self.directory / f"{key}{_SUFFIX}"
        try:
            exists = path.is_file()
        except OSError as error:
            self._warn("read", error, stacklevel=3)
            exists = False
        if exists:
            tensors = self._load(path, key, W0.shape, dtype)
            if tensors is not None:
                self.stats.hits += 1
                self._touch(path)
                tensors = {name: t.to(W0.device) for name, t in tensors.items()}
                if "V" in tensors:
                    return BaseSpectrum.from_right(tensors["V"], tensors["S"], W0, dtype)
                return BaseSpectrum(tensors["U"], tensors["S"], W0)
        self.stats.misses += 1
        spectrum = base_spectrum(W0, dtype=dtype)
        if self._writable:
            self._store(path, key, spectrum, model, layer)
        if not self._writable:
            self.stats.unstored += 1
        return spectrum

    def _warn(self, action: str, error: Exception, stacklevel: int = 4) -> None:
        if not self._warned:
            self._warned = True
            consequence = "computed and not stored" if action == "write to" else "computed"
            warnings.warn(f"SpectrumCache: cannot {action} the cache directory {self.directory} "
                          f"({describe_os_error(error)}: {error}); base spectra are {consequence}",
                          SpectrumCacheWarning, stacklevel=stacklevel)

    @staticmethod
    def _touch(path: Path) -> None:
        # A hit makes the entry recent, so prune() removes the least recently used first.
        try:
            os.utime(path)
        except OSError:
            pass  # read-only cache: still a valid hit

    def _load(self, path: Path, key: str, shape, dtype) -> dict | None:
        """The tensors of the entry at ``path``, or None when unreadable, truncated or failing to
        verify (counted as corrupt, then recomputed and rewritten)."""
        try:
            meta, tensors = _read_file(path)
        except PermissionError as error:
            self._warn("read", error)
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError):
            self.stats.corrupt += 1
            return None
        m, n = shape
        p = min(m, n)
        # The left form in the working dtype; the right form (tall weights) in float64.
        layout = ((m, p), dtype) if "U" in tensors else ((n, n), torch.float64)
        vectors = tensors.get("U", tensors.get("V"))
        if not _valid(meta, tensors, key=key) or ("V" in tensors and m <= n) \
                or tuple(vectors.shape) != layout[0] or tuple(tensors["S"].shape) != (p,) \
                or any(t.dtype != layout[1] for t in tensors.values()):
            self.stats.corrupt += 1
            return None
        return tensors

    def _store(self, path: Path, key: str, spectrum: BaseSpectrum, model, layer) -> None:
        tensors = {name: t.detach().contiguous().cpu() for name, t in spectrum.stored().items()}
        m, n = spectrum.shape
        meta = {"format": FORMAT_VERSION, "key": key, "sha256": _checksum(tensors),
                "shape": f"{m},{n}", "dtype": str(spectrum.dtype).removeprefix("torch."),
                "weight_dtype": str(spectrum.weight.dtype).removeprefix("torch."),
                "created": f"{time.time():.0f}"}
        if model is not None:
            meta["model"] = model
        if layer is not None:
            meta["layer"] = layer
        tmp = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=_TMP_SUFFIX,
                                       prefix=f".{key[:16]}.{socket.gethostname()}.{os.getpid()}.")
            os.close(fd)
            save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old entry or the whole new one
        except (OSError, SafetensorError) as error:  # safetensors wraps I/O errors in its own
            self._writable = False
            self._warn("write to", error)
        finally:
            if tmp is not None and os.path.exists(tmp):
                try:
                    os.unlink(tmp)
                except OSError:
                    pass  # nothing more can be done; clean_temporary() removes it later

    # -- management --------------------------------------------------------------------------
    def _files(self, suffix: str) -> list[Path]:
        try:
            return sorted(p for p in self.directory.iterdir() if p.name.endswith(suffix))
        except FileNotFoundError:
            return []

    def entries(self) -> list[CacheEntry]:
        """Every entry file in the directory (current and older formats), oldest first."""
        out, now = [], time.time()
        for path in self._files(_SUFFIX):
            try:
                st = path.stat()
            except FileNotFoundError:  # removed meanwhile (prune in another process)
                continue
            meta = {}
            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata() or {}
            except (SafetensorError, OSError, ValueError, RuntimeError):
                pass
            shape = meta.get("shape")
            try:
                shape = tuple(int(v) for v in shape.split(",")) if shape else None
            except ValueError:
                shape = None
            out.append(CacheEntry(path.name[:-len(_SUFFIX)], path, st.st_size, st.st_mtime,
                                  max(0.0, now - st.st_mtime), meta.get("format"), shape,
                                  meta.get("dtype"), meta.get("weight_dtype"), meta.get("model"),
                                  meta.get("layer")))
        out.sort(key=lambda e: e.mtime)
        return out

    def verify(self) -> list[CacheEntry]:
        """Reads every entry of the current format in full and checks its checksum, key and
        layout; returns the corrupt (or unreadable) ones. Entries of older formats are not
        checked: they are never read, and :meth:`prune` removes them."""
        bad = []
        for entry in self.entries():
            if entry.format is not None and not entry.current:
                continue
            try:
                ok = _valid(*_read_file(entry.path), key=entry.key)
            except (SafetensorError, OSError, ValueError, RuntimeError):
                ok = False
            if not ok:
                bad.append(entry)
        return bad

    def prune(self, max_age: float | None = None, max_bytes: int | None = None) -> list[CacheEntry]:
        """Removes entries of older formats, entries not used for ``max_age`` seconds, then the
        least recently used ones until the cache holds at most ``max_bytes``; and stale temporary
        files (:meth:`clean_temporary`). Returns the removed entries."""
        fn = "SpectrumCache.prune"
        for name, value in (("max_age", max_age), ("max_bytes", max_bytes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value >= 0):
                raise ValueError(f"{fn}: {name} must be a number >= 0 or None (got {value!r})")
        self.clean_temporary()
        entries = self.entries()
        doomed = [e for e in entries if (e.format is not None and not e.current)
                  or (max_age is not None and e.age > max_age)]
        if max_bytes is not None:
            gone = {e.path for e in doomed}
            kept = [e for e in entries if e.path not in gone]
            total = sum(e.size for e in kept)
            for e in kept:  # oldest first
                if total <= max_bytes:
                    break
                doomed.append(e)
                total -= e.size
        removed = []
        for e in doomed:
            try:
                e.path.unlink()
                removed.append(e)
            except FileNotFoundError:
                pass
        return removed

    def clean_temporary(self) -> list[Path]:
        """Removes temporary files left by writers that died (SIGKILL, power loss), and returns
        them. The writer's host and pid are in the file name: a file of this host whose process
        is gone is stale at once; any file older than ``STALE_TMP_SECONDS`` is stale too (another
        host's writer cannot be asked, a pid may have been reused, and no write takes that long).
        A live writer's file is never removed, so this is safe while other processes fill the
        same directory; an age threshold alone would have to wait a day, a pid check alone would
        be wrong for other hosts sharing the directory. (Two machines, or containers with
        separate pid namespaces, that share a host name could remove each other's file in
        flight: that write is then lost, with the usual warning, never corrupt.)"""
        removed, host, now = [], socket.gethostname(), time.time()
        for path in self._files(_TMP_SUFFIX):
            owner = _tmp_owner(path.name)
            try:
                old = now - path.stat().st_mtime > STALE_TMP_SECONDS
                if old or (owner is not None and owner[0] == host and not process_alive(owner[1])):
                    path.unlink()
                    removed.append(path)
            except OSError:  # gone meanwhile, or another user's file: not ours to force
                continue
        return removed


def _read_file(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a cache file; raises when it cannot be read or parsed."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}


def _valid(meta: dict, tensors: dict, *, key: str) -> bool:
    return (meta.get("format") == FORMAT_VERSION and meta.get("key") == key
            and set(tensors) in _LAYOUTS and meta.get("sha256") == _checksum(tensors))
