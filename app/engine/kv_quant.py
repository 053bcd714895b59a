"""Quantized KV cache (Q8 / Q6 / Q4): keys and values stored as small integers, read back as fp16.

Per token, layer and KV head, head_dim is zero-padded to whole groups of CACHE_GROUP_SIZE (32)
elements. Each group is rotated by a normalized 32x32 Hadamard matrix first (as exllamav2's cache
does): the rotation spreads an outlier channel over the whole group, so one scale fits all 32
values far better; it is orthogonal and its own inverse, so reading back undoes it exactly. Then
symmetric quantization with one fp16 scale per group on a grid of 2**bits levels centred on zero
(level i stands for (i - (2**bits - 1) / 2) * scale; no level is wasted).

Keys are centred first. Llama-style keys carry a large per-channel mean (mean/std up to ~8 in
SmolLM2's low-frequency RoPE channels): a per-token scale spent on that offset leaves few levels for
what varies. The mean is taken before RoPE (RoPE turns a constant into a position-dependent vector)
over the first MEAN_TOKENS keys written into an empty cache (position 0, often an attention sink,
left out), stored as one fp16 vector per layer and KV head, and rope(mean, position) is subtracted
before quantizing and added back after. On the fixture this took the Q4 keys' perplexity cost from ~4.5% to ~0.2%.

The first EXACT_TOKENS positions are also kept in fp16 beside the quantized copy: most heads put
much of their attention on them (attention sinks), so their error would reach every later token.
So are the latest RECENT_TOKENS positions (a ring per layer) and the tokens being written: the
quantized copy is only read for positions further back, where attention is thinner.

Packing: Q8 one value per byte, Q6 four values in three bytes, Q4 two per byte. Storage per layer
is one uint8 tensor and one fp16 scale tensor for keys and the same for values, so the bytes held
are exactly max_seq_len * kv_bytes_per_token(config, mode) (times batch). Outside that count: the
key means, fp16 sink and recent tokens (num_layers * num_kv_heads * head_dim * (1 + 2 * (EXACT_TOKENS
+ RECENT_TOKENS)) values) and the fp16 read-back buffers below.

`update` keeps the KVCache contract: it returns fp16 views of the whole valid span, dequantized into
one fp16 buffer per cache that all layers share (layers run one after another, and attention reads
the view before the next layer writes).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cache import CACHE_GROUP_SIZE as GROUP  # cache imports this module lazily: no cycle

MEAN_TOKENS = 32  # keys after position 0 whose pre-RoPE mean centres the rest (measured best of 32 / all)
EXACT_TOKENS = 4  # the first positions (attention sinks: most heads attend to them heavily) kept in fp16
RECENT_TOKENS = 64  # the latest positions, kept in fp16 too: nearby tokens draw much of the attention
# Positions dequantized per piece when the cache is read back. One piece for the whole span made fp32
# temporaries that grew with every prefill chunk; the caching allocator could reuse none of them and
# held 2-4 GB more than it used at 32k (8B shape, H100). Fixed-size pieces bound them and are reused.
SLAB = 4096


def scratch_bytes(kv_dim: int, max_seq_len: int, batch: int = 1) -> int:
    """Peak fp32 temporaries of one read-back piece (SLAB positions at most): unpacked codes as fp32,
    their rotation, the key offset and its RoPE halves; four such tensors are alive at once."""
    return batch * min(SLAB, max_seq_len) * kv_dim * 4 * 4


def fixed_bytes(num_layers: int, kv_dim: int, max_seq_len: int, batch: int = 1) -> int:
    """What a QuantKVCache holds beside its per-token storage once every layer has been written (its
    overhead_bytes): per layer the key mean and the fp16 sink and recent copies of keys and values,
    and the fp16 read-back buffers for keys and values that all layers share."""
    per_layer = kv_dim * 2 * (1 + 2 * (min(EXACT_TOKENS, max_seq_len) + RECENT_TOKENS))
    return batch * (num_layers * per_layer + 2 * max_seq_len * kv_dim * 2)


def hadamard(n: int = GROUP) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix (n a power of two): symmetric and orthogonal."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


def packed_bytes(padded_dim: int, bits: int) -> int:
    """Bytes that `padded_dim` values of `bits` bits take (padded_dim is a multiple of GROUP)."""
    return padded_dim * bits // 8


def quantize(x: torch.Tensor, bits: int, rot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., padded_dim) -> (packed uint8 (..., padded_dim*bits/8), fp16 scales (..., groups))."""
    lead, dim = x.shape[:-1], x.shape[-1]
    g = x.float().reshape(*lead, dim // GROUP, GROUP)
    if rot is not None:
        g = g @ rot
    half = (2 ** bits - 1) / 2
    amax = g.abs().amax(-1, keepdim=True)
    scale = (amax / half).clamp_min(1e-8).to(torch.float16)  # stored scale; quantize against it
    q = torch.round(g / scale.float() + half).clamp_(0, 2 ** bits - 1).to(torch.uint8)
    return pack(q.reshape(*lead, dim), bits), scale.squeeze(-1)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, bits: int, rot: torch.Tensor | None,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Inverse of quantize: (..., padded_dim) in `dtype`."""
    q = unpack(packed, bits)
    lead, dim = q.shape[:-1], q.shape[-1]
    half = (2 ** bits - 1) / 2
    g = (q.reshape(*lead, dim // GROUP, GROUP).float() - half) * scales.float().unsqueeze(-1)
    if rot is not None:
        g = g @ rot  # the normalized Hadamard matrix is its own inverse
    return g.reshape(*lead, dim).to(dtype)


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (..., n) -> packed bytes (..., n*bits/8)."""
    if bits == 8:
        return q
    if bits == 4:
        return q[..., 0::2] | (q[..., 1::2] << 4)
    if bits == 6:
        a, b, c, d = (q[..., i::4] for i in range(4))
        out = torch.stack([a | (b << 6), (b >> 2) | (c << 4), (c >> 4) | (d << 2)], dim=-1)
        return out.reshape(*q.shape[:-1], q.shape[-1] * 3 // 4)
    raise ValueError(f"unsupported bits {bits}")


def unpack(p: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes (..., m) -> uint8 codes (..., m*8/bits)."""
    if bits == 8:
        return p
    if bits == 4:
        return torch.stack([p & 15, p >> 4], dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    if bits == 6:
        t = p.reshape(*p.shape[:-1], p.shape[-1] // 3, 3)
        b0, b1, b2 = t[..., 0], t[..., 1], t[..., 2]
        out = torch.stack([b0 & 63, (b0 >> 6) | ((b1 & 15) << 2), (b1 >> 4) | ((b2 & 3) << 4), b2 >> 2], dim=-1)
        return out.reshape(*p.shape[:-1], p.shape[-1] * 4 // 3)
    raise ValueError(f"unsupported bits {bits}")


class QuantKVCache:
    """Same contract as cache.KVCache (update / truncate / reset / length / max_seq_len / mode)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int, bits: int,
                 mode: str, device: torch.device | str, dtype: torch.dtype = torch.float16, batch: int = 1,
                 rotate: bool = True,
                 rope: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """rope(start, length) -> (cos, sin) tables of the model; without it keys are centred as they
        come (fine for tests of the cache alone, weaker for real keys)."""
        self.max_seq_len = max_seq_len
        self.length = 0
        self.mode = mode
        self.bits = bits
        self.head_dim = head_dim
        self.groups = -(-head_dim // GROUP)
        self.padded = self.groups * GROUP
        self.dtype = dtype
        self.batch = batch
        shape = (batch, max_seq_len, num_kv_heads)
        nbytes = packed_bytes(self.padded, bits)

        def store() -> list[torch.Tensor]:
            return [torch.zeros(*shape, nbytes, dtype=torch.uint8, device=device) for _ in range(num_layers)]

        def scales() -> list[torch.Tensor]:
            return [torch.zeros(*shape, self.groups, dtype=torch.float16, device=device) for _ in range(num_layers)]

        self.keys, self.values = store(), store()
        self.key_scales, self.value_scales = scales(), scales()
        self.rot = hadamard().to(device) if rotate else None
        self.rope = rope
        # (batch, 1, heads, dim) fp16 per layer, overwritten in place (a CUDA graph reads them by address)
        self.key_means = [torch.zeros(batch, 1, num_kv_heads, head_dim, dtype=torch.float16, device=device)
                          for _ in range(num_layers)]
        self.mean_set = [False] * num_layers
        self.exact = EXACT_TOKENS
        sink = (batch, min(self.exact, max_seq_len), num_kv_heads, head_dim)
        self.sink_keys = [torch.zeros(sink, dtype=dtype, device=device) for _ in range(num_layers)]
        self.sink_values = [torch.zeros(sink, dtype=dtype, device=device) for _ in range(num_layers)]
        self.recent = RECENT_TOKENS
        ring = (batch, self.recent, num_kv_heads, head_dim)
        self.recent_keys = [torch.zeros(ring, dtype=dtype, device=device) for _ in range(num_layers)]
        self.recent_values = [torch.zeros(ring, dtype=dtype, device=device) for _ in range(num_layers)]
        # per layer, the positions the ring holds exactly: [ring_lo, ring_end) (at most `recent` of them);
        # ring_lo is mirrored on the device for the decode-step kernel (csrc/kv_quant.cu)
        self.ring_lo = [0] * num_layers
        self.ring_end = [0] * num_layers
        self.ring_lo_dev = torch.zeros(num_layers, dtype=torch.int32, device=device)
        self._ring_lo_sent = [0] * num_layers  # what ring_lo_dev holds (set without a device read)
        self._k_buf: torch.Tensor | None = None  # shared fp16 read-back buffers, made on first use
        self._v_buf: torch.Tensor | None = None
        self._shape = shape
        self._device = device

    def overhead_bytes(self) -> int:
        """Bytes outside the per-token formula: key means, the exact sink and recent copies and the fp16
        read-back buffers (fixed_bytes once the buffers exist)."""
        extra = sum(m.numel() * m.element_size() for m in self.key_means)
        extra += sum(t.numel() * t.element_size()
                     for t in self.sink_keys + self.sink_values + self.recent_keys + self.recent_values)
        return extra + sum(b.numel() * b.element_size() for b in (self._k_buf, self._v_buf) if b is not None)

    def storage_bytes(self) -> int:
        """Bytes of the quantized storage (what kv_bytes_per_token counts); excludes read-back buffers."""
        return sum(t.numel() * t.element_size()
                   for t in self.keys + self.values + self.key_scales + self.value_scales)

    def reset(self) -> None:
        self.length = 0

    def truncate(self, length: int) -> None:
        self.length = min(self.length, max(0, length))
        for layer in range(len(self.ring_end)):  # ring slots of forgotten positions no longer count
            self.ring_end[layer] = min(self.ring_end[layer], max(0, length))
            self.ring_lo[layer] = min(self.ring_lo[layer], self.ring_end[layer])
        self.ring_lo_dev.copy_(torch.tensor(self.ring_lo, dtype=torch.int32))
        self._ring_lo_sent = list(self.ring_lo)

    def _ring_written(self, layer: int, start: int, end: int) -> None:
        """Positions [start, end) went into the ring: it now holds the latest `recent` of what it held
        below `start` and of them (a write past a gap drops what lay below the gap). The device copy
        of ring_lo is set only where the kernel needs it, above end - recent (see decode_ready)."""
        lo = self.ring_lo[layer] if start <= self.ring_end[layer] else start
        self.ring_lo[layer] = max(lo, end - self.recent)
        self.ring_end[layer] = end
        if lo > end - self.recent and self._ring_lo_sent[layer] != lo:
            self.ring_lo_dev[layer].fill_(lo)
            self._ring_lo_sent[layer] = lo

    # --- the decode step at a device-side position (Transformer.decode_step, CUDA graphs) -------

    def decode_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the decode step writes the new token's k/v: the shared fp16 read-back buffers, from
        which the backend's kv_quant_decode quantizes it and around which it reads the layer back."""
        return self._buffers()

    def decode_ready(self, pos: int) -> bool:
        """Whether a decode step at `pos` may run without the host (what csrc/kv_quant.cu assumes):
        every layer has its key mean and its ring ends at `pos`. The device copy of ring_lo is set
        whenever the host's rises above pos - recent (truncate, a write past a gap); otherwise it may
        lag, which changes nothing, as the kernel bounds the ring by pos - recent too."""
        return all(self.mean_set) and all(e == pos for e in self.ring_end)

    def decoded(self, pos: int) -> None:
        """Host bookkeeping after a decode step at `pos` ran on the device (kv_quant_decode)."""
        for layer in range(len(self.ring_end)):
            self._ring_written(layer, pos, pos + 1)

    def exact_tensors(self) -> list[torch.Tensor]:
        """The fp16 sink and recent copies: a graph capture's warm-up step writes a slot of them, so
        DecodeGraph saves and restores them around it."""
        return self.sink_keys + self.sink_values + self.recent_keys + self.recent_values

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if self.padded == self.head_dim:
            return x
        return torch.nn.functional.pad(x, (0, self.padded - self.head_dim))

    def _buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._k_buf is None:
            full = (*self._shape, self.head_dim)
            # zeros, not empty: attention over the whole static buffer (the PyTorch decode step) masks
            # the scores of unwritten positions, but 0 * a NaN left in memory would still be NaN
            self._k_buf = torch.zeros(full, dtype=self.dtype, device=self._device)
            self._v_buf = torch.zeros(full, dtype=self.dtype, device=self._device)
        assert self._v_buf is not None
        return self._k_buf, self._v_buf

    def _key_offset(self, layer: int, start: int, end: int) -> torch.Tensor:
        """rope(key mean, positions start..end-1) as float32 (batch, end-start, heads, dim)."""
        m = self.key_means[layer].float().expand(-1, end - start, -1, -1)
        if self.rope is None:
            return m
        from .rope import apply_rope

        cos, sin = self.rope(start, end - start)
        return apply_rope(m, cos.float(), sin.float())

    def _set_key_mean(self, layer: int, k: torch.Tensor) -> None:
        """Mean of the pre-RoPE keys of the first write (without position 0), or zero for one token."""
        t = k.shape[1]
        self.mean_set[layer] = True
        if t < 2:
            self.key_means[layer].zero_()
            return
        kf = k.float()
        if self.rope is not None:
            from .rope import apply_rope

            cos, sin = self.rope(0, t)
            kf = apply_rope(kf, cos.float(), -sin.float())  # rotate back to before RoPE
        self.key_means[layer].copy_(kf[:, 1:1 + MEAN_TOKENS].mean(1, keepdim=True))

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize k/v (batch, seq, heads, dim) into place at `start`; return fp16 views of 0..end."""
        from .cache import check_room

        end = check_room(start + k.shape[1], self.max_seq_len)
        if start == 0 or not self.mean_set[layer]:
            self._set_key_mean(layer, k)
        kc = k.float() - self._key_offset(layer, start, end)
        for x, store, scales in ((kc, self.keys, self.key_scales), (v, self.values, self.value_scales)):
            packed, scale = quantize(self._pad(x), self.bits, self.rot)
            store[layer][:, start:end] = packed
            scales[layer][:, start:end] = scale
        if start < self.exact:
            n = min(end, self.exact) - start
            self.sink_keys[layer][:, start:start + n] = k[:, :n]
            self.sink_values[layer][:, start:start + n] = v[:, :n]
        # read back 0..end: exact sinks, the quantized copy, exact recent positions from the ring (those
        # in [ring_lo, ring_end): after a truncate, newer writes took the slots of older positions),
        # then the tokens being written; each position is read once
        kb, vb = self._buffers()
        n = min(end, self.exact)
        kb[:, :n] = self.sink_keys[layer][:, :n]
        vb[:, :n] = self.sink_values[layer][:, :n]
        lo = max(n, start - self.recent, self.ring_lo[layer])
        quantized_end = min(lo, start)
        for a in range(n, quantized_end, SLAB):  # fixed-size pieces: temporaries of one size, reused
            b = min(a + SLAB, quantized_end)
            deq = dequantize(self.keys[layer][:, a:b], self.key_scales[layer][:, a:b], self.bits, self.rot,
                             torch.float32)
            kb[:, a:b] = deq[..., :self.head_dim] + self._key_offset(layer, a, b)
            deq = dequantize(self.values[layer][:, a:b], self.value_scales[layer][:, a:b], self.bits,
                             self.rot, self.dtype)
            vb[:, a:b] = deq[..., :self.head_dim]
        if lo < start:
            slots = torch.arange(lo, start, device=k.device) % self.recent
            kb[:, lo:start] = self.recent_keys[layer][:, slots]
            vb[:, lo:start] = self.recent_values[layer][:, slots]
        kb[:, start:end] = k                      # the tokens being written: exact
        vb[:, start:end] = v
        keep = min(end - start, self.recent)      # remember the latest of them in the ring
        if keep:
            slots = torch.arange(end - keep, end, device=k.device) % self.recent
            self.recent_keys[layer][:, slots] = k[:, -keep:]
            self.recent_values[layer][:, slots] = v[:, -keep:]
            self._ring_written(layer, start, end)
        return kb[:, :end], vb[:, :end]
