"""Layer access: the one place that knows a layer's name, kind, orientation and how to read it.

Everything downstream of this module sees a :class:`Layer`: a name, a kind (``"linear"``,
``"conv1d"`` or ``"embedding"``), the *map orientation* shape ``(m, n)`` (outputs first, as
``nn.Linear`` stores its weight) and accessors for the base weight ``W0`` (m, n), the tuned
weight ``W`` of a full fine-tune, or the LoRA factors ``B`` (m, r) and ``A`` (r, n) with their
rank and scale (``W = W0 + scale * B @ A``). Three sources produce layers:

- :func:`peft_model_layers`: a ``peft.PeftModel`` in memory (its LoRA layers);
- :func:`model_pair_layers`: a pair of models in memory (full fine-tuning);
- :class:`CheckpointAdapter` and :func:`checkpoint_pair_layers`: checkpoints on disk, read tensor by
  tensor through :mod:`intruder_ext.checkpoints` without instantiating any model.

Orientation. ``nn.Linear`` stores ``(out, in)``: the map itself. transformers' ``Conv1D`` (GPT-2)
stores ``(in, out)`` and ``nn.Embedding`` stores ``(num_embeddings, embedding_dim)``; as maps
(from the input, or from a one-hot token, to the output) both are the transpose. PEFT's factors
are stored in map orientation for every kind (``lora_B`` / ``lora_embedding_B`` is ``(m, r)``,
``lora_A`` / ``lora_embedding_A`` is ``(r, n)``), so only weights are ever turned around.

Kinds in checkpoints, where there are no module classes (the one documented rule):

- a LoRA pair stored as ``lora_embedding_A``/``lora_embedding_B`` is an embedding;
- a weight is a ``Conv1D`` when ``config.json``'s ``model_type`` is one of
  :data:`CONV1D_MODEL_TYPES` (the transformers architectures built on ``Conv1D``) and its module
  is one of :data:`CONV1D_MODULES`, or, for an adapter, when ``adapter_config.json`` says
  ``fan_in_fan_out``;
- a weight is an embedding when its module's own name (the last dotted part) is one of
  :data:`EMBEDDING_MODULES` (transformers' names for ``nn.Embedding`` in language models);
- every other 2-D ``*.weight`` is linear.

Names. A layer's name is its module path in the model PEFT wraps (``model.layers.0.mlp.up_proj``
for a ``LlamaForCausalLM``): what ``rank_pattern`` keys and ``--modules`` match. Adapter files
prefix it with :data:`PEFT_PREFIX`. Base checkpoints saved from another class of the same model
differ by one leading component (``model.``, ``bert.``, ``transformer.``: the task head's
wrapper); :class:`CheckpointAdapter` finds the one such translation that maps every LoRA module
of the adapter onto a base tensor, and an adapter module with no base tensor is an error naming
it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .checkpoints import (AdapterDirectory, CheckpointError, ModelDirectory, is_adapter_dir,
                          is_model_dir, resolve)

__all__ = ["CONV1D_MODEL_TYPES", "CONV1D_MODULES", "EMBEDDING_MODULES", "KINDS", "PEFT_PREFIX",
           "CheckpointAdapter", "Layer", "LayerSet", "NonFiniteError", "Skipped",
           "checkpoint_pair_layers", "model_pair_layers", "module_type", "pattern_key",
           "peft_model_layers"]

KINDS = ("linear", "conv1d", "embedding")
PEFT_PREFIX = "base_model.model."
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "decision_transformer", "imagegpt", "clvp",
                                "clvp_encoder", "clvp_decoder"})
CONV1D_MODULES = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
EMBEDDING_MODULES = frozenset({
    "embed_tokens", "word_embeddings", "position_embeddings", "token_type_embeddings",
    "position_embedding", "token_embedding", "shared", "wte", "wpe", "embed_positions",
    "tok_embeddings", "tokens_embed", "positions_embed", "embed_in", "relative_attention_bias", "embedding",
    "embeddings", "embed_audio_tokens",
})
SUPPORTED = "LoRA on nn.Linear, transformers Conv1D or nn.Embedding"


class NonFiniteError(ValueError):
    """A weight or LoRA factor holds NaN or inf: every number derived from it would be garbage."""


class LayerError(ValueError):
    """A layer cannot be analysed as asked (unsupported kind, shapes that do not fit, ...)."""


def stored_is_transposed(kind: str) -> bool:
    """True when the stored weight is the transpose of the map (Conv1D, embeddings)."""
    return kind in ("conv1d", "embedding")


def to_map(kind: str, stored: torch.Tensor) -> torch.Tensor:
    """The stored weight of a layer of ``kind`` in map orientation (a view)."""
    return stored.T if stored_is_transposed(kind) else stored


def to_stored(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """A map-orientation ``(m, n)`` matrix as the layer stores its weight (a view)."""
    return weight.T if stored_is_transposed(kind) else weight


def pattern_key(name: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that matches exactly this module name (PEFT
    matches keys as regexes anchored at a name suffix)."""
    return re.escape(name)


