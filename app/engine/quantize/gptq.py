"""GPTQ for EXL2: Hessian accumulation, act-order, and error-propagating quantization in EXL2 groups.

One linear layer y = x W^T (W: out x in). The quantizer works on W^T (in x out) with rows in
act order (input features sorted by the Hessian diagonal, most active first), so the rows that
matter most are quantized first and the later rows absorb their rounding error. Rows are split into
groups, each with its own bit width (descending, as the EXL2 format requires) and its own 4-bit
scales, found by `exl2_writer.group_scales` on the group's *error-updated* rows right before they
are rounded. Everything the quantizer rounds to is exactly what the loader reconstructs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KestrelError
from ..exl2 import Exl2Tensors, pack_layer
from ..exl2_writer import group_scales_many

PERCDAMP = 0.1


class QuantizeError(KestrelError):
    """A quantization job cannot go on (bad settings, unusable calibration data, damaged job folder)."""


# --- quantization settings of one layer ------------------------------------------------------


@dataclass(frozen=True)
class QuantSpec:
    """A bit mix for one linear layer: parts (bits, proportion of rows, group size), bits descending.

    Serialises to the same dict shape exllamav2 uses for its QParams, so its measurements map 1:1.
    """

    parts: tuple[tuple[int, float, int], ...]

    @staticmethod
    def of(mix: list[tuple[int, float]], group_size: int | list[int] = 128) -> QuantSpec:
        sizes = group_size if isinstance(group_size, list) else [group_size] * len(mix)
        parts = sorted(((int(b), float(p), int(g)) for (b, p), g in zip(mix, sizes)), key=lambda t: -t[0])
        return QuantSpec(tuple(parts))

    def layout(self, in_features: int) -> list[tuple[int, int]]:
        """(bits, rows) groups in storage order; group rows are the group size except the last one."""
        out: list[tuple[int, int]] = []
        remaining = in_features
        for i, (bits, prop, gsize) in enumerate(self.parts):
            last = i == len(self.parts) - 1
            count = math.ceil(remaining / gsize) if last else math.ceil(min(in_features * prop, remaining) / gsize)
            for _ in range(count):
                if remaining <= 0:
                    break
                rows = min(gsize, remaining)
                out.append((bits, rows))
                remaining -= rows
        return out

    def total_bits(self, in_features: int, out_features: int, bias: bool = False) -> int:
        """Stored bits of the layer: q_weight, q_scale, q_scale_max, q_groups, q_invperm (+ bias)."""
        return layout_bits(self.layout(in_features), in_features, out_features, bias)

    def bpw(self, in_features: int, out_features: int) -> float:
        return self.total_bits(in_features, out_features) / (in_features * out_features)

    def to_dict(self) -> dict:
        return {"group_size": {str(b): g for b, _, g in self.parts}, "bits": [b for b, _, _ in self.parts],
                "bits_prop": [p for _, p, _ in self.parts], "scale_bits": 4}

    @staticmethod
    def from_dict(d: dict) -> QuantSpec:
        try:
            bits = [int(b) for b in d["bits"]]
            props = [float(p) for p in d["bits_prop"]]
            gs = d["group_size"]
            sizes = [int(gs[str(b)] if str(b) in gs else gs[b]) for b in bits] if isinstance(gs, dict) \
                else [int(gs)] * len(bits)
        except (KeyError, TypeError, ValueError) as e:
            raise QuantizeError(f"a quantization option is malformed ({e!r}): {d!r}",
                                hint="The measurement file is damaged; measure again.") from e
        if any(b not in (2, 3, 4, 5, 6, 8) for b in bits) or any(g % 32 for g in sizes):
            raise QuantizeError(f"unsupported bit widths or group sizes in {d!r}",
                                hint="EXL2 groups need 2/3/4/5/6/8 bits and sizes that are multiples of 32.")
        return QuantSpec.of(list(zip(bits, props)), sizes)

    @property
    def desc(self) -> str:
        return "/".join(f"{p:g}:{b}b_{g}g" for b, p, g in self.parts)


def layout_bits(groups: list[tuple[int, int]], in_features: int, out_features: int, bias: bool = False) -> int:
    g = len(groups)
    weight = sum(-(-rows * bits // 32) * 32 for bits, rows in groups) * out_features
    scales = g * -(-out_features // 8) * 32
    return weight + scales + g * 16 + g * 32 + in_features * 32 + (16 * out_features if bias else 0)


def stored_bits(t: Exl2Tensors) -> int:
    """Bits an Exl2Tensors occupies on disk (the same count `layout_bits` predicts)."""
    return (t.q_weight.numel() * 32 + t.q_scale.numel() * 32 + t.q_scale_max.numel() * 16
            + t.q_groups.numel() * 16 + t.q_invperm.numel() * 32 + (0 if t.bias is None else t.bias.numel() * 16))


# --- Hessian ---------------------------------------------------------------------------------


class Hessian:
    """Running X^T X of a layer's inputs, in float32, on the quantizer's device."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(device=self.sum.device, dtype=torch.float32)
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        """H = 2 X^T X / n (the scale does not change GPTQ's result; dampening is relative)."""
        if self.count == 0:
            raise QuantizeError("no calibration activations reached this layer",
                                hint="Give calibration data with at least one row.")
        return self.sum * (2.0 / self.count)


