"""The EXL2 tensor format: read (unpack + dequantize) and write (pack), in plain PyTorch.

One quantized linear layer `key` with in_features K and out_features N is stored as:
  key.q_weight    int32 (sum over groups of rows*bits/32, N): per column, each group's K-rows of
                  `bits`-bit codes as a little-endian bit stream (3/5/6-bit codes straddle words:
                  32 codes in 3 words, 32 in 5, 16 in 3). Rows are in quantization (act) order.
  key.q_groups    int16 (2*G,): per group (bits, first q_weight row of the group). Groups appear with
                  bits in descending order (8, 6, 5, 4, 3, 2), as the reference's kernels expect.
  key.q_scale     int32 (G, N/8): 4-bit scale codes s, eight per word, low nibble first; the code
                  stores s-1 for s in 1..16.
  key.q_scale_max fp16 (G,): per-group maximum scale.
  key.q_invperm   int32 (K,): inverse of the act-order permutation (q_perm = argsort(q_invperm)).
  key.bias        fp16 (N,), optional.
Dequantization, exactly as the reference computes it in fp16:
  scale = fp16( fp16(s*s) * fp16(q_scale_max / 256) );  w = fp16( (q - 2^(bits-1)) * scale )
and row k of the quantized matrix is input feature q_perm[k].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import ModelFormatError

BIT_WIDTHS = (8, 6, 5, 4, 3, 2)
EXL2_SUFFIXES = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")


def _codes_per_block(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest whole block of a column's bit stream."""
    return {2: (16, 1), 3: (32, 3), 4: (8, 1), 5: (32, 5), 6: (16, 3), 8: (4, 1)}[bits]


