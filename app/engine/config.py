"""Model configuration: config.json parsed into one dataclass, plus a table of per-architecture traits.

The engine has one transformer definition; what differs between Llama, Mistral, Qwen2 and Qwen3 is
data in ARCHITECTURES, not code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchTraits:
    """What one architecture family changes in the shared Llama-style block."""

    name: str
    qkv_bias: bool = False      # Qwen2 adds a bias to q/k/v projections
    qk_norm: bool = False       # Qwen3 applies RMSNorm per head to q and k before RoPE
    default_tie_embeddings: bool = False


ARCHITECTURES: dict[str, ArchTraits] = {
    "LlamaForCausalLM": ArchTraits("llama"),
    "MistralForCausalLM": ArchTraits("mistral"),
    "Qwen2ForCausalLM": ArchTraits("qwen2", qkv_bias=True),
    "Qwen3ForCausalLM": ArchTraits("qwen3", qk_norm=True),
}

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclass(frozen=True)
class QuantInfo:
    """EXL2 quantization facts from config.json's quantization_config."""

    bits: float
    head_bits: int
    method: str = "exl2"


@dataclass(frozen=True)
class ModelConfig:
    arch: ArchTraits
    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float16"
    quant: QuantInfo | None = None
    sliding_window: int | None = None  # Mistral v0.1: each query sees only the last N keys
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def qkv_bias(self) -> bool:
        return self.arch.qkv_bias or self.attention_bias

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_folder(cls, folder: str) -> ModelConfig:
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(
                "no config.json here", path=folder,
                hint="Choose the model's folder (the one holding config.json and *.safetensors).",
            )
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot be read as JSON ({e})", path=path,
                              hint="Re-download the model; the file is damaged.") from e
        return cls.from_dict(raw, path=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: str = "config.json") -> ModelConfig:
        if not isinstance(raw, dict):
            raise ConfigError("is not a JSON object", path=path)
        archs = raw.get("architectures") or []
        name = archs[0] if isinstance(archs, list) and archs else None
        if name not in ARCHITECTURES:
            supported = ", ".join(sorted(ARCHITECTURES))
            raise UnsupportedArchitectureError(
                f"architecture {name!r} is not supported", path=path,
                hint=f"Kestrel runs {supported}.",
            )
        traits = ARCHITECTURES[name]

        def need(key: str, kind: type = int) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"required field {key!r} is missing", path=path,
                                  hint="The model folder is incomplete; re-download config.json.")
            value = raw[key]
            if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"field {key!r} must be a positive integer, not {value!r}", path=path)
            return value

        hidden = need("hidden_size")
        heads = need("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or hidden // heads
        if not isinstance(kv_heads, int) or heads % kv_heads:
            raise ConfigError(f"num_key_value_heads={kv_heads!r} does not divide num_attention_heads={heads}",
                              path=path)
        rope_scaling, rope_theta = _rope_settings(raw, path)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        quant = None
        qc = raw.get("quantization_config")
        if isinstance(qc, dict) and qc.get("quant_method") == "exl2":
            quant = QuantInfo(bits=float(qc.get("bits", 0.0)), head_bits=int(qc.get("head_bits", 16)))
        return cls(
            arch=traits,
            architecture=name,
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=need("vocab_size"),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", traits.default_tie_embeddings)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_token_id=raw.get("bos_token_id") if isinstance(raw.get("bos_token_id"), int) else None,
            eos_token_ids=eos_ids,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float16"),
            quant=quant,
            sliding_window=_sliding_window(raw, traits),
            raw=raw,
        )


def _rope_settings(raw: dict[str, Any], path: str) -> tuple[dict[str, Any] | None, float]:
    """(rope scaling dict or None for plain RoPE, rope_theta) from either config.json layout.

    transformers < 5 writes `rope_theta` and `rope_scaling` at the top level; transformers >= 5 writes
    one `rope_parameters` object holding both (and the theta inside it wins, as in transformers).
    """
    scaling = raw.get("rope_scaling")
    field_name = "rope_scaling"
    if scaling is None and raw.get("rope_parameters") is not None:
        scaling, field_name = raw["rope_parameters"], "rope_parameters"
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"{field_name} must be an object or null", path=path)
    scaling = dict(scaling or {})
    if any(isinstance(v, dict) for v in scaling.values()):
        raise ConfigError(f"{field_name} holds per-layer-type RoPE settings, which Kestrel does not run",
                          path=path, hint="Kestrel runs models with one RoPE setting for all layers.")
    theta = scaling.get("rope_theta", raw.get("rope_theta"))
    theta = 10000.0 if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise ConfigError(f"rope_theta must be a positive number, not {theta!r}", path=path)
    partial = scaling.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={partial!r} is not supported (RoPE on part of each head)",
                          path=path, hint="Kestrel runs models that rotate the whole head.")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{field_name} type {kind!r} is not supported", path=path,
                          hint=f"Supported: {', '.join(ROPE_TYPES)}.")
    if kind == "default":
        return None, float(theta)
    return {**scaling, "rope_type": kind}, float(theta)


def _sliding_window(raw: dict[str, Any], traits: ArchTraits) -> int | None:
    """Mistral applies its window unless told otherwise; Qwen2 only with use_sliding_window."""
    window = raw.get("sliding_window")
    use = raw.get("use_sliding_window", traits.name == "mistral")
    if use and isinstance(window, int) and not isinstance(window, bool) and window > 0:
        return window
    return None