def pattern_value(patterns: dict, name: str, default):
    """PEFT's per-module override: the value of the first key ``k`` of ``patterns`` such that
    ``name`` matches ``(.*\\.)?(k)$``, else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def select(func: str, layers: list, modules) -> list:
    """The layers named in ``modules`` (full names, or suffixes after a '.'), in model order;
    ``None`` keeps all. A name matching no layer is an error listing what exists."""
    if modules is None:
        return layers
    if isinstance(modules, str):
        modules = [modules]
    modules = list(modules)

    def hit(name, m):
        return name == m or name.endswith("." + m)

    unknown = [m for m in modules if not any(hit(t.name, m) for t in layers)]
    if unknown:
        names = [t.name for t in layers]
        raise ValueError(f"{func}: modules {unknown} match no layer (available: {names[:8]}"
                         f"{' ...' if len(names) > 8 else ''})")
    return [t for t in layers if any(hit(t.name, m) for m in modules)]


def module_type(name: str) -> str:
    """A layer's module type, the last part of its name (``q_proj`` for
    ``model.layers.0.self_attn.q_proj``): what LoRA's ``target_modules`` name."""
    return name.rsplit(".", 1)[-1]


def natural_key(name: str):
    """Sort key putting ``layers.2`` before ``layers.10``: checkpoints list tensors
    alphabetically, which is not the model's order."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]


def check_finite(name: str, what: str, t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        raise NonFiniteError(f"module {name!r}: {what} has non-finite values ({nan} NaN, "
                             f"{inf} inf of {t.numel()})")
    return t


# ---------------------------------------------------------------------------------- Layer
@dataclass
class Layer:
    """One analysable layer, in map orientation. Tensors are read on demand, every time (a
    checkpoint layer holds no tensor between calls), and checked to be finite."""

    name: str
    kind: str
    shape: tuple[int, int]
    rank: int | None = None  # LoRA rank r; None for full fine-tuning
    scale: float | None = None  # LoRA scale s in W0 + s B A
    read_base: Callable[[], torch.Tensor] = field(default=None, repr=False)  # stored orientation
    read_tuned: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    read_factors: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = field(default=None,
                                                                                repr=False)
    module: nn.Module | None = field(default=None, repr=False)  # the PEFT LoraLayer, in memory

    @property
    def is_lora(self) -> bool:
        return self.read_factors is not None

    def base_weight(self, device=None) -> torch.Tensor:
        """``W0`` (m, n) in its stored dtype (bf16 stays bf16), on ``device``."""
        w = to_map(self.kind, self.read_base().detach())
        return check_finite(self.name, "the base weight", w.to(device))

    def tuned_weight(self, device=None) -> torch.Tensor:
        """``W`` (m, n) of a full fine-tune, in its stored dtype, on ``device``."""
        w = to_map(self.kind, self.read_tuned().detach())
        return check_finite(self.name, "the tuned weight", w.to(device))

    def factors(self, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)``: (m, r) and (r, n), on ``device``, in ``dtype`` (default: as stored)."""
        b, a = self.read_factors()
        b, a = b.detach().to(device=device, dtype=dtype), a.detach().to(device=device, dtype=dtype)
        return check_finite(self.name, "lora_B", b), check_finite(self.name, "lora_A", a)


