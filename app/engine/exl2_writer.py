"""Writing EXL2 model folders: per-group scale search and packing, plus folder compilation.

This is the output stage the quantizer builds on. `quantize_rtn` rounds to nearest with the
reference's scale scheme (4-bit scale codes squared times a per-group maximum); the GPTQ quantizer
supplies its own codes and scales and reuses `pack_layer` and `write_folder`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

import torch
from safetensors.torch import save_file

from .config import ModelConfig
from .exl2 import Exl2Tensors, pack_layer
from .safetensors_io import TensorStore

P_MIN, P_MAX, P_STEPS = 0.7, 1.2, 26

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "tokenizer.model")


def group_scales(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows w (rows, N) of one group: (scale codes 1..16 (N,), scale_max fp16 (), fp32 scales (N,)).

    The scales returned are exactly those the loader reconstructs, so codes chosen against them
    dequantize to the values the quantizer intended.
    """
    n = w.shape[1]
    maxq = torch.full((n,), float(2 ** bits - 1), device=w.device)
    seg = torch.zeros(n, dtype=torch.int64, device=w.device)
    codes, smax16, scales = group_scales_many(w, maxq, seg, 1)
    return codes, smax16[0], scales


def group_scales_many(w: torch.Tensor, maxq: torch.Tensor, seg: torch.Tensor, n_seg: int,
                      max_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`group_scales` for many groups at once: column j of w (rows, N) belongs to group seg[j].

    maxq (N,) holds each column's 2^bits - 1. A group shorter than `rows` has its extra rows zeroed
    by the caller (a zero row rounds to zero exactly, so it changes neither the maximum nor the
    error). Returns scale codes (N,), per-group scale_max fp16 (n_seg,) and fp32 scales (N,), all
    on w's device without a host sync, so a GPU quantizer never stalls on it.
    """
    w = w.float()
    zero = (maxq + 1) * 0.5
    xmax = w.abs().amax(dim=0) + 1e-12
    base = xmax / (maxq * 0.5)
    smax = torch.zeros(n_seg, device=w.device).scatter_reduce(0, seg, base, "amax", include_self=False)
    codes = torch.clamp(torch.round(torch.sqrt(base / smax[seg]) * 16), 1, 16)
    sq = (codes * codes).to(torch.float16).float()

    def scales_for(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p (P, n_seg) stretches -> (scale_max fp16 (P, n_seg), scales (P, N))."""
        smax16 = (smax * p).to(torch.float16)
        step = (smax16.float() / 256).to(torch.float16).float()
        return smax16, (sq * step[:, seg]).to(torch.float16).float()

    # The 4-bit scale codes round each column's ideal scale; search a global stretch p per group (as
    # the reference does) that minimises the error's 3.5-norm, which favours not clipping the
    # extremes. All stretches run as one tensor op (chunked to bound memory).
    grid = torch.linspace(P_MIN, P_MAX, P_STEPS, device=w.device)
    if max_elements is None:  # CPU: stay in cache (measured 5x faster); GPU: few, large launches
        max_elements = 2**26 if w.is_cuda else 2**20
    rows, n = w.shape
    width = max(1, min(n, max_elements // max(1, rows)))
    chunk = max(1, min(P_STEPS, max_elements // max(1, rows * width)))
    err = torch.zeros(P_STEPS, n_seg, device=w.device)
    for j0 in range(0, n, width):
        cols = slice(j0, j0 + width)
        wc, zc, mc, sc = w[:, cols].unsqueeze(0), zero[cols], maxq[cols], seg[cols]
        for c0 in range(0, P_STEPS, chunk):
            g = grid[c0:c0 + chunk]
            smax16 = (smax * g.unsqueeze(1)).to(torch.float16)  # as scales_for, on this slice only
            step = (smax16.float() / 256).to(torch.float16).float()
            cand = (sq[cols] * step[:, sc]).to(torch.float16).float().unsqueeze(1)  # (P, 1, width)
            q = torch.minimum(torch.round(wc / cand + zc).clamp_(min=0), mc)
            a = ((q - zc) * cand - wc).abs_()
            err[c0:c0 + chunk].index_add_(1, sc, (a.square() * a * a.sqrt()).sum(dim=1))  # |d|^3.5
    best = grid[torch.argmin(err, dim=0)]  # (n_seg,): first minimum on ties
    smax16, scales = scales_for(best.unsqueeze(0))
    return codes.to(torch.int32), smax16[0], scales[0]


def quantize_rtn(weight: torch.Tensor, groups: list[tuple[int, int]], perm: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None) -> Exl2Tensors:
    """Round-to-nearest EXL2 quantization of a (out, in) weight.

    groups: [(bits, rows)] in storage order (bits descending), rows adding up to in_features;
    perm: act-order permutation (quantized row k is input feature perm[k]); identity if None.
    """
    out_f, in_f = weight.shape
    if perm is None:
        perm = torch.arange(in_f)
    wt = weight.float().t()[perm]  # (in, out) in quantization order
    codes = torch.empty(in_f, out_f, dtype=torch.int32)
    scale_codes, scale_max = [], []
    row = 0
    for bits, rows in groups:
        w = wt[row: row + rows]
        sc, smax, scales = group_scales(w, bits)
        q = torch.clamp(torch.round(w / scales + 2 ** (bits - 1)), 0, 2 ** bits - 1)
        codes[row: row + rows] = q.to(torch.int32)
        scale_codes.append(sc)
        scale_max.append(smax)
        row += rows
    return pack_layer(codes, torch.stack(scale_codes), torch.stack(scale_max), groups, perm, bias)


def split_groups(in_features: int, bits_mix: list[tuple[int, float]], group_size: int = 32) -> list[tuple[int, int]]:
    """Turn a mix like [(4, 0.9), (8, 0.1)] into (bits, rows) groups of `group_size` rows, bits descending."""
    n_groups = -(-in_features // group_size)
    mix = sorted(bits_mix, key=lambda bp: -bp[0])
    counts = [int(round(p * n_groups)) for _, p in mix]
    counts[-1] = n_groups - sum(counts[:-1])
    out, row = [], 0
    for (bits, _), count in zip(mix, counts):
        for _ in range(max(count, 0)):
            rows = min(group_size, in_features - row)
            if rows <= 0:
                break
            out.append((bits, rows))
            row += rows
    if row < in_features:  # rounding left rows over: give them to the lowest width
        out.append((mix[-1][0], in_features - row))
    merged: list[tuple[int, int]] = []
    for bits, rows in out:
        if merged and merged[-1][0] == bits and merged[-1][1] + rows <= group_size:
            merged[-1] = (bits, merged[-1][1] + rows)
        else:
            merged.append((bits, rows))
    return merged


def tensors_of(key: str, t: Exl2Tensors) -> dict[str, torch.Tensor]:
    out = {f"{key}.q_weight": t.q_weight, f"{key}.q_invperm": t.q_invperm, f"{key}.q_scale": t.q_scale,
           f"{key}.q_scale_max": t.q_scale_max, f"{key}.q_groups": t.q_groups}
    if t.bias is not None:
        out[f"{key}.bias"] = t.bias
    return out


LayerPlan = Callable[[str, torch.Tensor], Exl2Tensors | None]


def write_folder(src: str, dst: str, quantize_layer: LayerPlan, *, bits: float, head_bits: int,
                 quantize_head: bool = True, extra_config: dict | None = None,
                 max_shard_bytes: int = 8 * 2**30) -> str:
    """Compile an EXL2 folder from an fp16 folder: linear layers through `quantize_layer`, the rest as fp16.

    quantize_layer(module_name, weight) returns the layer's EXL2 tensors (None keeps it fp16).
    """
    config = ModelConfig.from_folder(src)
    store = TensorStore(src)
    tensors: dict[str, torch.Tensor] = {}
    for name in store.names():
        t = store.get(name)
        module = name.removesuffix(".weight")
        is_linear = name.endswith(".weight") and (".self_attn." in name or ".mlp." in name) and t.dim() == 2
        if is_linear:
            bias_name = f"{module}.bias"
            bias = store.get(bias_name) if bias_name in store else None
            q = quantize_layer(module, t)
            if q is not None:
                q.bias = None if bias is None else bias.to(torch.float16)
                tensors.update(tensors_of(module, q))
                continue
        if name.endswith(".bias") and f"{name.removesuffix('.bias')}.q_weight" in tensors:
            continue
        tensors[name] = t.to(torch.float16) if t.is_floating_point() else t
    if quantize_head:
        head = store.get("lm_head.weight") if "lm_head.weight" in store else store.get("model.embed_tokens.weight")
        q = quantize_layer("lm_head", head)
        if q is not None:
            tensors.pop("lm_head.weight", None)
            tensors.update(tensors_of("lm_head", q))
    store.close()
    os.makedirs(dst, exist_ok=True)
    _save_sharded(tensors, dst, max_shard_bytes)
    raw = dict(config.raw)
    raw["quantization_config"] = {"quant_method": "exl2", "version": "kestrel-0.1", "bits": bits,
                                  "head_bits": head_bits, **(extra_config or {})}
    raw["torch_dtype"] = "float16"
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
    return dst


def _save_sharded(tensors: dict[str, torch.Tensor], dst: str, max_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += n
    if len(shards) == 1:
        save_file(shards[0], os.path.join(dst, "output.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"output-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(dst, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
