"""On-disk cache of base spectra: a base weight's spectrum is computed once and reused by every
adapter.

Entries are safetensors files of ``U`` and ``S`` (what the fast path reads; ``W0`` itself is the
caller's), named by a content hash of the weight (its bytes, shape and dtype,
the requested dtype and a format version), so a changed weight never reads a stale entry.
Writes go to a temporary file in the cache directory and are renamed into place
(``os.replace`` is atomic), so a crash never leaves a half-written entry under the final name and
two processes filling the same entry at once both leave a complete file. Each entry stores a
sha256 of its tensors; an entry that fails to load or to verify is recomputed and rewritten.
Both digests hash 4 MiB pieces in parallel threads (hashlib releases the GIL), then the list of
piece digests: about twice as fast on two cores, and a cache hit is mostly hashing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .spectral import BaseSpectrum, base_spectrum

__all__ = ["CacheStats", "SpectrumCache", "default_cache_dir"]

# Bump when the stored layout or the way spectra are computed changes: old entries are ignored.
FORMAT_VERSION = "3"
_NAMES = ("U", "S")
_PIECE = 1 << 22  # bytes per independently hashed piece
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


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
                    _tensor_bytes(tensors[name])) for name in _NAMES)


@dataclass
class CacheStats:
    """Counters of :meth:`SpectrumCache.get` outcomes since the cache object was made."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # entries found unreadable or failing their checksum (then recomputed)


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

    def key(self, W0: torch.Tensor, dtype: torch.dtype = torch.float32) -> str:
        """sha256 of the weight's bytes, shape and dtype, the spectrum's dtype and the format."""
        return _digest([(f"intruder_ext-spectrum-v{FORMAT_VERSION};{dtype};{W0.dtype};"
                         f"{tuple(W0.shape)}", _tensor_bytes(W0))])

    def path(self, W0: torch.Tensor, dtype: torch.dtype = torch.float32) -> Path:
        """The file that holds (or would hold) the entry of ``W0``."""
        return self.directory / f"{self.key(W0, dtype)}.safetensors"

    def get(self, W0: torch.Tensor, dtype: torch.dtype = torch.float32) -> BaseSpectrum:
        """The base spectrum of ``W0`` in ``dtype`` on ``W0``'s device, with ``W0`` attached: read
        from the cache, or computed with :func:`~intruder_ext.spectral.base_spectrum` and stored."""
        if not isinstance(W0, torch.Tensor):
            raise TypeError(f"SpectrumCache.get: W0 must be a torch.Tensor (got {type(W0).__name__})")
        if W0.dim() != 2:
            raise ValueError(f"SpectrumCache.get: W0 must be 2-D (got shape {tuple(W0.shape)})")
        key = self.key(W0, dtype)
        path = self.directory / f"{key}.safetensors"
        if path.exists():
            spectrum = self._load(path, key, W0, dtype)
            if spectrum is not None:
                self.stats.hits += 1
                return spectrum
            self.stats.corrupt += 1
        self.stats.misses += 1
        spectrum = base_spectrum(W0, dtype=dtype)
        self._store(path, key, spectrum)
        return spectrum

    def _load(self, path: Path, key: str, W0: torch.Tensor, dtype) -> BaseSpectrum | None:
        """The entry at ``path``, or None when it is unreadable, truncated or fails to verify."""
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError):
            return None
        if (meta.get("format") != FORMAT_VERSION or meta.get("key") != key
                or set(tensors) != set(_NAMES) or meta.get("sha256") != _checksum(tensors)):
            return None
        m, n = W0.shape
        p = min(m, n)
        U, S = (tensors[name] for name in _NAMES)
        if (tuple(U.shape), tuple(S.shape)) != ((m, p), (p,)) or any(t.dtype != dtype for t in (U, S)):
            return None
        return BaseSpectrum(U.to(W0.device), S.to(W0.device), W0)

    def _store(self, path: Path, key: str, spectrum: BaseSpectrum) -> None:
        tensors = {name: getattr(spectrum, name).detach().contiguous().cpu() for name in _NAMES}
        meta = {"format": FORMAT_VERSION, "key": key, "sha256": _checksum(tensors)}
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key[:16]}-", suffix=".tmp")
        try:
            os.close(fd)
            save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic: readers see the old entry or the whole new one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