@dataclass
class Skipped:
    """A module a source found but does not analyse, and why."""

    name: str
    reason: str


@dataclass
class LayerSet:
    """What a source yields: the layers to analyse and what it skipped (with the reason)."""

    layers: list[Layer]
    skipped: list[Skipped] = field(default_factory=list)
    adapter_name: str | None = None  # None for full fine-tuning
    inputs: list[tuple[str, object]] = field(default_factory=list)  # (label, directory) read
    model: str | None = None  # the base model's name or path, to label cache entries


# ---------------------------------------------------------------------------------- in memory
def kind_of_module(module: nn.Module) -> str | None:
    """The kind of a base module in memory, from its class; None when unsupported."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return "conv1d" if isinstance(module, Conv1D) else None


def _strip_peft_prefix(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for everything but in-memory LoRA models
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


def peft_factor_params(module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters holding ``(B, A)`` of ``adapter`` in a PEFT LoraLayer."""
    if adapter in module.lora_embedding_A:
        return module.lora_embedding_B[adapter], module.lora_embedding_A[adapter]
    return module.lora_B[adapter].weight, module.lora_A[adapter].weight


def peft_model_layers(func: str, peft_model, adapter_name=None, modules=None) -> LayerSet:
    """Every layer carrying the LoRA adapter ``adapter_name`` (default: the active one) of a
    ``PeftModel``; an unsupported layer (DoRA, another base module type) is an error naming it."""
    from peft.tuners.lora.layer import LoraLayer

    adapter = check_adapter(func, "adapter_name", peft_model, adapter_name)
    layers = []
    for full_name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter not in module.lora_A and adapter not in module.lora_embedding_A:
            continue
        name = _strip_peft_prefix(full_name)
        layers.append(_peft_layer(func, name, module, adapter))
    if not layers:
        raise ValueError(f"{func}: the model has no LoRA layers for adapter {adapter!r}")
    return LayerSet(select(func, layers, modules), [], adapter,
                    model=model_name(peft_model.get_base_model()))


def _peft_layer(func, name, module, adapter) -> Layer:
    if adapter in getattr(module, "lora_magnitude_vector", {}) or module.use_dora.get(adapter):
        raise LayerError(f"{func}: module {name!r} uses DoRA (use_dora=True), which is not "
                         "supported")
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    kind = kind_of_module(base)
    if kind == "embedding" and adapter not in module.lora_embedding_A:
        kind = None
    if kind is None or not isinstance(weight, torch.Tensor) or not weight.is_floating_point() \
            or weight.dim() != 2:
        what = type(base).__name__
        if isinstance(weight, torch.Tensor):
            what += f" with a {weight.dtype} weight of shape {tuple(weight.shape)}"
        raise LayerError(f"{func}: module {name!r} is {type(module).__name__} over {what}; "
                         f"supported: {SUPPORTED} with a floating-point weight")
    if kind == "linear" and getattr(module, "fan_in_fan_out", False):
        kind = "conv1d"  # a Conv1D-like module unknown to kind_of_module; PEFT transposes it
    m, n = to_map(kind, weight).shape
    return Layer(name=name, kind=kind, shape=(m, n), rank=int(module.r[adapter]),
                 scale=float(module.scaling[adapter]),
                 read_base=lambda: module.get_base_layer().weight,
                 read_factors=lambda: peft_factor_params(module, adapter), module=module)


