"""Rotary position embeddings: inverse frequencies for every scaling type the engine supports.

Types follow config.json's rope_scaling: default, linear, dynamic (NTK), llama3, yarn. The output is
(inv_freq, attention_factor); cos/sin tables are built from them for the positions in use. The
rotation is the "rotate half" convention of Hugging Face Llama checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_freq_for(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                 max_position_embeddings: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq of shape (head_dim/2,), attention factor applied to cos and sin)."""
    base = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default" or scaling is None:
        return 1.0 / (theta ** base), 1.0
    factor = float(scaling.get("factor") or 1.0)
    if kind == "linear":
        return 1.0 / (theta ** base) / factor, 1.0
    if kind == "dynamic":
        # Like transformers: the length trained on is max_position_embeddings (an
        # original_max_position_embeddings inside rope_scaling is not used by this type).
        orig = max_position_embeddings
        length = max(seq_len or orig, orig)
        if length > orig:
            theta = theta * ((factor * length / orig) - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / (theta ** base), 1.0
    if kind == "llama3":
        inv = 1.0 / (theta ** base)
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        orig = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        low_wavelen, high_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = int(scaling.get("original_max_position_embeddings") or max_position_embeddings)
        if scaling.get("factor") is None:  # DeepSeek-style configs give only the two lengths
            factor = max_position_embeddings / orig
        beta_fast = float(scaling.get("beta_fast") or 32.0)
        beta_slow = float(scaling.get("beta_slow") or 1.0)
        mscale = scaling.get("mscale")
        mscale_all = scaling.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if "attention_factor" in scaling and scaling["attention_factor"] is not None:
            attn = float(scaling["attention_factor"])
        elif mscale and mscale_all:
            attn = get_mscale(factor, float(mscale)) / get_mscale(factor, float(mscale_all))
        else:
            attn = get_mscale(factor)

        def correction_dim(rot: float) -> float:
            return (head_dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low = math.floor(correction_dim(beta_fast))
        high = math.ceil(correction_dim(beta_slow))
        if scaling.get("truncate", True) is False:
            low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        pos_freqs = theta ** base
        inv_extra = 1.0 / pos_freqs
        inv_inter = 1.0 / (factor * pos_freqs)
        ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        extra_factor = 1 - ramp
        return inv_inter * (1 - extra_factor) + inv_extra * extra_factor, attn
    raise ValueError(f"unknown rope type {kind}")


def rope_tables(inv_freq: torch.Tensor, attention_factor: float, length: int,
                device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (length, head_dim) for positions 0..length-1."""
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    emb = torch.cat([freqs, freqs], dim=-1)
    return ((emb.cos() * attention_factor).to(device=device, dtype=dtype),
            (emb.sin() * attention_factor).to(device=device, dtype=dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return x * c + rotated * s


def alpha_theta(theta: float, head_dim: int, alpha: float | None) -> float:
    """NTK-aware alpha (exllamav2's scale_alpha_value): theta * alpha ** (d / (d - 2))."""
    if not alpha or alpha == 1.0:
        return theta
    return theta * alpha ** (head_dim / (head_dim - 2))


def inv_freq_with_overrides(head_dim: int, theta: float, scaling: dict[str, Any] | None,
                            max_position_embeddings: int, seq_len: int | None = None,
                            scale: float | None = None, alpha: float | None = None) -> tuple[torch.Tensor, float]:
    """inv_freq_for plus the user's load-time overrides, on top of whatever the config asks for.

    alpha raises the base (NTK-aware, no fine-tuning needed); scale is linear position
    interpolation (positions / scale, i.e. inv_freq / scale), as exllamav2's scale_pos_emb.
    """
    inv, attn = inv_freq_for(head_dim, alpha_theta(theta, head_dim, alpha), scaling, max_position_embeddings,
                             seq_len)
    if scale and scale != 1.0:
        inv = inv / scale
    return inv, attn
