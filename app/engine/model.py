"""The one transformer definition (Llama family); per-architecture differences come from ArchTraits.

Llama 1/2/3.x, Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) share this block:
  x += o_proj(attention(rope(q), rope(k), v))  with pre-norm RMSNorm
  x += down_proj(silu(gate_proj(h)) * up_proj(h))
Weights come from a loader (fp16/bf16 HF folder or EXL2); kernels come from a backend.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .backend import Linear, TorchBackend
from .cache import KVCache
from .config import ModelConfig
from .errors import ModelFormatError
from .rope import inv_freq_with_overrides, rope_tables

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
        self._lora_by_thread = threading.local()
        for layer in layers:  # the groups _attn_qkv and _mlp hand to backend.linear_many
            backend.reserve_group((layer.q_proj, layer.k_proj, layer.v_proj))
            backend.reserve_group((layer.gate_proj, layer.up_proj))

    @property
    def lora(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Active LoRA deltas by module name: (A_cat (R, in), B_cat (out, R)), scales folded into B.

        Set by app.engine.lora.LoraRegistry.activate; empty means the base model, at no cost. Kept per
        thread: the Generator's requests pick adapters while the batching scheduler's thread, sharing
        the same weights, runs the base model."""
        return getattr(self._lora_by_thread, "deltas", {})

    @lora.setter
    def lora(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._lora_by_thread.deltas = deltas

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

    def _linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        """Every linear of the model goes through here: the backend's kernel for the base weight
        (fp16 or packed EXL2, never modified), then the active LoRA delta as two small matmuls."""
        return self._with_lora(x, lin, self.backend.linear(x, lin))

    def _linears(self, x: torch.Tensor, lins: tuple[Linear, ...]) -> list[torch.Tensor]:
        """Linears of one input (q/k/v, gate/up): one backend call, then each one's LoRA delta."""
        return [self._with_lora(x, lin, y) for lin, y in zip(lins, self.backend.linear_many(x, lins), strict=True)]

    def _with_lora(self, x: torch.Tensor, lin: Linear, y: torch.Tensor) -> torch.Tensor:
        if self.lora:
            delta = self.lora.get(lin.name)
            if delta is not None:
                a, b = delta
                y = y + F.linear(F.linear(x.to(a.dtype), a), b).to(y.dtype)
        return y

    def _attn_qkv(self, layer: Layer, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c = self.config
        b, t = h.shape[0], h.shape[1]
        q, k, v = self._linears(h, (layer.q_proj, layer.k_proj, layer.v_proj))
        q = q.view(b, t, c.num_heads, c.head_dim)
        k = k.view(b, t, c.num_kv_heads, c.head_dim)
        v = v.view(b, t, c.num_kv_heads, c.head_dim)
        if layer.q_norm is not None:
            q = self.backend.rms_norm(q, layer.q_norm, c.rms_norm_eps)
            k = self.backend.rms_norm(k, layer.k_norm, c.rms_norm_eps)
        return q, k, v

    def _mlp(self, layer: Layer, h: torch.Tensor) -> torch.Tensor:
        gate, up = self._linears(h, (layer.gate_proj, layer.up_proj))
        act = self.backend.mlp_act(gate, up)
        return self._linear(act, layer.down_proj)

    def _next_norm(self, i: int) -> torch.Tensor:
        return self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.norm

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache: KVCache | None = None, start: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """ids (B, T) -> float32 logits (B, T or 1, vocab). With a cache, positions start at `start`."""
        c, be = self.config, self.backend
        t = ids.shape[1]
        x = self.embed[ids.to(self.embed.device)].to(self.dtype)
        cos, sin = self._rope(start, t)
        h = be.rms_norm(x, self.layers[0].input_norm, c.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            q, k, v = self._attn_qkv(layer, h)
            q, k = be.rope(q, cos, sin), be.rope(k, cos, sin)
            if cache is not None:
                k, v = cache.update(i, start, k, v)
            x, h = be.add_rms_norm(x, self._linear(be.attention(q, k, v, start, c.sliding_window), layer.o_proj),
                                   layer.post_norm, c.rms_norm_eps)
            x, h = be.add_rms_norm(x, self._mlp(layer, h), self._next_norm(i), c.rms_norm_eps)
        if cache is not None:
            cache.length = start + t
        if last_only:
            h = h[:, -1:]
        return self._linear(h, self.head).float()

    # --- decode at device-side positions -------------------------------------------------------

    def prepare_decode(self, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables covering the whole cache, built before a decode step is captured."""
        self._rope(0, max_seq_len)
        assert self._cos is not None and self._sin is not None
        return self._cos, self._sin

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One token per row (tokens (B, 1) int64) at positions pos (int32 (B,), on the device):
        float32 logits (B, vocab). No position is read on the host, so the step can be captured in
        a CUDA graph once and replayed at every position (app/engine/graphs.py). Needs
        prepare_decode(cache.max_seq_len) first, and a quantized cache decode_ready(pos); does not
        touch cache.length (nor, where the backend's kernel ran, a quantized cache's ring bookkeeping:
        cache.decoded(pos) does)."""
        c, be = self.config, self.backend
        b = tokens.shape[0]
        cos, sin = self._cos, self._sin
        assert cos is not None and sin is not None and self._rope_len >= cache.max_seq_len
        lengths = pos + 1
        x = self.embed[tokens.view(-1)].view(b, 1, -1).to(self.dtype)
        h = be.rms_norm(x, self.layers[0].input_norm, c.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            q, k, v = self._attn_qkv(layer, h)
            kc, vc = cache.decode_target(i)
            q = be.rope_cache_decode(q, k, v, cos, sin, pos, kc, vc)
            if cache.mode != "fp16":  # quantize the new token, read the layer back around it into kc/vc
                be.kv_quant_decode(cache, i, pos, cos, sin)
            attn = be.attention_cached(q, kc, vc, lengths, c.sliding_window)
            x, h = be.add_rms_norm(x, self._linear(attn, layer.o_proj), layer.post_norm, c.rms_norm_eps)
            x, h = be.add_rms_norm(x, self._mlp(layer, h), self._next_norm(i), c.rms_norm_eps)
        return self._linear(h, self.head).float().view(b, -1)

    def allocate_cache(self, max_seq_len: int, batch: int = 1, mode: str = "fp16") -> KVCache:
        self.set_rope_length(max_seq_len)
        return KVCache.allocate(self.config, max_seq_len, self.device, self.dtype, batch, mode, rope=self._rope)