def write_peft_factors(layer: Layer, adapter: str, B: torch.Tensor, A: torch.Tensor,
                       like: str) -> None:
    """Store ``B`` (m, r') and ``A`` (r', n) as ``adapter``'s factors of an in-memory layer, in the
    dtype and on the device of adapter ``like``'s factors (PEFT keeps a new adapter's dtype)."""
    new_b, new_a = peft_factor_params(layer.module, adapter)
    old_b, old_a = peft_factor_params(layer.module, like)
    for param, value, old, what in ((new_b, B, old_b, "B"), (new_a, A, old_a, "A")):
        if param.shape != value.shape:
            raise RuntimeError(f"{layer.name}: new LoRA factor {what} has shape "
                               f"{tuple(value.shape)} but the adapter's parameter has "
                               f"{tuple(param.shape)}")
        param.data = value.detach().to(device=old.device, dtype=old.dtype).clone()


def copy_peft_extras(peft_model, layers: list[Layer], src: str, dst: str) -> None:
    """What a new adapter ``dst`` must carry over from ``src`` besides the factors: the
    ``lora_B`` biases (``lora_bias=True``, not part of the weight update) and the trained copies
    of ``modules_to_save`` (PEFT's ``add_adapter`` copies the original module instead)."""
    from peft.utils import ModulesToSaveWrapper

    with torch.no_grad():
        for layer in layers:
            if src in layer.module.lora_embedding_A:
                continue
            bias_src, bias_dst = layer.module.lora_B[src].bias, layer.module.lora_B[dst].bias
            if bias_src is not None and bias_dst is not None:
                bias_dst.copy_(bias_src)
        for module in peft_model.modules():
            if isinstance(module, ModulesToSaveWrapper) and src in module.modules_to_save \
                    and dst in module.modules_to_save:
                module.modules_to_save[dst].load_state_dict(module.modules_to_save[src].state_dict())


def model_pair_layers(func: str, base_model: nn.Module, tuned_model: nn.Module,
                      modules=None) -> LayerSet:
    """Full fine-tuning: every ``nn.Linear``/``Conv1D``/``nn.Embedding`` of ``base_model``,
    paired by name with the same module of ``tuned_model`` (which must have the same shape)."""
    tuned = dict(tuned_model.named_modules())
    layers = []
    for name, module in base_model.named_modules():
        kind = kind_of_module(module)
        if kind is None:
            continue
        other = tuned.get(name)
        if other is None:
            raise ValueError(f"{func}: module {name!r} of model is missing from tuned_model")
        if other.weight.shape != module.weight.shape:
            raise ValueError(f"{func}: module {name!r} has weight shape "
                             f"{tuple(module.weight.shape)} in model but "
                             f"{tuple(other.weight.shape)} in tuned_model")
        m, n = to_map(kind, module.weight).shape
        layers.append(Layer(name=name, kind=kind, shape=(m, n),
                            read_base=lambda module=module: module.weight,
                            read_tuned=lambda other=other: other.weight))
    if not layers:
        raise ValueError(f"{func}: model has no nn.Linear, Conv1D or nn.Embedding layers")
    return LayerSet(select(func, layers, modules), [], None, model=model_name(base_model))


def model_name(model) -> str | None:
    """What a transformers model was loaded from (its Hub id or path), where it says."""
    return getattr(getattr(model, "config", None), "name_or_path", None) or None


# ---------------------------------------------------------------------------------- checkpoints
def kind_from_name(module: str, model_type: str | None) -> str:
    """The kind of a checkpoint weight from its module path and ``config.json``'s model_type
    (the rule in the module docstring)."""
    leaf = module.rsplit(".", 1)[-1]
    if leaf in EMBEDDING_MODULES:
        return "embedding"
    if model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES:
        return "conv1d"
    return "linear"


def _weight_modules(model: ModelDirectory) -> dict[str, tuple]:
    """module path -> (dtype, stored shape) of every 2-D floating ``*.weight`` tensor."""
    out = {}
    for key in model.store.keys():
        if not key.endswith(".weight"):
            continue
        dtype, shape = model.store.info(key)
        if len(shape) == 2 and dtype.is_floating_point:
            out[key[:-len(".weight")]] = (dtype, shape)
    return out


