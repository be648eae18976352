"""Argument checks shared by the Python API and the command line (whose argparse types wrap
these): every message names the function, the argument and the value received."""

from __future__ import annotations

import math
from numbers import Integral, Real

RANK_POLICIES = ("peft", "exact")
CONTROLS = (None, "uniform")
INIT_MODES = ("principal", "minor")
SWEEP_INIT_MODES = ("random",) + INIT_MODES


def _number(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def epsilon(func: str, arg: str, value) -> float:
    """The cosine threshold: a vector is an intruder when its max |cos| < epsilon. Any positive
    number, as in PEFT: values of 1 and above flag every vector (PEFT's tests use 999)."""
    if not _number(value) or value <= 0:
        raise ValueError(f"{func}: {arg} must be a positive number (got {value!r})")
    return float(value)


def basis_rtol(func: str, value) -> float:
    """The relative gap (to the largest base singular value) below which base singular values
    are grouped as interchangeable: a finite number >= 0."""
    if not _number(value) or value < 0:
        raise ValueError(f"{func}: basis_rtol must be a finite number >= 0 (got {value!r})")
    return float(value)


def top_k(func: str, value) -> int | float:
    """An int >= 1, or a fraction in (0, 1) of ``min(m, n)``."""
    if isinstance(value, Integral) and not isinstance(value, bool) and value >= 1:
        return int(value)
    if _number(value) and not isinstance(value, Integral) and 0 < value < 1:
        return float(value)
    raise ValueError(f"{func}: top_k must be an int >= 1 or a float in (0, 1) (got {value!r})")


def learning_rate(func: str, arg: str, value) -> float:
    if not _number(value) or value <= 0:
        raise ValueError(f"{func}: {arg} must be a positive number (got {value!r})")
    return float(value)


def fraction(func: str, arg: str, value) -> float:
    """A number in [0, 1] (an accuracy, a probability)."""
    if not _number(value) or not 0 <= value <= 1:
        raise ValueError(f"{func}: {arg} must be a number in [0, 1] (got {value!r})")
    return float(value)


def mitigation_lambda(func: str, value) -> float:
    if not _number(value) or value < 0:
        raise ValueError(f"{func}: mitigation_lambda must be a finite number >= 0 (got {value!r})")
    return float(value)


def rank_policy(func: str, value) -> str:
    if value not in RANK_POLICIES:
        raise ValueError(f"{func}: rank must be one of {RANK_POLICIES} (got {value!r})")
    return value


def control(func: str, value):
    """Which mitigation: ``None`` (the intruder-targeted one) or ``"uniform"`` (its control)."""
    if value not in CONTROLS:
        raise ValueError(f"{func}: control must be one of {CONTROLS} (got {value!r})")
    return value


def init_mode(func: str, value) -> str:
    """Which base singular triplets initialise a LoRA adapter: the top r (PiSSA) or the bottom r
    (MiLoRA)."""
    if value not in INIT_MODES:
        raise ValueError(f"{func}: mode must be one of {INIT_MODES} (got {value!r})")
    return value


def init_modes(func: str, arg: str, value) -> tuple:
    """The initialisations a sweep compares: distinct names of :data:`SWEEP_INIT_MODES`
    (``"random"``: PEFT's default, the sweep's own LoRA runs)."""
    names = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not names or len(set(names)) != len(names) or any(n not in SWEEP_INIT_MODES
                                                         for n in names):
        raise ValueError(f"{func}: {arg} must be distinct names among {SWEEP_INIT_MODES} "
                         f"(got {value!r})")
    return names


def init_ranks(func: str, arg: str, value, ranks) -> tuple:
    """The ranks of a sweep's spectrum-initialised runs: distinct ranks of ``ranks`` (where the
    random-initialised runs they are compared with are)."""
    values = tuple(value) if isinstance(value, (list, tuple)) else ()
    if not values or len(set(values)) != len(values) or any(
            isinstance(v, bool) or v not in ranks for v in values):
        raise ValueError(f"{func}: {arg} must be distinct ranks among the sweep's ranks "
                         f"{tuple(ranks)} (got {value!r})")
    return values


def flag(func: str, arg: str, value) -> bool:
    """A bool, and only a bool: a truthy string or number is more likely a mistake."""
    if not isinstance(value, bool):
        raise ValueError(f"{func}: {arg} must be True or False (got {value!r})")
    return value


def positive_int(func: str, arg: str, value) -> int:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{func}: {arg} must be a positive integer (got {value!r})")
    return int(value)


def step(func: str, value) -> int:
    """A training step: an integer >= 0."""
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{func}: step must be an integer >= 0 (got {value!r})")
    return int(value)


def device_name(func: str, value):
    """The form of a device argument: ``None``, ``"auto"``, ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` (whether this machine has it is :func:`device`'s business)."""
    import torch  # here, not at the top: the command line parses its arguments before torch loads

    if value is None or value == "auto" or isinstance(value, torch.device):
        return value
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{func}: device must be 'auto', 'cpu', 'cuda' or 'cuda:N' "
                         f"(got {value!r})")
    return value


def device(func: str, value):
    """A ``torch.device``: ``None`` (each weight where it lives), ``"auto"`` (CUDA when
    available, else CPU), or a device torch knows and this machine has."""
    import torch

    value = device_name(func, value)
    if value is None:
        return None
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(value)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{func}: device {value!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{func}: device {value!r} asked for, but this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(func: str, arg: str, value) -> int:
    """A size in bytes: an integer, or a number with a K, M, G or T suffix (binary units, an
    optional trailing B or iB), e.g. ``"500M"``, ``"20GiB"``."""
    text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _SIZE_UNITS else ""
    try:
        number = float(text[:len(text) - len(unit)])
    except ValueError:
        number = -1.0
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{func}: {arg} must be a size such as 500M or 20G (got {value!r})")
    return int(number * _SIZE_UNITS[unit])


def non_negative(func: str, arg: str, value) -> float:
    if not _number(value) or value < 0:
        raise ValueError(f"{func}: {arg} must be a finite number >= 0 (got {value!r})")
    return float(value)


EXTRACTION_DTYPES = ("auto", "float32", "bfloat16", "float16")


def extraction_rank_policy(func: str, value) -> tuple[str, float | None]:
    """``"fixed"`` (every layer at the given rank) or ``"energy:F"`` with F in (0, 1]: each
    layer's smallest rank keeping a fraction F of its update's energy (squared Frobenius norm).
    Returns ``("fixed", None)`` or ``("energy", F)``."""
    if value == "fixed":
        return "fixed", None
    head, _, number = str(value).partition(":") if isinstance(value, str) else ("", "", "")
    try:
        fraction = float(number)
    except ValueError:
        fraction = math.nan
    if head != "energy" or not 0 < fraction <= 1:
        raise ValueError(f"{func}: rank_policy must be 'fixed' or 'energy:F' with F in (0, 1], "
                         f"e.g. 'energy:0.9' (got {value!r})")
    return "energy", fraction


def extraction_dtype(func: str, value):
    """The adapter's dtype: ``None``/``"auto"`` (each weight's dtype in the tuned checkpoint) or
    one of ``float32``, ``bfloat16``, ``float16`` (a name or the torch dtype)."""
    import torch

    if value is None or value == "auto":
        return None
    named = {name: getattr(torch, name) for name in EXTRACTION_DTYPES[1:]}
    if isinstance(value, str) and value in named:
        return named[value]
    if value in named.values():
        return value
    raise ValueError(f"{func}: dtype must be one of {EXTRACTION_DTYPES} (got {value!r})")
