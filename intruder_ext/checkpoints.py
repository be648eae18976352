"""Checkpoints on disk, read tensor by tensor and written shard by shard: file formats only.

What a tensor *means* (layer names, orientation, LoRA pairs) is :mod:`intruder_ext.layers`'s
business; this module knows how weights are stored and verifies that what it reads is what the
files promise:

- safetensors files are parsed here (the format is an 8-byte header length, a JSON header of
  ``dtype``/``shape``/``data_offsets`` per tensor, then the raw bytes). Every header is checked
  against the file's size before anything is read, so a truncated or garbage file is one clear
  error naming it, and each tensor is read with ``pread`` into its own buffer: no memory map, so
  the resident memory of a run is bounded by the tensors it holds, not by the files it touched.
- model directories: ``model.safetensors``, sharded ``model.safetensors.index.json`` (every shard
  the index names must exist and hold the tensors it is said to hold), or ``pytorch_model.bin``
  (also sharded) loaded with ``weights_only=True`` as a fallback.
- PEFT adapter directories: ``adapter_config.json`` (checked to be a LoRA config with sane field
  types) and ``adapter_model.safetensors`` or ``adapter_model.bin``.
- Hugging Face Hub ids (``org/name`` or ``org/name@revision``) resolved through
  ``huggingface_hub`` and its local cache, downloading only the files needed; ``HF_HUB_OFFLINE=1``
  is honoured.

Writers go to a temporary directory beside the destination, which is renamed into place at the
end (:func:`atomic_directory`), so an interrupted run leaves no partial output under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

__all__ = ["AdapterDirectory", "CheckpointError", "ModelDirectory", "SafetensorsFile",
           "SafetensorsWriter", "atomic_directory", "resolve"]

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header

MODEL_INDEX = "model.safetensors.index.json"
MODEL_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
CONFIG = "config.json"
# Copied next to a merged model so that it loads like the base (tokenizer, generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
              "generation_config.json", "chat_template.jinja")


class CheckpointError(Exception):
    """A file or directory is not what it should be: missing, unreadable, truncated, malformed,
    or inconsistent with another. The message is one line naming the file and the cause."""


def describe_os_error(error: Exception) -> str:
    """What went wrong with a file, in the words a user acts on (permission vs missing vs full,
    ...). safetensors reports I/O errors as SafetensorError("... (os error 28)"): the errno is
    read from its message."""
    code = getattr(error, "errno", None)
    if code is None:
        found = re.search(r"os error (\d+)", str(error))
        code = int(found.group(1)) if found else None
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EROFS:
        return "read-only file system"
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "no space left on the device (disk full or quota)"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way (not a directory)"
    if code == errno.ENOENT:
        return "missing (no such file or directory)"
    reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return reason[0].lower() + reason[1:]


# ---------------------------------------------------------------------------------- safetensors
@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of its data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """The header of one safetensors file, validated against the file's size; tensors are read
    one at a time with :meth:`read`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: not a safetensors file (only {len(head)} "
                                          "bytes)")
                (n,) = struct.unpack("<Q", head)
                if n == 0 or n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(
                        f"{self.path}: not a safetensors file or truncated (header of {n} bytes "
                        f"in a file of {size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({describe_os_error(e)})") from None
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            raise CheckpointError(f"{self.path}: not a safetensors file (its header is not JSON)") \
                from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: not a safetensors file (header is not an object)")
        self.metadata = header.pop("__metadata__", None) or {}
        data_start, data_size = 8 + n, size - 8 - n
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            self.tensors[key] = self._entry(key, entry, data_start, data_size)

    def _entry(self, key, entry, data_start: int, data_size: int) -> TensorInfo:
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(v) for v in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{self.path}: malformed header entry for tensor {key!r} "
                                  f"({entry!r:.80})") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if any(d < 0 for d in shape) or end - begin != nbytes or begin < 0:
            raise CheckpointError(f"{self.path}: tensor {key!r} has inconsistent offsets "
                                  f"{[begin, end]} for shape {list(shape)} ({entry['dtype']})")
        if end > data_size:
            raise CheckpointError(f"{self.path}: truncated: tensor {key!r} ends at byte "
                                  f"{data_start + end} but the file has {data_start + data_size}")
        return TensorInfo(key, dtype, shape, data_start + begin, nbytes)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read into fresh memory (CPU)."""
        info = self.tensors[key]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        try:
            with open(self.path, "rb") as f:
                done = 0
                while done < info.nbytes:
                    got = os.preadv(f.fileno(), [view[done:]], info.offset + done)
                    if got == 0:
                        raise CheckpointError(f"{self.path}: truncated while reading {key!r}")
                    done += got
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} "
                                  f"({describe_os_error(e)})") from None
        return raw.view(info.dtype).reshape(info.shape)


class SafetensorsWriter:
    """Writes one safetensors file from a plan of ``(key, dtype, shape)``, one tensor at a time,
    in the plan's order: the header is known up front, so no tensor is held longer than its own
    write (a shard of a 70B model is never in memory)."""

    def __init__(self, path: str | os.PathLike, plan: Iterable[tuple[str, torch.dtype, tuple]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self._plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        offset = 0
        for key, dtype, shape in plan:
            shape = tuple(int(d) for d in shape)
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            self._plan.append((key, dtype, shape))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want_key, dtype, shape = self._plan[self._next]
        if key != want_key or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(f"SafetensorsWriter: expected {want_key!r} {dtype} {list(shape)}, "
                               f"got {key!r} {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._plan):
            raise RuntimeError(f"SafetensorsWriter: {self.path} closed after {self._next} of "
                               f"{len(self._plan)} tensors")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def save_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """A small file (an adapter) in one go."""
    writer = SafetensorsWriter(path, ((k, t.dtype, t.shape) for k, t in tensors.items()), metadata)
    try:
        for key, tensor in tensors.items():
            writer.write(key, tensor)
        writer.close()
    except BaseException:
        writer.abort()
        raise


# ---------------------------------------------------------------------------------- directories
def _read_json(path: Path, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{what}: {path} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{what}: cannot read {path} ({describe_os_error(e)})") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({str(e).splitlines()[0]})") \
            from None


class _BinFile:
    """A ``pytorch_model.bin`` shard, loaded (memory-mapped, weights only) on first use."""

    def __init__(self, path: Path):
        self.path = path
        self._tensors: dict[str, torch.Tensor] | None = None

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            try:
                tensors = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except FileNotFoundError:
                raise CheckpointError(f"{self.path} does not exist") from None
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot read ({describe_os_error(e)})") \
                    from None
            except Exception as e:  # pickle and zip errors of a corrupt or foreign file
                raise CheckpointError(f"{self.path}: not a PyTorch weights file "
                                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") \
                    from None
            if not isinstance(tensors, dict) or not all(
                    isinstance(v, torch.Tensor) for v in tensors.values()):
                raise CheckpointError(f"{self.path}: not a state dict of tensors")
            self._tensors = tensors
        return self._tensors

    def keys(self) -> list[str]:
        return list(self._load())

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._load()[key]
        return t.dtype, tuple(t.shape)

    def read(self, key: str) -> torch.Tensor:
        return self._load()[key].clone()


class _TensorStore:
    """Tensors spread over files (safetensors or .bin), addressed by key."""

    def __init__(self, where: dict[str, object]):
        self._where = where  # key -> SafetensorsFile | _BinFile

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        f = self._where[key]
        if isinstance(f, SafetensorsFile):
            t = f.tensors[key]
            return t.dtype, t.shape
        return f.info(key)

    def file_of(self, key: str) -> Path:
        return self._where[key].path

    def read(self, key: str) -> torch.Tensor:
        return self._where[key].read(key)


def _files_of_index(directory: Path, index_name: str, opener) -> dict[str, object]:
    index = _read_json(directory / index_name, str(directory))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{directory / index_name}: no weight_map")
    files: dict[str, object] = {}
    where = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or os.sep in name or name.startswith("."):
            raise CheckpointError(f"{directory / index_name}: bad shard name {name!r} for {key!r}")
        if name not in files:
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory}: shard {name} named in {index_name} is missing")
            files[name] = opener(path)
        where[key] = files[name]
    for key, f in where.items():
        if isinstance(f, SafetensorsFile) and key not in f.tensors:
            raise CheckpointError(f"{directory}: {index_name} puts {key!r} in {f.path.name}, "
                                  "which does not contain it")
    return where


class ModelDirectory:
    """A transformers-style model directory, read lazily: ``config.json`` (optional) and the
    weights as single or sharded safetensors, else ``pytorch_model.bin`` (single or sharded)."""

    def __init__(self, directory: str | os.PathLike, what: str = "model"):
        self.directory = Path(directory)
        self.what = what
        d = self.directory
        self.config = _read_json(d / CONFIG, what) if (d / CONFIG).is_file() else {}
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{what}: {d / CONFIG} is not a JSON object")
        if (d / MODEL_INDEX).is_file():
            where = _files_of_index(d, MODEL_INDEX, SafetensorsFile)
        elif (d / MODEL_SINGLE).is_file():
            f = SafetensorsFile(d / MODEL_SINGLE)
            where = dict.fromkeys(f.keys(), f)
        elif (d / BIN_INDEX).is_file():
            where = _files_of_index(d, BIN_INDEX, _BinFile)
        elif (d / BIN_SINGLE).is_file():
            f = _BinFile(d / BIN_SINGLE)
            where = dict.fromkeys(f.keys(), f)
        else:
            raise CheckpointError(f"{what} {str(d)!r} has no model weights ({MODEL_SINGLE}, "
                                  f"{MODEL_INDEX}, {BIN_SINGLE} or {BIN_INDEX})")
        self.store = _TensorStore(where)

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    def weight_files(self) -> list[Path]:
        seen: dict[Path, None] = {}
        for key in self.store.keys():
            seen.setdefault(self.store.file_of(key))
        return list(seen)


class AdapterDirectory:
    """A PEFT LoRA adapter directory: its validated ``adapter_config.json`` and tensors."""

    def __init__(self, directory: str | os.PathLike, what: str = "ADAPTER"):
        self.directory = Path(directory)
        self.what = what
        d = self.directory
        self.raw_config = _read_json(d / ADAPTER_CONFIG, what)  # written back as it came
        self.config = check_lora_config(self.raw_config, d / ADAPTER_CONFIG)
        if (d / ADAPTER_SAFETENSORS).is_file():
            f = SafetensorsFile(d / ADAPTER_SAFETENSORS)
            self.store = _TensorStore(dict.fromkeys(f.keys(), f))
        elif (d / ADAPTER_BIN).is_file():
            f = _BinFile(d / ADAPTER_BIN)
            self.store = _TensorStore(dict.fromkeys(f.keys(), f))
        else:
            raise CheckpointError(f"{what} {str(d)!r} has no {ADAPTER_SAFETENSORS} or "
                                  f"{ADAPTER_BIN}")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def is_model_dir(path: str | os.PathLike) -> bool:
    d = Path(path)
    return any((d / name).is_file() for name in (MODEL_SINGLE, MODEL_INDEX, BIN_SINGLE, BIN_INDEX))


def check_lora_config(cfg, path) -> dict:
    """The fields of a PEFT LoRA config this package reads, with PEFT's defaults, type-checked:
    a wrong type is an error naming the field and the value, not a crash later."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    ptype = cfg.get("peft_type")
    if str(ptype).upper() != "LORA":
        raise CheckpointError(f"{path}: peft_type is {ptype!r}; only LoRA adapters are supported "
                              "(other methods store other updates)")
    out = dict(cfg)

    def field(name, default, ok, expected):
        value = cfg.get(name, default)
        if value is None:
            value = default
        if not ok(value):
            raise CheckpointError(f"{path}: {name} must be {expected} (got {value!r})")
        out[name] = value

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def str_or_list(v):
        return v is None or isinstance(v, str) or (
            isinstance(v, list) and all(isinstance(x, str) for x in v))

    field("r", 8, lambda v: is_int(v) and v > 0, "a positive integer")
    field("lora_alpha", 8, is_num, "a finite number")
    field("use_rslora", False, lambda v: isinstance(v, bool), "true or false")
    field("use_dora", False, lambda v: isinstance(v, bool), "true or false")
    field("fan_in_fan_out", False, lambda v: isinstance(v, bool), "true or false")
    field("lora_bias", False, lambda v: isinstance(v, bool), "true or false")
    field("bias", "none", lambda v: v in ("none", "all", "lora_only"),
          "'none', 'all' or 'lora_only'")
    field("rank_pattern", {}, lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and is_int(x) and x > 0 for k, x in v.items()),
        "an object of positive integers")
    field("alpha_pattern", {}, lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and is_num(x) for k, x in v.items()), "an object of numbers")
    field("target_modules", None, str_or_list, "a string or a list of strings")
    field("exclude_modules", None, str_or_list, "a string or a list of strings")
    field("modules_to_save", None, str_or_list, "a list of strings")
    field("layers_pattern", None, str_or_list, "a string or a list of strings")
    field("layers_to_transform", None, lambda v: v is None or is_int(v) or (
        isinstance(v, list) and all(is_int(x) for x in v)), "an integer or a list of integers")
    if out["use_dora"]:
        raise CheckpointError(f"{path}: use_dora is true; DoRA adapters rescale the weight "
                              "column-wise and are not supported")
    return out