def checkpoint_pair_layers(func: str, base: ModelDirectory, tuned: ModelDirectory,
                           modules=None) -> LayerSet:
    """Full fine-tuning from two checkpoints: every 2-D weight of ``base`` (kinds by the name
    rule), read lazily from both. A base weight missing from ``tuned``, or of another shape, is
    an error naming it; 2-D weights only in ``tuned`` are skipped (a new head, say)."""
    base_w, tuned_w = _weight_modules(base), _weight_modules(tuned)
    if not base_w:
        raise CheckpointError(f"BASE {str(base.directory)!r} has no 2-D weight matrices")
    layers, skipped = [], []
    for name, (_, shape) in sorted(base_w.items(), key=lambda kv: natural_key(kv[0])):
        if name not in tuned_w:
            raise CheckpointError(f"TUNED {str(tuned.directory)!r} has no {name}.weight, "
                                  "which BASE has (not a fine-tune of BASE?)")
        if tuned_w[name][1] != shape:
            raise CheckpointError(f"TUNED does not match BASE: {name}.weight is "
                                  f"{tuple(tuned_w[name][1])} in TUNED but {tuple(shape)} in BASE")
        kind = kind_from_name(name, base.model_type)
        key = name + ".weight"
        layers.append(Layer(name=name, kind=kind, shape=tuple(reversed(shape))
                            if stored_is_transposed(kind) else tuple(shape),
                            read_base=lambda key=key: base.store.read(key),
                            read_tuned=lambda key=key: tuned.store.read(key)))
    for name in tuned_w.keys() - base_w.keys():
        skipped.append(Skipped(name, "only in TUNED (no base weight to compare with)"))
    return LayerSet(select(func, layers, modules), skipped, None)


def peft_target(config: dict, name: str) -> bool:
    """Whether PEFT would put a LoRA layer on module ``name`` for this adapter config
    (``target_modules``, ``exclude_modules``, ``modules_to_save``, ``layers_to_transform`` and
    ``layers_pattern``, as ``peft.tuners.tuners_utils.check_target_module_exists`` decides)."""
    def listed(spec) -> bool:
        if isinstance(spec, str):
            return re.fullmatch(spec, name) is not None
        return name in spec or any(name.endswith("." + t) for t in spec)

    if config.get("exclude_modules") and listed(config["exclude_modules"]):
        return False
    for m in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", name):
            return False
    targets = config.get("target_modules")
    if targets is None:
        return False
    if isinstance(targets, str):
        return listed(targets)
    if name in targets:  # named in full: PEFT applies no layer filter
        return True
    if not listed(targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or indexes == []:
        return True
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    idx = int(match["idx"])
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def peft_factor_keys(name: str, kind: str) -> tuple[str, str]:
    """The adapter file's keys of a module's ``(A, B)`` as PEFT saves them (what ``_LORA_KEY``
    reads back): ``lora_embedding_A``/``lora_embedding_B`` for embeddings, else
    ``lora_A.weight``/``lora_B.weight``; both factors in map orientation for every kind."""
    prefix = PEFT_PREFIX + name
    if kind == "embedding":
        return prefix + ".lora_embedding_A", prefix + ".lora_embedding_B"
    return prefix + ".lora_A.weight", prefix + ".lora_B.weight"


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                       r"lora_embedding_B|lora_B\.bias|lora_magnitude_vector(?:\.weight)?)$")


