"""The one transformer definition (Llama family); per-architecture differences come from ArchTraits.

Llama 1/2/3.x, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) share this block:
  x += o_proj(attention(rope(q), rope(k), v))  with pre-norm RMSNorm
  x += down_proj(silu(gate_proj(h)) * up_proj(h))
Weights come from a loader (fp16/bf16 HF folder or EXL2); kernels come from a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import Linear, TorchBackend
from .cache import KVCache
from .config import ModelConfig
from .errors import ModelFormatError
from .rope import apply_rope, inv_freq_with_overrides, rope_tables

ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


class Transformer:
    """A loaded model: weights on one device plus the backend that runs them."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[Layer], norm: torch.Tensor,
                 head: Linear, backend: TorchBackend, path: str = "") -> None:
        self.config = config
        self.embed = embed
        self.layers = layers
        self.norm = norm
        self.head = head
        self.backend = backend
        self.path = path
        self.device = backend.device
        self.dtype = backend.dtype
        self.rope_scale: float | None = None  # user overrides at load (see set_rope_overrides)
        self.rope_alpha: float | None = None
        self._rope_seq_len: int | None = None
        self._inv_freq, self._attn_factor = inv_freq_with_overrides(
            config.head_dim, config.rope_theta, config.rope_scaling, config.max_position_embeddings)
        self._cos = self._sin = None
        self._rope_len = 0

    # --- introspection -------------------------------------------------------------------------

    def linears(self) -> dict[str, Linear]:
        out: dict[str, Linear] = {}
        for i, layer in enumerate(self.layers):
            for name in ATTN_PROJ:
                out[f"model.layers.{i}.self_attn.{name}"] = getattr(layer, name)
            for name in MLP_PROJ:
                out[f"model.layers.{i}.mlp.{name}"] = getattr(layer, name)
        out["lm_head"] = self.head
        return out

    def dequantized_weight(self, module_name: str) -> torch.Tensor:
        """The fp16 weight (out_features, in_features) of one linear layer, on the CPU."""
        lin = self.linears().get(module_name.removesuffix(".weight"))
        if lin is None:
            raise ModelFormatError(f"no linear layer named {module_name!r}", path=self.path)
        return self.backend.dequantized_weight(lin).to("cpu")

    @property
    def is_quantized(self) -> bool:
        return self.config.quant is not None

    def parameter_count(self) -> int:
        c = self.config
        per_layer = sum(lin.in_features * lin.out_features for lin in (
            self.layers[0].q_proj, self.layers[0].k_proj, self.layers[0].v_proj, self.layers[0].o_proj,
            self.layers[0].gate_proj, self.layers[0].up_proj, self.layers[0].down_proj))
        head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
        return c.vocab_size * c.hidden_size + c.num_layers * (per_layer + 2 * c.hidden_size) + head + c.hidden_size

    # --- forward -------------------------------------------------------------------------------

    def _rope(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if end > self._rope_len:
            size = max(end, 2 * self._rope_len, 256)
            self._cos, self._sin = rope_tables(self._inv_freq, self._attn_factor, size, self.device, self.dtype)
            self._rope_len = size
        return self._cos[start:end], self._sin[start:end]

    def set_rope_length(self, seq_len: int) -> None:
        """Dynamic NTK scaling depends on the context size the cache is built for."""
        scaling = self.config.rope_scaling
        if scaling and scaling.get("rope_type") == "dynamic":
            self._rope_seq_len = seq_len
            self._recompute_rope()

    def set_rope_overrides(self, scale: float | None = None, alpha: float | None = None) -> None:
        """User overrides at load: linear scale (positions / scale) and NTK alpha (base raised)."""
        self.rope_scale, self.rope_alpha = scale, alpha
        self._recompute_rope()

    def _recompute_rope(self) -> None:
        c = self.config
        self._inv_freq, self._attn_factor = inv_freq_with_overrides(
            c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings, self._rope_seq_len,
            self.rope_scale, self.rope_alpha)
        self._rope_len = 0

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """ids (B, T) -> float32 logits (B, T or 1, vocab). With a cache, positions start at `start`."""
        c, be = self.config, self.backend
        b, t = ids.shape
        x = self.embed[ids.to(self.embed.device)].to(self.dtype)
        cos, sin = self._rope(start, t)
        for i, layer in enumerate(self.layers):
            h = be.rms_norm(x, layer.input_norm, c.rms_norm_eps)
            q = be.linear(h, layer.q_proj).view(b, t, c.num_heads, c.head_dim)
            k = be.linear(h, layer.k_proj).view(b, t, c.num_kv_heads, c.head_dim)
            v = be.linear(h, layer.v_proj).view(b, t, c.num_kv_heads, c.head_dim)
            if layer.q_norm is not None:
                q = be.rms_norm(q, layer.q_norm, c.rms_norm_eps)
                k = be.rms_norm(k, layer.k_norm, c.rms_norm_eps)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update(i, start, k, v)
            x = x + be.linear(be.attention(q, k, v, start, c.sliding_window), layer.o_proj)
            h = be.rms_norm(x, layer.post_norm, c.rms_norm_eps)
            x = x + be.linear(be.mlp_act(be.linear(h, layer.gate_proj), be.linear(h, layer.up_proj)),
                              layer.down_proj)
        if cache is not None:
            cache.length = start + t
        if last_only:
            x = x[:, -1:]
        x = be.rms_norm(x, self.norm, c.rms_norm_eps)
        return be.linear(x, self.head).float()

    def allocate_cache(self, max_seq_len: int, batch: int = 1, mode: str = "fp16") -> KVCache:
        self.set_rope_length(max_seq_len)
        return KVCache.allocate(self.config, max_seq_len, self.device, self.dtype, batch, mode, rope=self._rope)
