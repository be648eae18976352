"""PEFT plumbing: find the LoRA-wrapped layers of a model and read/write their factors.

Everything here works in the *map orientation* of a layer, the one ``nn.Linear`` uses: the
weight ``W0`` is ``(m, n)`` with ``m`` outputs, and a LoRA update is ``W0 + s * B @ A`` with
``B`` ``(m, r)`` and ``A`` ``(r, n)``. Layers whose stored weight is transposed are turned
around here, once, so the maths never sees the difference:

- transformers ``Conv1D`` (GPT-2; PEFT sets ``fan_in_fan_out=True``) stores ``(in, out)``:
  ``W0 = weight.T``.
- ``nn.Embedding`` stores ``(num_embeddings, embedding_dim)``; as a map from a one-hot token to
  its embedding it is ``W0 = weight.T`` (``m = embedding_dim``), and PEFT's
  ``lora_embedding_B`` ``(embedding_dim, r)`` / ``lora_embedding_A`` ``(r, num_embeddings)``
  are then ``B`` and ``A`` as they stand.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# Layer kinds this package understands, by the PEFT LoRA wrapper class.
_SUPPORTED = "LoRA on nn.Linear, transformers Conv1D or nn.Embedding"


@dataclass
class LoraTarget:
    """One LoRA-wrapped layer: ``name`` as in the base model (what ``rank_pattern`` keys match)."""

    name: str
    layer: nn.Module
    kind: str  # "linear", "conv1d" or "embedding"

    @property
    def transposed(self) -> bool:
        """True when the stored weight is the transpose of the map (Conv1D, Embedding)."""
        return self.kind == "embedding" or bool(getattr(self.layer, "fan_in_fan_out", False))

    def base_weight(self, device=None) -> torch.Tensor:
        """``W0`` in map orientation, float32 (float64 stays float64), on ``device``."""
        w = self.layer.get_base_layer().weight.detach()
        w = w.to(device=device, dtype=_compute_dtype(w.dtype))
        return w.T if self.transposed else w

    def factors(self, adapter: str, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` of ``adapter``: ``(m, r)`` and ``(r, n)``, float32 or float64."""
        if self.kind == "embedding":
            b = self.layer.lora_embedding_B[adapter]
            a = self.layer.lora_embedding_A[adapter]
        else:
            b = self.layer.lora_B[adapter].weight
            a = self.layer.lora_A[adapter].weight
        dtype = _compute_dtype(self.layer.get_base_layer().weight.dtype)
        return b.detach().to(device=device, dtype=dtype), a.detach().to(device=device, dtype=dtype)

    def scale(self, adapter: str) -> float:
        """``s`` in ``W0 + s B A`` (``alpha/r``, or ``alpha/sqrt(r)`` with rsLoRA)."""
        return float(self.layer.scaling[adapter])

    def rank(self, adapter: str) -> int:
        return int(self.layer.r[adapter])

    def write_factors(self, adapter: str, B: torch.Tensor, A: torch.Tensor) -> None:
        """Copy ``B`` ``(m, r')`` and ``A`` ``(r', n)`` into the adapter's existing parameters,
        keeping their dtype and device; the shapes must already agree."""
        if self.kind == "embedding":
            pb, pa = self.layer.lora_embedding_B[adapter], self.layer.lora_embedding_A[adapter]
        else:
            pb, pa = self.layer.lora_B[adapter].weight, self.layer.lora_A[adapter].weight
        for p, v, what in ((pb, B, "B"), (pa, A, "A")):
            if p.shape != v.shape:
                raise RuntimeError(f"{self.name}: new LoRA factor {what} has shape {tuple(v.shape)} "
                                   f"but the adapter's parameter has {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(v)

    def copy_adapter(self, src: str, dst: str) -> None:
        """Copy the factors of ``src`` into ``dst`` unchanged (a layer without intruders)."""
        b, a = self.factors(src)
        self.write_factors(dst, b, a)

    def copy_bias(self, src: str, dst: str) -> None:
        """The lora_B bias (``lora_bias=True``) is not part of the weight update: carry it over."""
        if self.kind == "embedding":
            return
        bs, bd = self.layer.lora_B[src].bias, self.layer.lora_B[dst].bias
        if bs is not None and bd is not None:
            with torch.no_grad():
                bd.copy_(bs)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision weights are decomposed in float32 (LAPACK/cuSOLVER have no half SVD).
    return torch.float64 if dtype == torch.float64 else torch.float32


def pattern_key(name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly this module name
    (PEFT matches keys as regexes anchored at a name suffix)."""
    return re.escape(name)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for the full fine-tuning path
        return False
    return isinstance(model, PeftModel)


def check_adapter(func: str, arg: str, peft_model, adapter_name) -> str:
    """Validate an existing LoRA adapter name; returns it. ``None`` means the active adapter."""
    if not is_peft_model(peft_model):
        raise ValueError(f"{func}: expected a peft.PeftModel with LoRA adapters "
                         f"(got {type(peft_model).__name__})")
    adapters = list(peft_model.peft_config)
    if adapter_name is None:
        active = peft_model.active_adapters
        if len(active) != 1:
            raise ValueError(f"{func}: {arg}=None is ambiguous with active adapters {active}; "
                             f"name one of {adapters}")
        adapter_name = active[0]
    if not isinstance(adapter_name, str) or adapter_name not in peft_model.peft_config:
        raise ValueError(f"{func}: {arg}={adapter_name!r} is not an adapter of this model "
                         f"(adapters: {adapters})")
    ptype = getattr(peft_model.peft_config[adapter_name], "peft_type", None)
    if ptype != "LORA":  # PeftType is a str enum; AdaLoRA, VeRA, ... store other updates
        raise ValueError(f"{func}: adapter {adapter_name!r} is of type "
                         f"{getattr(ptype, 'value', ptype)}; only LoRA adapters are supported")
    return adapter_name


def lora_targets(func: str, peft_model, adapter_name: str, modules=None) -> list[LoraTarget]:
    """Every layer carrying a LoRA ``adapter_name`` (or those named in ``modules``: full names,
    or suffixes after a '.'), checked to be supported. Raises ValueError naming the module
    otherwise, and when nothing is found."""
    from peft.tuners.lora.layer import Embedding as LoraEmbedding
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer

    # named_modules() of a PeftModel prefixes "base_model.model."; rank_pattern keys and the
    # names users know are relative to the wrapped transformers model.
    prefix = "base_model.model."
    found: list[LoraTarget] = []
    for full_name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name not in layer.lora_A and adapter_name not in layer.lora_embedding_A:
            continue
        name = full_name[len(prefix):] if full_name.startswith(prefix) else full_name
        found.append(_classify(func, name, layer, adapter_name, LoraLinear, LoraEmbedding))
    if not found:
        raise ValueError(f"{func}: the model has no LoRA layers for adapter {adapter_name!r}")
    if modules is None:
        return found
    return select_modules(func, found, modules)


def select_modules(func: str, targets: list, modules) -> list:
    """Keep the targets named in ``modules`` (full names or '.'-suffixes), in model order."""
    if isinstance(modules, str):
        modules = [modules]
    modules = list(modules)
    keep = []
    for t in targets:
        if any(t.name == m or t.name.endswith("." + m) for m in modules):
            keep.append(t)
    unknown = [m for m in modules if not any(t.name == m or t.name.endswith("." + m) for t in targets)]
    if unknown:
        raise ValueError(f"{func}: modules {unknown} match no layer (available: "
                         f"{[t.name for t in targets][:8]}{' ...' if len(targets) > 8 else ''})")
    return keep


def _classify(func, name, layer, adapter, LoraLinear, LoraEmbedding) -> LoraTarget:
    if adapter in getattr(layer, "lora_magnitude_vector", {}) or layer.use_dora.get(adapter, False):
        raise ValueError(f"{func}: module {name!r} uses DoRA (use_dora=True), which is not supported")
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    kind = None
    if isinstance(layer, LoraEmbedding) and isinstance(base, nn.Embedding):
        kind = "embedding"
    elif isinstance(layer, LoraLinear):
        if isinstance(base, nn.Linear):
            kind = "linear"
        elif _is_conv1d(base):
            kind = "conv1d"
    if kind is None or not isinstance(weight, torch.Tensor) or not weight.is_floating_point() \
            or weight.dim() != 2:
        what = type(base).__name__
        if isinstance(weight, torch.Tensor):
            what += f" with a {weight.dtype} weight of shape {tuple(weight.shape)}"
        raise ValueError(f"{func}: module {name!r} is {type(layer).__name__} over {what}; "
                         f"supported: {_SUPPORTED} with a floating-point weight")
    return LoraTarget(name=name, layer=layer, kind=kind)


def _is_conv1d(module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def weight_targets(func: str, base_model: nn.Module, tuned_model: nn.Module, modules=None):
    """Pairs ``(name, W0, W)`` (map orientation, float32) for full fine-tuning: every
    ``nn.Linear``/``Conv1D``/``nn.Embedding`` present in both models with the same shape."""
    tuned = dict(tuned_model.named_modules())
    pairs = []
    for name, mod in base_model.named_modules():
        if isinstance(mod, nn.Embedding):
            transposed = True
        elif isinstance(mod, nn.Linear):
            transposed = False
        elif _is_conv1d(mod):
            transposed = True
        else:
            continue
        other = tuned.get(name)
        if other is None:
            raise ValueError(f"{func}: module {name!r} of model is missing from tuned_model")
        if other.weight.shape != mod.weight.shape:
            raise ValueError(f"{func}: module {name!r} has weight shape {tuple(mod.weight.shape)} in "
                             f"model but {tuple(other.weight.shape)} in tuned_model")
        pairs.append(_WeightPair(name, mod, other, transposed))
    if not pairs:
        raise ValueError(f"{func}: model has no nn.Linear, Conv1D or nn.Embedding layers")
    if modules is None:
        return pairs
    return select_modules(func, pairs, modules)


@dataclass
class _WeightPair:
    name: str
    base: nn.Module
    tuned: nn.Module
    transposed: bool

    @property
    def kind(self) -> str:
        if isinstance(self.base, nn.Embedding):
            return "embedding"
        return "conv1d" if self.transposed else "linear"

    def weights(self, device=None):
        out = []
        for mod in (self.base, self.tuned):
            w = mod.weight.detach()
            w = w.to(device=device, dtype=_compute_dtype(w.dtype))
            out.append(w.T if self.transposed else w)
        return out