class CheckpointAdapter:
    """A PEFT LoRA adapter directory against a base model directory, read lazily.

    Interprets the adapter as PEFT does (``target_modules``, ``layers_to_transform``,
    ``rank_pattern``/``alpha_pattern``, ``use_rslora``, ``fan_in_fan_out``, embeddings) and
    accounts for every tensor of the adapter file: LoRA pairs become :class:`Layer` objects (or
    :class:`Skipped` entries with the reason), ``lora_B`` biases and whole tensors that replace
    base tensors (``modules_to_save``, ``bias="all"``, saved embedding layers) are kept for the
    writers. Raises :class:`~intruder_ext.checkpoints.CheckpointError` for anything that does not
    fit the base (a module without a base tensor, shapes that do not match in either
    orientation, a Conv1D adapter without ``fan_in_fan_out``, ranks that contradict the config).
    """

    def __init__(self, base: ModelDirectory, adapter: AdapterDirectory):
        self.base, self.adapter = base, adapter
        cfg = adapter.config
        self.config = cfg
        where = f"ADAPTER {str(adapter.directory)!r}"
        pairs: dict[str, dict[str, str]] = {}
        self.replacements: dict[str, str] = {}  # base key -> adapter key (whole tensors)
        for key in adapter.store.keys():
            short = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            m = _LORA_KEY.match(short)
            if m is None:
                self.replacements[short.replace(".base_layer.", ".")] = key
                continue
            if m["part"].startswith("lora_magnitude_vector"):
                raise CheckpointError(f"{where}: {m['module']!r} is a DoRA module "
                                      "(lora_magnitude_vector), which is not supported")
            pairs.setdefault(m["module"], {})[m["part"]] = key
        if not pairs:
            raise CheckpointError(f"{where} holds no LoRA weights (no lora_A/lora_B tensors)")
        base_weights = _weight_modules(base)
        self.to_base = _prefix_rule(list(pairs), base_weights, where, str(base.directory))
        self.layers: list[Layer] = []
        self.skipped: list[Skipped] = []
        self.adapter_keys: dict[str, dict[str, str]] = {}  # layer name -> part -> adapter key
        self.base_keys: dict[str, str] = {}  # layer name -> base weight key
        for name, parts in sorted(pairs.items(), key=lambda kv: natural_key(kv[0])):
            layer = self._layer(name, parts, base_weights, where)
            if layer is not None:
                self.layers.append(layer)
        self.replacements = {self._replacement_key(k): v for k, v in self.replacements.items()}
        self._merge_index: dict | None = None

    def _replacement_key(self, key: str) -> str:
        """A replaced tensor's base key: the same prefix rule as the LoRA modules, when it
        leads to a base tensor; otherwise the key as it stands (a head BASE may lack)."""
        module, _, param = key.rpartition(".")
        mapped = f"{self.to_base(module)}.{param}" if module else key
        return mapped if mapped in self.base.store else key

    def _layer(self, name: str, parts: dict, base_weights: dict, where: str) -> Layer | None:
        cfg = self.config
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            self.skipped.append(Skipped(name, "incomplete LoRA pair (only "
                                        f"{', '.join(sorted(parts))}): PEFT would not load it"))
            return None
        base_module = self.to_base(name)
        if base_module not in base_weights:
            raise CheckpointError(f"{where}: LoRA module {name!r} has no base weight "
                                  f"{base_module}.weight in BASE {str(self.base.directory)!r}")
        if not peft_target(cfg, name):
            self.skipped.append(Skipped(name, "not targeted by adapter_config.json "
                                        "(target_modules, layers_to_transform, exclude_modules); "
                                        "PEFT would not load it"))
            return None
        a_dtype, a_shape = self.adapter.store.info(a_key)
        b_dtype, b_shape = self.adapter.store.info(b_key)
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] \
                or not a_dtype.is_floating_point or not b_dtype.is_floating_point:
            raise CheckpointError(f"{where}: LoRA pair of {name!r} has shapes A {list(a_shape)} "
                                  f"and B {list(b_shape)} ({a_dtype}, {b_dtype}); expected "
                                  "floating A (r, n) and B (m, r)")
        rank = a_shape[0]
        if embedding:
            kind = "embedding"
        else:
            named_conv1d = kind_from_name(base_module, self.base.model_type) == "conv1d"
            if named_conv1d and not cfg["fan_in_fan_out"]:
                raise CheckpointError(
                    f"{where}: {name!r} is a Conv1D layer (stored as (in, out)) but "
                    "adapter_config.json has fan_in_fan_out=false; PEFT saves Conv1D adapters with "
                    "fan_in_fan_out=true, so this adapter does not fit this base")
            kind = "conv1d" if named_conv1d or cfg["fan_in_fan_out"] else "linear"
        stored = tuple(base_weights[base_module][1])
        m, n = (stored[1], stored[0]) if stored_is_transposed(kind) else stored
        if (b_shape[0], a_shape[1]) != (m, n):
            flipped = " (they would fit transposed: check fan_in_fan_out)" \
                if (b_shape[0], a_shape[1]) == (n, m) else ""
            raise CheckpointError(
                f"{where} does not match BASE: {name!r} has lora_B @ lora_A of shape "
                f"{(b_shape[0], a_shape[1])} but the base weight {base_module}.weight is "
                f"{stored} stored, {(m, n)} as a {kind} map{flipped}")
        want_rank = pattern_value(cfg["rank_pattern"], name, cfg["r"])
        if want_rank != rank:
            raise CheckpointError(f"{where}: adapter_config.json gives {name!r} rank {want_rank} "
                                  f"but its lora_A has {rank} rows")
        alpha = pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"])
        self.adapter_keys[name] = parts
        self.base_keys[name] = base_module + ".weight"
        saved_base = self.replacements.get(base_module + ".weight") \
            or self.replacements.get(name + ".weight")
        store, base_store = self.adapter.store, self.base.store
        read_base = (lambda k=saved_base: store.read(k)) if saved_base else \
            (lambda k=base_module + ".weight": base_store.read(k))
        return Layer(name=name, kind=kind, shape=(m, n), rank=rank,
                     scale=lora_scale(alpha, rank, cfg["use_rslora"]), read_base=read_base,
                     read_factors=lambda: (store.read(b_key), store.read(a_key)))

    def layer_set(self, func: str, modules=None) -> LayerSet:
        return LayerSet(select(func, self.layers, modules), list(self.skipped), "default")

    def _factor_keys(self, name: str) -> tuple[str, str]:
        parts = self.adapter_keys[name]
        if "lora_embedding_A" in parts:
            return parts["lora_embedding_B"], parts["lora_embedding_A"]
        return parts["lora_B.weight"], parts["lora_A.weight"]

    def adapter_tensors(self, new_factors: dict) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter file, in its order and dtype, with the factors of the
        layers in ``new_factors`` (name -> ``(B, A)`` in map orientation) replaced."""
        replaced = {}
        for name, (B, A) in new_factors.items():
            for key, value in zip(self._factor_keys(name), (B, A)):
                replaced[key] = value.detach().cpu().to(self.adapter.store.info(key)[0])
        return {key: replaced[key] if key in replaced else self.adapter.store.read(key)
                for key in self.adapter.store.keys()}

    def check_mergeable(self) -> None:
        """Every tensor the adapter replaces must exist in BASE with the same shape."""
        for base_key, adapter_key in self.replacements.items():
            if base_key not in self.base.store:
                raise CheckpointError(f"ADAPTER {str(self.adapter.directory)!r} saves {base_key!r} "
                                      "(modules_to_save or bias), which BASE does not have: merge "
                                      "onto a BASE saved with that module")
            if self.base.store.info(base_key)[1] != self.adapter.store.info(adapter_key)[1]:
                raise CheckpointError(
                    f"ADAPTER {str(self.adapter.directory)!r} saves {base_key!r} with shape "
                    f"{list(self.adapter.store.info(adapter_key)[1])} but BASE has "
                    f"{list(self.base.store.info(base_key)[1])}")
        for name, parts in self.adapter_keys.items():
            bias = self.base_keys[name][:-len("weight")] + "bias"
            if "lora_B.bias" in parts and bias not in self.base.store:
                raise CheckpointError(f"ADAPTER {str(self.adapter.directory)!r}: {name!r} has a "
                                      "lora_B bias but its base layer has no bias to merge into")

    def merged_tensor(self, key: str, new_factors: dict) -> torch.Tensor:
        """BASE's tensor ``key`` with the adapter merged in as PEFT merges it: replaced tensors
        take the adapter's values, LoRA weights get ``scale * B @ A`` (``new_factors`` where
        given, else the adapter's own) and LoRA biases ``scale * lora_B.bias``; added in float32
        (or float64) and stored in BASE's dtype, bit for bit as PEFT's merge_and_unload."""
        if self._merge_index is None:
            self._merge_index = {}
            for layer in self.layers:
                self._merge_index[self.base_keys[layer.name]] = ("weight", layer)
                if "lora_B.bias" in self.adapter_keys[layer.name]:
                    bias = self.base_keys[layer.name][:-len("weight")] + "bias"
                    self._merge_index[bias] = ("bias", layer)
        dtype = self.base.store.info(key)[0]
        source = self.replacements.get(key)
        t = self.adapter.store.read(source) if source else self.base.store.read(key)
        what, layer = self._merge_index.get(key, (None, None))
        if what is None:
            return t.to(dtype)
        work = torch.float64 if dtype == torch.float64 else torch.float32
        if what == "weight":
            B, A = new_factors.get(layer.name) or layer.factors()
            delta = layer.scale * (B.to(work) @ A.to(work))
            if layer.kind == "embedding":  # PEFT rounds an embedding's update to its dtype first
                delta = delta.to(dtype).to(work)
            merged = t.to(work) + to_stored(layer.kind, delta)
        else:
            bias = self.adapter.store.read(self.adapter_keys[layer.name]["lora_B.bias"])
            merged = t.to(work) + layer.scale * bias.to(work)
        return check_finite(layer.name, f"the merged {key}", merged.to(dtype))


def checkpoint_layers(func: str, base, tuned, modules=None, *, tuned_label: str = "TUNED",
                      side_files: bool = False) -> tuple[LayerSet, CheckpointAdapter | None]:
    """Layers from a base checkpoint and an adapter or fully fine-tuned checkpoint (local
    directories or Hub ids); also the :class:`CheckpointAdapter` when ``tuned`` is an adapter.
    ``side_files`` fetches BASE's tokenizer files too (for a merged output)."""
    base_model = ModelDirectory(resolve(str(base), "BASE", side_files=side_files), "BASE")
    tuned_dir = resolve(str(tuned), tuned_label)
    inputs = [("BASE", base_model.directory), (tuned_label, tuned_dir)]
    if is_adapter_dir(tuned_dir):
        adapter = CheckpointAdapter(base_model, AdapterDirectory(tuned_dir, tuned_label))
        layer_set = adapter.layer_set(func, modules)
    elif tuned_label == "TUNED" and is_model_dir(tuned_dir):
        adapter = None
        layer_set = checkpoint_pair_layers(func, base_model, ModelDirectory(tuned_dir, "TUNED"),
                                           modules)
    else:
        raise CheckpointError(
            f"{tuned_label} {str(tuned)!r} is not a PEFT adapter directory (no "
            "adapter_config.json)" + (" nor a model directory (no model weights)"
                                      if tuned_label == "TUNED" else ""))
    layer_set.inputs = inputs
    layer_set.model = str(base)
    return layer_set, adapter


def _prefix_rule(adapter_modules: list[str], base_weights: dict, where: str,
                 base_dir: str) -> Callable[[str], str]:
    """The one translation of adapter module paths to base module paths: the identity, adding
    one leading component, or removing one (models saved with and without a task head), chosen
    as the one that maps the most LoRA modules onto base weights (ties: the identity first)."""
    def candidates():
        yield lambda p: p
        heads = {k.split(".", 1)[0] for k in base_weights if "." in k}
        for head in sorted(heads):
            yield lambda p, h=head: f"{h}.{p}"
        adapter_heads = {p.split(".", 1)[0] for p in adapter_modules if "." in p}
        for head in sorted(adapter_heads):
            yield lambda p, h=head: p[len(h) + 1:] if p.startswith(h + ".") else p
    best, best_hits = None, -1
    for rule in candidates():
        hits = sum(rule(p) in base_weights for p in adapter_modules)
        if hits > best_hits:
            best, best_hits = rule, hits
    if best_hits == 0:
        raise CheckpointError(f"{where}: none of its LoRA modules (e.g. {adapter_modules[0]!r}) "
                              f"has a weight in BASE {base_dir!r}: not an adapter of this model")
    return best