# ---------------------------------------------------------------------------------- outputs
def _temp_prefix(dest: Path) -> str:
    """Temporaries are named after their destination, host and process, so that a later run can
    tell one left by a killed process (removed) from one being written right now (kept)."""
    return f".{dest.name}.tmp-{os.getpid()}@{socket.gethostname()}-"


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a writer that may own a temporary)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(dest: Path) -> list[Path]:
    """Remove the temporaries of ``dest`` left by processes of this host that no longer run
    (killed before they could clean up); returns what was removed."""
    removed = []
    head, host = f".{dest.name}.tmp-", socket.gethostname()
    try:
        siblings = list(dest.parent.iterdir())
    except OSError:
        return removed
    for entry in siblings:
        pid, _, rest = entry.name[len(head):].partition("@")
        if not entry.name.startswith(head) or not pid.isdigit() \
                or not rest.startswith(host + "-") or process_alive(int(pid)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_directory(destination: str | os.PathLike) -> Iterator[Path]:
    """A fresh temporary directory beside ``destination``, renamed to it when the block ends
    without error and removed otherwise: ``destination`` holds a complete result or nothing."""
    dest = Path(destination)
    remove_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), dir=dest.parent))
    try:
        yield tmp
        os.rename(tmp, dest)
    except OSError as e:
        raise CheckpointError(f"cannot write {dest} ({describe_os_error(e)})") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_new_output(path: str | os.PathLike, what: str, inputs=(), *, force: bool = False,
                     directory: bool = False) -> Path:
    """Checks, before any work, that ``path`` can receive a new output: not an existing file
    (unless ``force``; an existing directory is never overwritten), not inside an input
    directory, and its parent an existing writable directory. Returns the absolute path."""
    out = Path(os.path.abspath(os.path.expanduser(path)))
    for label, inp in inputs:
        inp = Path(os.path.realpath(inp))
        real = Path(os.path.realpath(out))
        if real == inp or inp in real.parents:
            where = "is the" if real == inp else "is inside the"
            raise CheckpointError(f"{what} {str(path)!r} {where} {label} directory "
                                  f"{str(inp)!r}; refusing to write into an input")
    if out.exists() or out.is_symlink():
        if directory or out.is_dir():
            raise CheckpointError(f"{what} {str(path)!r} already exists; choose a new "
                                  + ("directory" if directory else "path"))
        if not force:
            raise CheckpointError(f"{what} {str(path)!r} already exists (use --force to "
                                  "overwrite it)")
    parent = out.parent
    if not parent.is_dir():
        raise CheckpointError(f"{what} {str(path)!r}: parent directory {str(parent)!r} does not "
                              "exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        if os.statvfs(parent).f_flag & os.ST_RDONLY:
            raise CheckpointError(f"{what} {str(path)!r} is on a read-only filesystem")
        raise CheckpointError(f"{what} {str(path)!r}: no permission to write in {str(parent)!r}")
    return out


def check_output_directory(path: str | os.PathLike, what: str) -> Path:
    """A directory a command may write its own files into: an existing writable directory, or a
    new one whose parent is (checked before any work)."""
    out = Path(os.path.abspath(os.path.expanduser(path)))
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{what} {str(path)!r} exists and is not a directory")
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise CheckpointError(f"{what} {str(path)!r}: no permission to write in it")
        return out
    return check_new_output(out, what, directory=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w"):
    """An open temporary file beside ``path``, renamed to it when the block ends without error
    and removed otherwise: ``path`` is never left half-written."""
    dest = Path(path)
    remove_stale_temporaries(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), dir=dest.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as e:
        raise CheckpointError(f"cannot write {dest} ({describe_os_error(e)})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_side_files(source: Path, destination: Path, names=(CONFIG, *SIDE_FILES)) -> None:
    for name in names:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)


def write_model_like(destination: Path, base: ModelDirectory, tensor_for, progress=None) -> None:
    """A model directory with ``base``'s tensors (same keys, dtypes, shapes and shard layout;
    ``.bin`` shards become safetensors) whose values come from ``tensor_for(key)``, written one
    tensor at a time; plus ``base``'s config and tokenizer files."""
    files = base.weight_files()
    names = [f.name if f.suffix == ".safetensors" else
             (MODEL_SINGLE if len(files) == 1 else
              f"model-{i + 1:05d}-of-{len(files):05d}.safetensors")
             for i, f in enumerate(files)]
    keys_of = {f: [] for f in files}
    for key in base.store.keys():
        keys_of[base.store.file_of(key)].append(key)
    weight_map, total = {}, 0
    for f, name in zip(files, names):
        plan = [(key, *base.store.info(key)) for key in keys_of[f]]
        writer = SafetensorsWriter(destination / name, plan)
        try:
            for key, dtype, shape in plan:
                writer.write(key, tensor_for(key))
                weight_map[key] = name
                total += math.prod(shape) * dtype.itemsize
                if progress is not None:
                    progress.update(1)
            writer.close()
        except BaseException:
            writer.abort()
            raise
    if len(files) > 1:
        write_json(destination / MODEL_INDEX, {"metadata": {"total_size": total},
                                               "weight_map": weight_map})
    copy_side_files(base.directory, destination)


def write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, allow_nan=False)
        f.write("\n")


# ---------------------------------------------------------------------------------- the Hub
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+|[A-Za-z0-9][\w.-]*)"
                     r"(?:@(?P<rev>[\w./-]+))?$")


