"""Bit-exact reading of tensors written by exllamav2's own converter.

tests/data/exllamav2_ref/ holds the packed tensors of nine modules of SmolLM2-135M-Instruct as
exllamav2 0.3.2's converter wrote them (4.0 bpw, H100), with the sha256 of the fp16 weights
exllamav2 reconstructs from them (bench/device_reference.py made both on the device). The head's
packed tensors are too large to keep here; its bit-exactness is checked on the device.

exllamav2 drops the down projection's act-order permutation at load and remaps the gate/up outputs
instead (an equivalent basis); its reconstruction of MLP layers is therefore in that basis, and so
is our comparison.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app.engine.exl2 import Exl2Tensors

DATA = Path(__file__).parent / "data" / "exllamav2_ref"
SHAPES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
          "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def load(key: str) -> Exl2Tensors:
    with safe_open(str(DATA / "exllamav2_ref_tensors.safetensors"), "pt") as f:
        return Exl2Tensors(**{s: f.get_tensor(f"{key}.{s}") for s in
                              ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")})


def dequant(key: str) -> torch.Tensor:
    in_f, out_f = SHAPES[key.rsplit(".", 1)[1]]
    return load(key).dequantize(in_f, out_f)


HASHES = json.loads((DATA / "exllamav2_ref_dq_sha256.json").read_text())


@pytest.mark.parametrize("key", [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")])
def test_attention_weights_bit_exact(key: str) -> None:
    assert sha(dequant(key)) == HASHES[key]


@pytest.mark.parametrize("layer", [0, 29])
def test_down_proj_bit_exact_in_quantized_row_order(layer: int) -> None:
    key = f"model.layers.{layer}.mlp.down_proj"
    perm = torch.argsort(load(key).q_invperm.long())
    assert sha(dequant(key)[:, perm]) == HASHES[key]


@pytest.mark.parametrize("proj", ["gate_proj", "up_proj"])
def test_gate_up_bit_exact_with_outputs_remapped(proj: str) -> None:
    perm_down = torch.argsort(load("model.layers.0.mlp.down_proj").q_invperm.long())
    key = f"model.layers.0.mlp.{proj}"
    assert sha(dequant(key)[perm_down]) == HASHES[key]


def test_a_single_flipped_bit_is_detected() -> None:
    """The hash comparison is sensitive: changing one packed word changes the result."""
    key = "model.layers.0.self_attn.q_proj"
    t = load(key)
    t.q_weight[0, 0] ^= 1
    assert sha(t.dequantize(576, 576)) != HASHES[key]