@dataclass
class Prepared:
    """Act-order permutation and the upper Cholesky factor of the permuted, dampened H^-1."""

    perm: torch.Tensor
    hinv: torch.Tensor


def prepare(h: torch.Tensor, percdamp: float = PERCDAMP) -> Prepared:
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    perm = torch.argsort(diag, descending=True, stable=True)
    h = h[perm][:, perm]
    damp = max(percdamp * float(torch.diagonal(h).mean()), 1e-6)
    idx = torch.arange(h.shape[0], device=h.device)
    for _ in range(12):
        h[idx, idx] += damp
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0 and not torch.isnan(upper).any():
                return Prepared(perm, upper.contiguous())
        damp *= 2  # not positive definite in float32: shift the eigenvalues further up
    raise QuantizeError("the layer's Hessian could not be inverted even with heavy dampening",
                        hint="Use more (or more varied) calibration rows.")


def identity_prepared(in_features: int, device: torch.device) -> Prepared:
    """No calibration: identity order and H = I, which makes GPTQ plain round-to-nearest."""
    return Prepared(torch.arange(in_features, device=device), torch.eye(in_features, device=device))


# --- quantization ----------------------------------------------------------------------------


@dataclass
class QuantizedLinear:
    tensors: Exl2Tensors | None  # None when quantized for measurement only (pack=False)
    weight: torch.Tensor  # fp16 (out, in): exactly what the loader will dequantize
    bits: int             # stored bits


def gptq_quantize(weight: torch.Tensor, prep: Prepared, groups: list[tuple[int, int]],
                  bias: torch.Tensor | None = None) -> QuantizedLinear:
    """GPTQ-quantize weight (out, in) into EXL2 groups [(bits, rows)] (storage order, bits descending)."""
    return gptq_quantize_many([weight], prep, [groups], [bias])[0]


