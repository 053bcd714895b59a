"""LoRA adapters (PEFT format) applied at run time beside the base weights, never merged into them.

    y = x W^T + sum_i s_i * (x A_i^T) B_i^T,   s_i = scale_i * alpha / r   (alpha / sqrt(r) with rsLoRA)

An adapter folder holds adapter_config.json and adapter_model.safetensors (never a pickle). Loaded
adapters live in a LoraRegistry beside the model; a request picks a set {name: scale}. `activate`
fuses the chosen set into one (A_cat, B_cat) pair per targeted linear, the per-adapter factors
stacked along the rank and the scales folded into B, so any number of adapters costs two small
matmuls per linear (Transformer._linear). The base weight (fp16 or packed EXL2) is not touched, so
the same weights serve every request whatever its adapters.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .errors import GenerationError, ModelFormatError
from .model import ATTN_PROJ, MLP_PROJ, Transformer
from .safetensors_io import TensorStore

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TARGETS: dict[str, str] = {**{n: "self_attn" for n in ATTN_PROJ}, **{n: "mlp" for n in MLP_PROJ}}
ALL_LINEAR = "all-linear"
# base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight (".default" when saved unstripped)
TENSOR_NAME = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.(\d+)\.(\w+)\.(\w+))\.lora_([AB])"
                         r"(?:\.default)?\.weight$")
REFUSED_OPTIONS = {"use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers"}
_uids = itertools.count(1)

Fused = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module name -> (A_cat (R, in), B_cat (out, R))


class LoraError(ModelFormatError):
    """An adapter folder is unreadable or does not fit the loaded model."""


@dataclass
class LoraAdapter:
    """One loaded adapter: per module, A (r, in), B (out, r) and the adapter's own scale s."""

    name: str
    path: str
    rank: int
    alpha: float
    rslora: bool
    targets: tuple[str, ...]
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(repr=False)
    uid: int = field(default_factory=lambda: next(_uids))


@dataclass(frozen=True)
class LoraInfo:
    """What callers (CLI, GUI, server) see of a loaded adapter."""

    name: str
    path: str
    rank: int
    alpha: float
    rslora: bool
    targets: tuple[str, ...]
    modules: int


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name ending in it (as a regex)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isdir(folder):
        raise LoraError("is not a folder", path=folder, hint="Pick the adapter's folder (it holds adapter_config.json).")
    if not os.path.isfile(path):
        hint = "Pick the adapter's folder (it holds adapter_config.json)."
        if os.path.isfile(os.path.join(folder, "config.json")):
            hint = "This is a model folder, not a LoRA adapter. " + hint
        raise LoraError(f"no {CONFIG_FILE} here", path=folder, hint=hint)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(f"cannot be read as JSON ({e})", path=path, hint="The adapter is damaged; download it again.") from e
    if not isinstance(cfg, dict):
        raise LoraError("is not a JSON object", path=path, hint="The adapter is damaged; download it again.")
    return cfg


def _check_config(cfg: dict, folder: str) -> tuple[int, float, bool, tuple[str, ...]]:
    path = os.path.join(folder, CONFIG_FILE)
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise LoraError(f"is a {kind} adapter; only LoRA adapters are supported", path=path)
    for option, what in REFUSED_OPTIONS.items():
        if cfg.get(option):
            raise LoraError(f"uses {what} ({option}: true), which Kestrel does not support", path=path)
    if cfg.get("bias", "none") not in ("none", None):
        raise LoraError(f"trains biases (bias: {cfg['bias']!r}); only bias \"none\" is supported", path=path)
    if cfg.get("modules_to_save"):
        raise LoraError(f"replaces whole modules ({cfg['modules_to_save']}); Kestrel applies only LoRA "
                        "factors", path=path, hint="Merge the adapter into the model with PEFT instead.")
    try:
        rank = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", rank))
    except (TypeError, ValueError) as e:
        raise LoraError(f"r / lora_alpha are not numbers ({e})", path=path) from e
    if rank <= 0 or not math.isfinite(alpha):
        raise LoraError(f"has r={rank}, lora_alpha={alpha}; r must be positive", path=path)
    raw = cfg.get("target_modules") or []
    if raw == ALL_LINEAR:
        targets = tuple(TARGETS)
    elif isinstance(raw, str):  # a regex over module names: the tensors say which ones it hit
        targets = ()
    else:
        targets = tuple(str(t) for t in raw)
        unknown = [t for t in targets if t not in TARGETS]
        if unknown:
            raise LoraError(f"targets {unknown}, which this model does not have (LoRA applies to "
                            f"{', '.join(TARGETS)})", path=path,
                            hint="The adapter was made for another architecture.")
    return rank, alpha, bool(cfg.get("use_rslora", False)), targets


