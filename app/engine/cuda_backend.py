"""The CUDA backend: our own kernels (app/engine/csrc) behind the TorchBackend seam.

EXL2 layers stay packed on the GPU. prepare_linear re-lays them out once (see PackedExl2): the
on-disk q_weight with columns padded to a multiple of 8 plus 8 zero rows, the on-disk 4-bit scale
codes, fp16(q_scale_max/256) per group and a table of 32-row tiles. Decode (1..32 rows of x) uses the
gemv kernel, which reads every weight byte once; longer inputs dequantize into an fp16 temp buffer
(bit-exact with Exl2Tensors.dequantize) and run cuBLAS. Dense layers keep an fp16 weight.

With KESTREL_GEMV_EXACT=0 (read once, at import) one row of x (batch-1 decode) goes to the half2
gemv (csrc/exl2_gemv_half2.cu): codes decoded two per instruction and dotted with x in fp16
arithmetic, 8 products per partial sum, group scales and the sum over tiles in fp32; relative error
about 1e-3 of the output instead of fp32 rounding. It is opt-in until it has run on a GPU; by
default, and always for 2..32 rows, the exact fp32 kernel runs.

One workspace per backend (partial sums in 64-bit fixed point, so a product is the same on every run
whatever order its K-split blocks finish in, + per-column-strip counters) is shared by all layers:
kernels on one CUDA stream run one after another, so the model must run on a single stream.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from ._ext_build import load_extension
from .backend import Linear, TorchBackend
from .exl2 import Exl2Tensors

if TYPE_CHECKING:
    from .kv_quant import QuantKVCache

log = logging.getLogger(__name__)

GEMV_ROWS = 8            # rows of x per gemv launch (the kernel is instantiated for 1..8)
GEMV_MAX_ROWS = 32       # above this, dequantize + cuBLAS is faster than re-reading the weights
GEMV_THREADS = 64        # must match exl2_kernels.cuh
COLS_PER_BLOCK = GEMV_THREADS * 4
TILE_ROWS = 32
DEQUANT_TEMP_ELEMS = 32 * 1024 * 1024  # fp16 temp buffer cap for the prefill path (64 MiB)
# Batch-1 decode uses the exact fp32 gemv unless KESTREL_GEMV_EXACT=0 opts in to the half2 one: the
# half2 kernel compiles and passes its CPU checks but has not yet been run on a GPU (docs/MEASUREMENTS.md).
GEMV_EXACT = os.environ.get("KESTREL_GEMV_EXACT", "1") != "0"


def extension_status() -> tuple[bool, str]:
    """(usable, one sentence on why not / how it was found)."""
    mod, why = load_extension()
    return mod is not None, why


def _ext() -> ModuleType:
    mod, why = load_extension()
    if mod is None:
        raise RuntimeError(f"the CUDA extension is not available: {why}")
    return mod


@dataclass
class PackedExl2:
    """One EXL2 layer in the layout the kernels read (see csrc/exl2_kernels.cuh)."""

    qweight: torch.Tensor      # int32 (qrows + 8, Np)
    qscale: torch.Tensor       # int32 (G, Np/8)
    step: torch.Tensor         # float32 (G,)
    tiles: torch.Tensor        # int32 (T, 2): first q_weight row, bits | group << 8
    perm: torch.Tensor         # int32 (K,), empty when the act order is the identity
    perm_long: torch.Tensor | None
    invperm: torch.Tensor | None  # int64 (K,), None for identity
    in_features: int
    out_features: int

    @property
    def padded_out(self) -> int:
        return self.qweight.shape[1]


def tile_table(t: Exl2Tensors, in_features: int) -> list[tuple[int, int]] | None:
    """[(first q_weight row, bits | group << 8)] per 32-row tile; None if a group is not whole tiles."""
    groups = t.groups(in_features)
    out = []
    for gi, (bits, _row, rows, qrow) in enumerate(groups):
        if gi + 1 < len(groups) and rows % TILE_ROWS:
            return None
        for j in range(-(-rows // TILE_ROWS)):
            out.append((qrow + j * bits, bits | (gi << 8)))
    return out


def pack_exl2(t: Exl2Tensors, in_features: int, out_features: int, device: torch.device) -> PackedExl2 | None:
    """Build the kernel layout of one layer (None if its groups do not fit the tile scheme)."""
    tiles = tile_table(t, in_features)
    if tiles is None:
        return None
    n, np_ = out_features, -(-out_features // 8) * 8
    qrows = t.q_weight.shape[0]
    qweight = torch.zeros(qrows + 8, np_, dtype=torch.int32)
    qweight[:qrows, :n] = t.q_weight[:, :n].to(torch.int32)
    groups = t.q_scale.shape[0]
    qscale = torch.zeros(groups, np_ // 8, dtype=torch.int32)
    take = min(np_ // 8, t.q_scale.shape[1])
    qscale[:, :take] = t.q_scale[:, :take].to(torch.int32)
    step = (t.q_scale_max.to(torch.float16).float() / 256.0).to(torch.float16).float()
    invperm = t.q_invperm.to(torch.int64)
    identity = bool(torch.equal(invperm, torch.arange(in_features)))
    perm = torch.argsort(invperm)
    return PackedExl2(
        qweight=qweight.to(device), qscale=qscale.to(device), step=step.to(device),
        tiles=torch.tensor(tiles, dtype=torch.int32).reshape(-1, 2).to(device),
        perm=torch.empty(0, dtype=torch.int32, device=device) if identity else perm.to(torch.int32).to(device),
        perm_long=None if identity else perm.to(device),
        invperm=None if identity else invperm.to(device),
        in_features=in_features, out_features=out_features)


class CudaBackend(TorchBackend):
    """Kernels from the CUDA extension; anything they do not cover falls back to TorchBackend."""

    name = "cuda"

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(device, dtype)
        self.ext = _ext()
        self._packed: dict[int, tuple[Linear, PackedExl2]] = {}
        self._acc = torch.zeros(0, dtype=torch.int64, device=device)
        self._counters = torch.zeros(0, dtype=torch.int32, device=device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        self._sms = torch.cuda.get_device_properties(index).multi_processor_count
        # One row of x: the half2 gemv only with KESTREL_GEMV_EXACT=0 and an extension that has it.
        self.gemv_exact = GEMV_EXACT or not hasattr(self.ext, "exl2_gemv_half2")
        self.fused_kv_quant = hasattr(self.ext, "kv_quant_decode")  # absent from builds before it
        self.gemv_many = hasattr(self.ext, "exl2_gemv_many") and os.environ.get("KESTREL_GEMV_MANY", "1") != "0"

    # --- weights -------------------------------------------------------------------------------

    def prepare_linear(self, lin: Linear) -> Linear:
        if lin.exl2 is None or lin.weight is not None or self.dtype != torch.float16:
            return super().prepare_linear(lin)
        packed = pack_exl2(lin.exl2, lin.in_features, lin.out_features, self.device)
        if packed is None:
            log.info("%s: groups are not whole 32-row tiles; using a dequantized fp16 weight", lin.name)
            return super().prepare_linear(lin)
        if lin.exl2.bias is not None:
            lin.bias = lin.exl2.bias.to(device=self.device, dtype=torch.float16)
        lin.exl2 = None  # the CPU copy is no longer needed
        self._packed[id(lin)] = (lin, packed)
        self._grow_workspace(packed.padded_out)
        return lin

    def reserve_group(self, lins: tuple[Linear, ...]) -> None:
        packs = [self.packed(lin) for lin in lins]
        if all(p is not None for p in packs):
            self._grow_workspace(sum(p.padded_out for p in packs))  # type: ignore[union-attr]

    def _grow_workspace(self, padded_out: int) -> None:
        need_acc = GEMV_ROWS * padded_out
        if self._acc.numel() < need_acc:  # 64-bit fixed point: the K-split sum is order-independent
            self._acc = torch.zeros(need_acc, dtype=torch.int64, device=self.device)
        need_cnt = -(-padded_out // COLS_PER_BLOCK)
        if self._counters.numel() < need_cnt:
            self._counters = torch.zeros(need_cnt, dtype=torch.int32, device=self.device)

    def packed(self, lin: Linear) -> PackedExl2 | None:
        entry = self._packed.get(id(lin))
        return entry[1] if entry is not None else None

    def dequantize_packed(self, p: PackedExl2, n0: int = 0, ncols: int | None = None) -> torch.Tensor:
        """fp16 (K, ncols) in quantization order for columns n0..n0+ncols (ncols a multiple of 8)."""
        ncols = p.padded_out - n0 if ncols is None else ncols
        out = torch.empty(p.in_features, ncols, dtype=torch.float16, device=self.device)
        self.ext.exl2_dequant(p.qweight, p.qscale, p.step, p.tiles, p.in_features, n0, out)
        return out

    def dequantized_weight(self, lin: Linear) -> torch.Tensor:
        p = self.packed(lin)
        if p is None:
            return super().dequantized_weight(lin)
        w = self.dequantize_packed(p)[:, :p.out_features]
        if p.invperm is not None:
            w = w[p.invperm]
        return w.t().contiguous()

    # --- kernels -------------------------------------------------------------------------------

    def linear(self, x: torch.Tensor, lin: Linear) -> torch.Tensor:
        p = self.packed(lin)
        if p is None:
            return super().linear(x, lin)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, p.in_features)
        if x2.dtype != torch.float16:
            x2 = x2.to(torch.float16)
        x2 = x2.contiguous()
        rows = x2.shape[0]
        if rows <= GEMV_MAX_ROWS:
            out = self.gemv(x2, p, lin.bias)
        else:
            out = self._dequant_matmul(x2, p, lin.bias)
        return out.view(*lead, p.out_features).to(x.dtype)

    def linear_many(self, x: torch.Tensor, lins: tuple[Linear, ...]) -> list[torch.Tensor]:
        """q/k/v or gate/up in one gemv launch (one graph node instead of two or three) where all are
        packed EXL2 with the exact kernel's row count; otherwise one linear() each."""
        packs = [self.packed(lin) for lin in lins]
        rows = x.numel() // x.shape[-1]
        fused = (self.gemv_many and 1 < len(lins) <= 3 and all(p is not None for p in packs)
                 and rows <= GEMV_MAX_ROWS and (rows > 1 or self.gemv_exact))
        if not fused:
            return [self.linear(x, lin) for lin in lins]
        ps: list[PackedExl2] = packs  # type: ignore[assignment]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, ps[0].in_features).to(torch.float16).contiguous()
        outs = [torch.empty(rows, p.out_features, dtype=torch.float16, device=x2.device) for p in ps]
        empty = torch.empty(0, dtype=torch.float16, device=x2.device)
        biases = [lin.bias if lin.bias is not None else empty for lin in lins]
        for r0 in range(0, rows, GEMV_ROWS):
            r1 = min(rows, r0 + GEMV_ROWS)
            self.ext.exl2_gemv_many(x2[r0:r1], [p.perm for p in ps], [p.qweight for p in ps],
                                    [p.qscale for p in ps], [p.step for p in ps], [p.tiles for p in ps], biases,
                                    self._acc, self._counters, [o[r0:r1] for o in outs])
        return [o.view(*lead, p.out_features).to(x.dtype) for o, p in zip(outs, ps, strict=True)]

    def gemv(self, x2: torch.Tensor, p: PackedExl2, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x2.shape[0]
        out = torch.empty(rows, p.out_features, dtype=torch.float16, device=x2.device)
        b = bias if bias is not None else torch.empty(0, dtype=torch.float16, device=x2.device)
        if rows == 1 and not self.gemv_exact:
            self.ext.exl2_gemv_half2(x2, p.perm, p.qweight, p.qscale, p.step, p.tiles, b, self._acc,
                                     self._counters, out)
            return out
        for r0 in range(0, rows, GEMV_ROWS):
            r1 = min(rows, r0 + GEMV_ROWS)
            self.ext.exl2_gemv(x2[r0:r1], p.perm, p.qweight, p.qscale, p.step, p.tiles, b, self._acc,
                               self._counters, out[r0:r1])
        return out

    def _dequant_matmul(self, x2: torch.Tensor, p: PackedExl2, bias: torch.Tensor | None) -> torch.Tensor:
        xp = x2.index_select(1, p.perm_long) if p.perm_long is not None else x2
        n, k = p.out_features, p.in_features
        cols = max(8, (DEQUANT_TEMP_ELEMS // k) // 8 * 8)
        if cols >= p.padded_out:
            w = self.dequantize_packed(p)[:, :n]
            return torch.addmm(bias, xp, w) if bias is not None else xp @ w
        out = torch.empty(x2.shape[0], n, dtype=torch.float16, device=x2.device)
        for n0 in range(0, n, cols):
            width = min(cols, p.padded_out - n0)
            use = min(width, n - n0)
            w = self.dequantize_packed(p, n0, width)[:, :use]
            if bias is not None:
                torch.addmm(bias[n0:n0 + use], xp, w, out=out[:, n0:n0 + use])
            else:
                torch.mm(xp, w, out=out[:, n0:n0 + use])
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not x.is_cuda:
            return super().rms_norm(x, weight, eps)
        empty = x.new_empty(0)
        return self.ext.rms_norm(x.contiguous(), empty, weight.contiguous(), float(eps))

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x += residual (in place), then RMSNorm(x): one kernel for the block's residual + norm."""
        x = x.contiguous()
        y = self.ext.rms_norm(x, residual.to(x.dtype).contiguous(), weight.contiguous(), float(eps))
        return x, y

    def mlp_act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if not gate.is_cuda or gate.dtype != up.dtype:
            return super().mlp_act(gate, up)
        return self.ext.silu_mul(gate.contiguous(), up.contiguous())

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Same result as rope.apply_rope; x (B, T, H, D), cos/sin (T, D) of x's dtype."""
        return self.ext.rope(x, cos.to(x.dtype), sin.to(x.dtype))

    def rope_cache_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos_table: torch.Tensor,
                          sin_table: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor) -> torch.Tensor:
        """One kernel for RoPE of q and k and the cache write of k and v (see TorchBackend)."""
        if q.dtype not in (torch.float16, torch.bfloat16) or k_cache.dtype != q.dtype:
            return super().rope_cache_decode(q, k, v, cos_table, sin_table, pos, k_cache, v_cache)
        return self.ext.rope_cache_decode(q.contiguous(), k.contiguous(), v.contiguous(), cos_table, sin_table,
                                          pos, k_cache, v_cache)

    def kv_quant_decode(self, cache: QuantKVCache, layer: int, pos: torch.Tensor, cos_table: torch.Tensor,
                        sin_table: torch.Tensor) -> None:
        """Two kernels (csrc/kv_quant.cu), positions read on the device: CUDA-graph safe."""
        kb, vb = cache.decode_target(layer)
        if not self.fused_kv_quant or kb.dtype != cos_table.dtype:
            return super().kv_quant_decode(cache, layer, pos, cos_table, sin_table)
        self.ext.kv_quant_decode(
            cache.keys[layer], cache.key_scales[layer], cache.values[layer], cache.value_scales[layer],
            cache.key_means[layer], cos_table, sin_table, cache.sink_keys[layer], cache.sink_values[layer],
            cache.recent_keys[layer], cache.recent_values[layer], pos, cache.ring_lo_dev[layer:layer + 1],
            kb, vb, cache.bits, cache.rot is not None, 4 * self._sms)

    def attention_cached(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         lengths: torch.Tensor, window: int | None = None) -> torch.Tensor:
        b, _, h, d = q.shape
        if d > 256 or d % 2 or k_cache.dtype != q.dtype:
            return super().attention_cached(q, k_cache, v_cache, lengths, window)
        s = k_cache.shape[1]
        # rows sharing one cache (stride 0: speculative drafts' check) split the keys like one row, so
        # each row sums in the order of the one-token decode step and gets its very logits
        splits = self.decode_splits(1 if k_cache.stride(0) == 0 else b, h, s)
        return self.ext.attention_decode_cached(q.contiguous(), k_cache, v_cache, lengths, splits, int(window or 0))

    def decode_splits(self, b: int, h: int, s: int) -> int:
        """Key-axis splits: enough blocks for two waves over the SMs, at least 64 keys per split."""
        return max(1, min(-(-s // 64), -(-2 * self._sms // (b * h))))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                  window: int | None = None) -> torch.Tensor:
        b, t, h, d = q.shape
        if t != 1 or d > 256 or d % 2 or k.stride(-1) != 1 or q.stride(-1) != 1:
            return super().attention(q, k, v, start, window)  # prefill: torch SDPA (flash / efficient)
        if window is not None and k.shape[1] > window:  # sliding window: the query sees the last `window` keys
            k, v = k[:, -window:], v[:, -window:]
        return self.ext.attention_decode(q, k, v, self.decode_splits(b, h, k.shape[1]))