def gptq_quantize_many(weights: list[torch.Tensor], prep: Prepared, layouts: list[list[tuple[int, int]]],
                       biases: list[torch.Tensor | None] | None = None, block: int = 32,
                       pack: bool = True) -> list[QuantizedLinear]:
    """GPTQ for several (weight, group layout) pairs that share one input, hence one Hessian, in one pass.

    Output columns are independent in GPTQ, so the weights are laid side by side and every row step
    runs once for all of them; each one keeps its own groups, bit widths and scales (per-column
    vectors). Errors propagate within `block`-row blocks row by row and to later rows once per block;
    group starts fall on block starts (groups are multiples of 32 rows), so every group's scales are
    found from rows that have already taken the error of all earlier rows. The scales of all groups
    starting at one row are searched in one batched op, with no host sync in the loop.

    pack=False (measurement) skips the EXL2 packing: `tensors` is None, `weight` stays float32 on
    the quantizer's device, and `bits` comes from the layout.
    """
    device = prep.hinv.device
    in_f = weights[0].shape[1]
    for w, groups in zip(weights, layouts):
        if w.shape[1] != in_f or sum(r for _, r in groups) != in_f:
            raise QuantizeError(f"a group layout covers {sum(r for _, r in groups)} rows, the layer has {in_f}")
    biases = biases or [None] * len(weights)
    perm = prep.perm.to(device)
    u = prep.hinv
    offs = [0]
    for w in weights:
        offs.append(offs[-1] + w.shape[0])
    w = torch.cat([x.to(device=device, dtype=torch.float32).t()[perm] for x in weights], dim=1).contiguous()
    total = offs[-1]
    starts: dict[int, list[tuple[int, int, int]]] = {}
    for seg, groups in enumerate(layouts):
        row = 0
        for bits, rows in groups:
            if row % block:
                raise QuantizeError(f"group rows must be multiples of {block} (a group starts at row {row})")
            starts.setdefault(row, []).append((seg, bits, rows))
            row += rows
    scales = torch.ones(total, device=device)
    zero = torch.zeros(total, device=device)
    maxq = torch.zeros(total, device=device)
    qs = torch.empty(in_f, total, dtype=torch.float32, device=device)
    deq = torch.empty(in_f, total, dtype=torch.float16, device=device)
    scale_codes: list[list[torch.Tensor]] = [[] for _ in weights]
    scale_max: list[list[torch.Tensor]] = [[] for _ in weights]
    for a in range(0, in_f, block):
        b = min(a + block, in_f)
        if a in starts:
            _set_scales(w, a, starts[a], offs, scales, zero, maxq, scale_codes, scale_max)
        err = torch.empty(b - a, total, dtype=torch.float32, device=device)
        for i in range(a, b):
            row = w[i]
            q = torch.minimum(torch.round(row / scales + zero).clamp_(min=0), maxq)
            dq = ((q - zero) * scales).to(torch.float16)
            qs[i] = q
            deq[i] = dq
            e = (row - dq.float()).div_(u[i, i])
            err[i - a] = e
            if i + 1 < b:
                w[i + 1:b].addr_(u[i, i + 1:b], e, alpha=-1.0)
        if b < in_f:
            w[b:].addmm_(u[a:b, b:].t(), err, alpha=-1.0)
    invperm = torch.argsort(perm)
    perm_cpu = perm.cpu()
    out = []
    for seg, groups in enumerate(layouts):
        cols = slice(offs[seg], offs[seg + 1])
        if not pack:
            dense = deq[:, cols][invperm].t().float()
            out.append(QuantizedLinear(None, dense, layout_bits(groups, in_f, dense.shape[0], biases[seg] is not None)))
            continue
        tensors = pack_layer(qs[:, cols].to(torch.int32).cpu(), torch.stack(scale_codes[seg]).cpu(),
                             torch.stack(scale_max[seg]).cpu(), groups, perm_cpu, biases[seg])
        dense = deq[:, cols][invperm].t().contiguous().cpu()
        out.append(QuantizedLinear(tensors, dense, stored_bits(tensors)))
    return out


def _set_scales(w: torch.Tensor, a: int, starting: list[tuple[int, int, int]], offs: list[int],
                scales: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor,
                scale_codes: list[list[torch.Tensor]], scale_max: list[list[torch.Tensor]]) -> None:
    """Search the scales of every group starting at row `a` at once: one batched op per group length."""
    device = w.device
    for length in sorted({rows for _, _, rows in starting}):
        same = [(seg, bits) for seg, bits, rows in starting if rows == length]
        counts = [offs[seg + 1] - offs[seg] for seg, _ in same]
        dims = torch.tensor(counts, device=device)
        col_idx = torch.cat([torch.arange(offs[seg], offs[seg + 1], device=device) for seg, _ in same])
        seg_id = torch.repeat_interleave(torch.arange(len(same), device=device), dims)
        col_maxq = torch.repeat_interleave(torch.tensor([float(2 ** bits - 1) for _, bits in same],
                                                        device=device), dims)
        codes, smax, sv = group_scales_many(w[a:a + length].index_select(1, col_idx), col_maxq, seg_id, len(same))
        scales[col_idx] = sv
        maxq[col_idx] = col_maxq
        zero[col_idx] = (col_maxq + 1) * 0.5
        for k, ((seg, _), piece) in enumerate(zip(same, torch.split(codes, counts))):
            scale_codes[seg].append(piece)
            scale_max[seg].append(smax[k])


def output_error(weight: torch.Tensor, quantized: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error on the calibration inputs: sqrt(tr(D H D^T) / tr(W H W^T)), D = Wq - W."""
    w = weight.float().to(h.device)
    d = quantized.float().to(h.device) - w
    num = torch.einsum("oi,ij,oj->", d, h, d)
    den = torch.einsum("oi,ij,oj->", w, h, w)
    return float(torch.sqrt(num.clamp(min=0) / den))