def _hub_error(spec: str, what: str, error: Exception) -> CheckpointError:
    from huggingface_hub import constants

    name = type(error).__name__
    first = str(error).strip().splitlines()[0] if str(error).strip() else name
    if name in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                "HFValidationError"):
        return CheckpointError(f"{what} {spec!r} is not a local directory nor an available Hub "
                               f"repository ({first})")
    if constants.HF_HUB_OFFLINE:
        return CheckpointError(
            f"{what} {spec!r} is not a local directory, and the Hub repository is not in the "
            f"local cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set")
    if name == "LocalEntryNotFoundError":  # the Hub could not be reached, nothing cached
        return CheckpointError(f"{what} {spec!r} is not a local directory, not in the local "
                               f"Hub cache ({constants.HF_HUB_CACHE}), and the Hub cannot be "
                               f"reached ({first})")
    return CheckpointError(f"{what} {spec!r}: cannot fetch from the Hub ({first})")


def resolve(spec: str, what: str, *, weights: bool = True, side_files: bool = False) -> Path:
    """A local directory for ``spec``: the directory itself, or the local snapshot of a Hub
    repository (``org/name`` or ``org/name@revision``) holding the files this package reads —
    configs, the adapter or model weights (``weights=False``: configs only) and, with
    ``side_files``, the tokenizer files a merged model is written with."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{what} {spec!r} is not a directory")
        return path
    match = _HUB_ID.match(spec)
    if match is None or spec.startswith((".", "/", "~")):
        raise CheckpointError(f"{what} {spec!r} does not exist (and is not a Hub id such as "
                              "org/name)")
    from huggingface_hub import snapshot_download

    repo, revision = match["repo"], match["rev"]
    configs = [CONFIG, ADAPTER_CONFIG, MODEL_INDEX, BIN_INDEX]
    try:
        local = Path(snapshot_download(repo, revision=revision, allow_patterns=configs))
        wanted = list(SIDE_FILES) if side_files else []
        if weights:
            if (local / ADAPTER_CONFIG).is_file():
                wanted += [ADAPTER_SAFETENSORS, ADAPTER_BIN]
            elif (local / MODEL_INDEX).is_file():
                wanted += sorted(set(_read_json(local / MODEL_INDEX, what)["weight_map"].values()))
            else:
                wanted += [MODEL_SINGLE, BIN_INDEX, BIN_SINGLE, "pytorch_model-*.bin"]
        if wanted:
            local = Path(snapshot_download(repo, revision=revision,
                                           allow_patterns=configs + wanted))
    except CheckpointError:
        raise
    except Exception as e:  # huggingface_hub's errors carry no common base we could name
        raise _hub_error(spec, what, e) from None
    return local
