"""EXL2 folders made from the fp16 SmolLM2 fixture by our own writer, cached beside it.

`mixed`: every layer gets a different mix of bit widths so that all of 2/3/4/5/6/8 appear, each
layer an act-order permutation, and a 6-bit quantized head. `q8`: 8-bit everywhere (the model must
still answer like the fp16 one). Each is built once per cache version.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from app.engine.exl2_writer import quantize_rtn, split_groups, write_folder

VERSION = "v2"
MIXES = [
    [(8, 0.25), (4, 0.75)],
    [(6, 0.5), (3, 0.5)],
    [(5, 0.5), (4, 0.5)],
    [(4, 0.5), (2, 0.5)],
    [(8, 0.1), (6, 0.2), (5, 0.2), (4, 0.2), (3, 0.2), (2, 0.1)],
    [(5, 1.0)],
    [(3, 1.0)],
    [(6, 1.0)],
]


def _layer_index(module: str) -> int:
    parts = module.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else -1


def mixed_plan(module: str, weight: torch.Tensor):
    in_f = weight.shape[1]
    if module == "lm_head":
        return quantize_rtn(weight, split_groups(in_f, [(6, 1.0)]))
    i = _layer_index(module)
    proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].index(module.split(".")[-1])
    mix = MIXES[(i + proj) % len(MIXES)]
    gen = torch.Generator().manual_seed(1000 * i + proj)
    perm = torch.randperm(in_f, generator=gen)
    return quantize_rtn(weight, split_groups(in_f, mix), perm)


def q8_plan(module: str, weight: torch.Tensor):
    in_f = weight.shape[1]
    gen = torch.Generator().manual_seed(_layer_index(module) + 7)
    return quantize_rtn(weight, split_groups(in_f, [(8, 1.0)]), torch.randperm(in_f, generator=gen))


def b4_plan(module: str, weight: torch.Tensor):
    """About 4.1 bpw: 4-bit groups with a tenth at 8 bits, act-order, 6-bit head (a typical 4.0 file)."""
    in_f = weight.shape[1]
    if module == "lm_head":
        return quantize_rtn(weight, split_groups(in_f, [(6, 1.0)]))
    gen = torch.Generator().manual_seed(_layer_index(module) + 11)
    return quantize_rtn(weight, split_groups(in_f, [(8, 0.1), (4, 0.9)]), torch.randperm(in_f, generator=gen))


PLANS = {"mixed": (mixed_plan, 4.3, 6), "q8": (q8_plan, 8.0, 8), "b4": (b4_plan, 4.4, 6)}


def build(fp16_dir: str, cache: Path, name: str) -> str:
    out = cache / f"smollm2-exl2-{name}-{VERSION}"
    if (out / ".complete").exists():
        return str(out)
    plan, bits, head_bits = PLANS[name]
    tmp = Path(str(out) + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    write_folder(fp16_dir, str(tmp), plan, bits=bits, head_bits=head_bits)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    (out / ".complete").write_text("ok\n")
    return str(out)