def unpack_codes(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Unpack `rows` codes per column from int32 words (nwords, N) into int32 (rows, N)."""
    codes, nw = _codes_per_block(bits)
    n = words.shape[1]
    blocks = -(-rows // codes)
    need = blocks * nw
    mask = (1 << bits) - 1
    if words.shape[0] < need:
        words = torch.cat([words, words.new_zeros(need - words.shape[0], n)])
    if nw == 1:  # 2/4/8 bits: codes never straddle words, so 32-bit shifts suffice
        shifts = torch.arange(codes, device=words.device, dtype=torch.int32) * bits
        vals = (words[:need].unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return vals.reshape(blocks * codes, n)[:rows]
    w = words[:need].to(torch.int64) & 0xFFFFFFFF
    w = w.reshape(blocks, nw, n)
    # Pair each word with the next so a code straddling a boundary can be read as one 64-bit value.
    nxt = torch.cat([w[:, 1:], w.new_zeros(blocks, 1, n)], dim=1)
    pair = w | (nxt << 32)
    offs = torch.arange(codes, device=words.device) * bits
    word_idx, shift = offs // 32, offs % 32
    vals = (pair[:, word_idx, :] >> shift.view(1, -1, 1)) & mask
    return vals.reshape(blocks * codes, n)[:rows].to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack int codes (rows, N) into int32 words (rows*bits/32, N); rows are padded to a block."""
    per, nw = _codes_per_block(bits)
    rows, n = codes.shape
    blocks = -(-rows // per)
    c = torch.zeros(blocks * per, n, dtype=torch.int64, device=codes.device)
    c[:rows] = codes.to(torch.int64)
    c = c.reshape(blocks, per, n)
    words = torch.zeros(blocks, nw + 1, n, dtype=torch.int64, device=codes.device)
    for i in range(per):
        off = i * bits
        wi, sh = off // 32, off % 32
        v = c[:, i] << sh
        words[:, wi] |= v & 0xFFFFFFFF
        words[:, wi + 1] |= v >> 32
    out = words[:, :nw].reshape(blocks * nw, n)
    qrows = -(-rows * bits // 32)
    out = out[:qrows]
    return (out - ((out >> 31) << 32)).to(torch.int32)  # reinterpret as signed int32


def unpack_scales(q_scale: torch.Tensor, n: int) -> torch.Tensor:
    """4-bit scale codes (G, N/8) -> int32 s in 1..16, shape (G, N)."""
    w = q_scale.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, device=q_scale.device) * 4
    vals = (w.unsqueeze(-1) >> shifts) & 0xF
    return (vals.reshape(q_scale.shape[0], -1)[:, :n] + 1).to(torch.int32)


def pack_scales(s: torch.Tensor) -> torch.Tensor:
    """int s in 1..16 (G, N) -> int32 (G, ceil(N/8)) codes."""
    g, n = s.shape
    pad = -n % 8
    v = torch.nn.functional.pad((s.to(torch.int64) - 1), (0, pad)).reshape(g, -1, 8)
    shifts = torch.arange(8, device=s.device) * 4
    packed = (v << shifts).sum(-1)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


@dataclass
class Exl2Tensors:
    """The stored tensors of one EXL2 linear layer."""

    q_weight: torch.Tensor
    q_invperm: torch.Tensor
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor
    bias: torch.Tensor | None = None

    def groups(self, in_features: int) -> list[tuple[int, int, int, int]]:
        """[(bits, first input row, row count, first q_weight row)] in storage order, validated."""
        g = self.q_groups.to(torch.int64).tolist()
        if len(g) % 2 or not g:
            raise ModelFormatError("q_groups must hold (bits, row) pairs")
        count = len(g) // 2
        qrows_total = self.q_weight.shape[0]
        out, row = [], 0
        for i in range(count):
            bits, qrow = g[2 * i], g[2 * i + 1]
            if bits not in BIT_WIDTHS:
                raise ModelFormatError(f"group {i} has unsupported bit width {bits}")
            next_qrow = g[2 * i + 3] if i + 1 < count else qrows_total
            rows = (next_qrow - qrow) * 32 // bits if i + 1 < count else in_features - row
            if rows <= 0 or next_qrow > qrows_total:
                raise ModelFormatError(f"group {i} has an impossible row range")
            out.append((bits, row, rows, qrow))
            row += rows
        if row != in_features:
            raise ModelFormatError(f"groups cover {row} rows, the layer has {in_features} inputs")
        return out

    def dequantize(self, in_features: int, out_features: int) -> torch.Tensor:
        """Reconstruct the fp16 weight (out_features, in_features), bit-exact with the reference."""
        groups = self.groups(in_features)
        if self.q_scale_max.shape[0] != len(groups) or self.q_scale.shape[0] != len(groups):
            raise ModelFormatError("q_scale/q_scale_max do not match the number of groups")
        if self.q_weight.shape[1] < out_features or self.q_invperm.shape[0] != in_features:
            raise ModelFormatError("q_weight/q_invperm shapes do not match the layer size")
        device = self.q_weight.device
        s = unpack_scales(self.q_scale, out_features).float()
        smax = (self.q_scale_max.to(torch.float16).float() / 256.0).to(torch.float16).float()
        scales = ((s * s).to(torch.float16).float() * smax.unsqueeze(1)).to(torch.float16).float()
        codes = torch.empty(in_features, out_features, dtype=torch.int32, device=device)
        # Consecutive groups of one width are one contiguous bit stream: unpack each run at once.
        runs: list[list[int]] = []
        for bits, row, rows, qrow in groups:
            if runs and runs[-1][0] == bits:
                runs[-1][2] += rows
            else:
                runs.append([bits, row, rows, qrow])
        for bits, row, rows, qrow in runs:
            nwords = -(-rows * bits // 32)
            codes[row: row + rows] = unpack_codes(self.q_weight[qrow: qrow + nwords, :out_features], bits, rows)
        counts = torch.tensor([g[2] for g in groups], device=device)
        zero = torch.repeat_interleave(torch.tensor([1 << (g[0] - 1) for g in groups], device=device), counts)
        row_scales = torch.repeat_interleave(scales, counts, dim=0)
        out = ((codes - zero.to(torch.int32).unsqueeze(1)).float() * row_scales).to(torch.float16)
        invperm = self.q_invperm.to(torch.int64)
        return out[invperm].t().contiguous()


def quantization_groups(in_features: int, bits_of_group: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort (bits, rows) pairs into storage order (bits descending) and check they cover the input."""
    if sum(r for _, r in bits_of_group) != in_features:
        raise ValueError("group rows must add up to in_features")
    return sorted(bits_of_group, key=lambda br: -br[0])


def pack_layer(codes: torch.Tensor, scale_codes: torch.Tensor, scale_max: torch.Tensor,
               groups: list[tuple[int, int]], perm: torch.Tensor, bias: torch.Tensor | None = None
               ) -> Exl2Tensors:
    """Write one layer in EXL2 layout.

    codes: (K, N) int codes in quantization order (row k is input feature perm[k]);
    scale_codes: (G, N) ints in 1..16; scale_max: (G,) fp16; groups: [(bits, rows)] in storage order
    (bits descending; rows a multiple of 32 except possibly the last group); perm: (K,) act order.
    """
    words, q_groups, qrow, row = [], [], 0, 0
    for bits, rows in groups:
        block = pack_codes(codes[row: row + rows], bits)
        words.append(block)
        q_groups += [bits, qrow]
        qrow += block.shape[0]
        row += rows
    return Exl2Tensors(
        q_weight=torch.cat(words).contiguous(),
        q_invperm=torch.argsort(perm).to(torch.int32),
        q_scale=pack_scales(scale_codes),
        q_scale_max=scale_max.to(torch.float16),
        q_groups=torch.tensor(q_groups, dtype=torch.int16),
        bias=None if bias is None else bias.to(torch.float16),
    )
