"""Compute backends: the seam between the model definition and the kernels that run it.

TorchBackend is the reference path: plain PyTorch, runs on CPU and GPU. A faster backend (our CUDA
extension) subclasses it and overrides the operations it accelerates; the model calls only these.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

try:  # torch >= 2.2
    from torch.nn.attention.bias import causal_lower_right
except ImportError:  # older torch: chunked prefill builds an explicit mask
    causal_lower_right = None  # type: ignore[assignment]

from .errors import GenerationError
from .exl2 import Exl2Tensors
from .rope import apply_rope

if TYPE_CHECKING:
    from .kv_quant import QuantKVCache

log = logging.getLogger(__name__)


@dataclass
class Linear:
    """One linear layer as loaded: dense weight and/or EXL2 tensors, plus an optional bias."""

    name: str
    in_features: int
    out_features: int
    weight: torch.Tensor | None = None  # (out, in), compute dtype
    bias: torch.Tensor | None = None
    exl2: Exl2Tensors | None = None
    bits_per_weight: float | None = None  # for EXL2 layers: stored bits / weights


class TorchBackend:
    """Pure-PyTorch kernels. EXL2 layers are dequantized once at load into dense weights."""

    name = "torch"
    _lower_right_ok = causal_lower_right is not None  # cleared if SDPA rejects the bias (then: a mask)

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self._gqa = "enable_gqa" in F.scaled_dot_product_attention.__doc__  # torch >= 2.5

    def prepare_linear(self, lin: Linear) -> Linear:
        if lin.exl2 is not None and lin.weight is None:
            lin.weight = lin.exl2.dequantize(lin.in_features, lin.out_features)
            if lin.exl2.bias is not None:
                lin.bias = lin.exl2.bias
            lin.exl2 = None
        assert lin.weight is not None
        lin.weight = lin.weight.to(device=self.device, dtype=self.dtype)
        if lin.bias is not None:
            lin.bias = lin.bias.to(device=self.device, dtype=self.dtype)
        return lin

    def dequantized_weight(self, lin: Linear) -> torch.Tensor:
        if lin.exl2 is not None:
            return lin.exl2.dequantize(lin.in_features, lin.out_features)
        assert lin.weight is not None
        return lin.weight.to(torch.float16)

    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        return F.linear(x, lin.weight, lin.bias)

    def linear_many(self, x: torch.Tensor, lins: tuple[Linear, ...]) -> list[torch.Tensor]:
        """Several linears of one input (q/k/v, gate/up); a backend may run them as one kernel."""
        return [self.linear(x, lin) for lin in lins]

    def reserve_group(self, lins: tuple[Linear, ...]) -> None:
        """Called at load for each group linear_many will see, so buffers are sized before any capture."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * weight.float()).to(x.dtype)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, RMSNorm(x + residual)): the block's residual add and the next norm."""
        x = x + residual
        return x, self.rms_norm(x, weight, eps)

    def mlp_act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, cos, sin)

    # --- decode at device-side positions (CUDA-graph safe: no position is read on the host) ------

    def rope_cache_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_table: torch.Tensor,
                          sin_table: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor) -> torch.Tensor:
        """q, k, v: (B, 1, heads, D) of one token per row at positions pos (int32, (B,)). Rotates q
        and k, writes k and v into the caches (B, S, Hkv, D) at pos, returns the rotated q."""
        idx = pos.long()
        cos = cos_table.index_select(0, idx)[:, None, None, :]
        sin = sin_table.index_select(0, idx)[:, None, None, :]
        half = q.shape[-1] // 2

        def rot(x: torch.Tensor) -> torch.Tensor:
            return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

        if k_cache.stride(0) == 0:  # rows of one sequence sharing its cache (graphs.SharedRows)
            k_cache[0][idx] = rot(k)[:, 0]
            v_cache[0][idx] = v[:, 0]
        else:
            rows = torch.arange(q.shape[0], device=q.device)
            k_cache[rows, idx] = rot(k)[:, 0]
            v_cache[rows, idx] = v[:, 0]
        return rot(q)

    fused_kv_quant = False  # whether kv_quant_decode runs without reading the position on the host

    def kv_quant_decode(self, cache: QuantKVCache, layer: int, pos: torch.Tensor, cos_table: torch.Tensor,
                        sin_table: torch.Tensor) -> None:
        """Decode step of a quantized cache, after rope_cache_decode wrote the token into
        cache.decode_target(layer): quantize it into place and fill the read-back buffers with the
        layer's positions [0, pos]. Here through QuantKVCache.update (reads pos on the host; all rows
        at one position); the CUDA backend does it on the device (csrc/kv_quant.cu)."""
        p = int(pos[0])
        if bool((pos != p).any()):
            raise GenerationError("a quantized cache decodes every row at one position",
                                  hint="Use an FP16 cache for rows at different positions.")
        kb, vb = cache.decode_target(layer)
        cache.update(layer, p, kb[:, p:p + 1].clone(), vb[:, p:p + 1].clone())

    def attention_cached(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """One query per row over keys [0, lengths[b]) of a static cache (the last `window` only
        with a sliding window): every key is scored and the rest masked, so shapes never change."""
        b, _, h, d = q.shape
        s, hkv = k_cache.shape[1], k_cache.shape[2]
        qg = q.reshape(b, hkv, h // hkv, d)
        scores = torch.matmul(qg, k_cache.permute(0, 2, 3, 1)).float() * (d ** -0.5)  # (B, Hkv, G, S)
        kpos = torch.arange(s, device=q.device)[None, :]
        n = lengths.long()[:, None]
        valid = kpos < n
        if window:
            valid &= kpos >= n - window
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v_cache.dtype)
        return torch.matmul(probs, v_cache.transpose(1, 2)).reshape(b, 1, h * d)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                  window: int | None = None) -> torch.Tensor:
        """q: (B, T, H, D); k, v: (B, S, Hkv, D) holding positions 0..S-1, where S = start + T.

        Query t sits at position start + t and attends to keys 0..start + t (only the last `window`
        of them with a sliding window).
        """
        b, t, h, d = q.shape
        s, hkv = k.shape[1], k.shape[2]
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        kwargs = {}
        if hkv != h:
            if self._gqa:
                kwargs["enable_gqa"] = True
            else:
                kh = kh.repeat_interleave(h // hkv, dim=1)
                vh = vh.repeat_interleave(h // hkv, dim=1)
        windowed = window is not None and s > window
        if t == 1:
            return self._decode_attention(q, k, v, window).reshape(b, 1, h * d)
        if start == 0 and s == t and not windowed:
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, **kwargs)
        elif not windowed and self._lower_right_ok:
            # a later prefill chunk: causal aligned to the last key, without a materialised t x s mask
            # (a mask that grows with every chunk leaves ever larger freed blocks in the allocator)
            try:
                out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(t, s), **kwargs)
            except RuntimeError as e:
                log.info("lower-right causal bias unsupported here (%s); using an explicit mask", e)
                type(self)._lower_right_ok = False
                return self.attention(q, k, v, start, window)
        else:
            qpos = torch.arange(t, device=q.device)[:, None] + start
            kpos = torch.arange(s, device=q.device)[None, :]
            mask = qpos >= kpos
            if windowed:
                mask &= kpos > qpos - window
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, **kwargs)
        return out.transpose(1, 2).reshape(b, t, h * d)

    @staticmethod
    def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
        """One query token: plain matmuls, grouped by KV head (no KV copy for GQA).

        SDPA's dispatcher picks cuDNN for this shape on Hopper, whose per-call planning cost
        (~2 ms of CPU) dwarfed the whole decode step; two small matmuls cost microseconds.
        """
        b, _, h, d = q.shape
        s, hkv = k.shape[1], k.shape[2]
        if window is not None and s > window:
            k, v = k[:, s - window:], v[:, s - window:]
        qg = q.reshape(b, hkv, h // hkv, d)  # (B, Hkv, G, D)
        kt = k.permute(0, 2, 3, 1)  # (B, Hkv, D, S)
        scores = torch.matmul(qg, kt).float() * (d ** -0.5)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        return torch.matmul(probs, v.transpose(1, 2))  # (B, Hkv, G, D)