def load_adapter(folder: str, model: Transformer, name: str | None = None) -> LoraAdapter:
    """Read and check one PEFT adapter against `model`; tensors go to the model's device and dtype."""
    folder = os.path.abspath(folder)
    cfg = read_config(folder)
    rank, alpha, rslora, targets = _check_config(cfg, folder)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        found = [n for n in ("adapter_model.bin", "adapter_model.pt") if os.path.isfile(os.path.join(folder, n))]
        hint = (f"It has only {found[0]}, a pickle Kestrel will not open; convert it to safetensors "
                "(PEFT: save_pretrained(..., safe_serialization=True)).") if found else \
            "The adapter folder is incomplete; download it again."
        raise LoraError(f"{WEIGHTS_FILE} is missing", path=folder, hint=hint)
    store = TensorStore(folder)
    c = model.config
    linears = model.linears()
    pairs: dict[str, dict[str, str]] = {}
    for tensor in store.names():
        m = TENSOR_NAME.match(tensor)
        if m is None:
            raise LoraError(f"holds tensor {tensor!r}, which is not a LoRA factor of "
                            f"{', '.join(TARGETS)}", path=weights,
                            hint="The adapter was made for another architecture or trains other modules.")
        module, layer, parent, proj, which = m.groups()
        if TARGETS.get(proj) != parent:
            raise LoraError(f"targets {parent}.{proj}, which this model does not have", path=weights,
                            hint="The adapter was made for another architecture.")
        if int(layer) >= c.num_layers:
            raise LoraError(f"targets layer {layer}, the model has {c.num_layers} layers", path=weights,
                            hint="The adapter was made for another (bigger) base model.")
        pairs.setdefault(module, {})[which] = tensor
    if not pairs:
        raise LoraError("holds no LoRA tensors", path=weights, hint="The adapter is damaged; download it again.")
    hit = {module.rsplit(".", 1)[1] for module in pairs}
    missing = [t for t in targets if t not in hit]
    if missing:
        raise LoraError(f"adapter_config.json targets {missing} but the weights hold no tensors for them",
                        path=weights, hint="The adapter is incomplete; download it again.")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    try:
        for module, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                lacking = "lora_B" if "A" in ab else "lora_A"
                raise LoraError(f"{module}: {lacking} is missing", path=weights,
                                hint="The adapter is incomplete; download it again.")
            lin = linears[module]
            a, b = store.get(ab["A"]), store.get(ab["B"])
            r = a.shape[0]
            if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r or a.shape[1] != lin.in_features \
                    or b.shape[0] != lin.out_features:
                raise LoraError(
                    f"{module}: lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit the model's "
                    f"{lin.in_features} -> {lin.out_features} layer (hidden size {c.hidden_size})",
                    path=weights, hint="The adapter was made for another base model; pick one made for "
                                       f"{os.path.basename(os.path.normpath(model.path)) or 'this model'}.")
            r_m = int(_pattern_value(cfg.get("rank_pattern") or {}, module, rank))
            a_m = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha))
            if r_m != r:
                raise LoraError(f"{module}: lora_A has rank {r}, adapter_config.json says {r_m}", path=weights)
            modules[module] = (a.to(model.device, model.dtype), b.to(model.device, model.dtype),
                               lora_scale(a_m, r, rslora))
    finally:
        store.close()
    name = name or os.path.basename(os.path.normpath(folder))
    return LoraAdapter(name, folder, rank, alpha, rslora, targets or tuple(sorted(hit)), modules)


def fuse(chosen: list[tuple[LoraAdapter, float]]) -> Fused:
    """One (A_cat, B_cat) per module: ranks stacked, each adapter's s_i * scale_i folded into B."""
    parts: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for adapter, scale in chosen:
        for module, (a, b, s) in adapter.modules.items():
            a_list, b_list = parts.setdefault(module, ([], []))
            a_list.append(a)
            b_list.append(b * (s * scale))
    return {m: (torch.cat(a_list, 0).contiguous(), torch.cat(b_list, 1).contiguous())
            for m, (a_list, b_list) in parts.items()}


class LoraRegistry:
    """The adapters loaded beside one model, and which of them the model applies right now."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.adapters: dict[str, LoraAdapter] = {}
        self._fused_key: tuple = ()

    def load(self, path: str, name: str | None = None) -> LoraInfo:
        adapter = load_adapter(path, self.model, name)
        if adapter.name in self.adapters:
            raise GenerationError(f"an adapter named {adapter.name!r} is already loaded "
                                  f"(from {self.adapters[adapter.name].path})",
                                  hint="Unload it first, or load this one under another name.")
        self.adapters[adapter.name] = adapter
        return info(adapter)

    def unload(self, name: str) -> bool:
        return self.adapters.pop(name, None) is not None

    def infos(self) -> list[LoraInfo]:
        return [info(a) for a in self.adapters.values()]

    def key(self, selection: dict[str, float]) -> tuple:
        """Identifies the weights a selection computes with (scale-0 entries change nothing)."""
        chosen = []
        for name, scale in sorted(selection.items()):
            adapter = self.adapters.get(name)
            if adapter is None:
                have = ", ".join(sorted(self.adapters)) or "none"
                raise GenerationError(f"no LoRA adapter named {name!r} is loaded (loaded: {have})",
                                      hint="Load the adapter first.")
            try:
                value = float(scale)
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise GenerationError(f"LoRA scale for {name!r} must be a finite number, not {scale!r}")
            if value != 0.0:
                chosen.append((name, value, adapter.uid))
        return tuple(chosen)

    def activate(self, selection: dict[str, float]) -> tuple:
        """Make the model apply `selection`; returns its key (the prompt cache is keyed by it)."""
        key = self.key(selection)
        if key != self._fused_key or (key and not self.model.lora):
            self.model.lora = fuse([(self.adapters[n], s) for n, s, _uid in key]) if key else {}
            self._fused_key = key
        return key

    def clear(self) -> None:
        self.adapters.clear()
        self.model.lora = {}
        self._fused_key = ()


def info(adapter: LoraAdapter) -> LoraInfo:
    return LoraInfo(adapter.name, adapter.path, adapter.rank, adapter.alpha, adapter.rslora, adapter.targets,
                    len(adapter.modules))
