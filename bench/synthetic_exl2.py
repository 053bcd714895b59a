"""Synthetic EXL2 folders of real model shapes, for speed and memory measurements without downloads.

The packed data is random but valid: every group has a legal width and row offset, scale codes are
1..16, the act-order permutation is a real permutation, so Kestrel and exllamav2 both load the folder
and run it at the speed the real model would run (the values only decide what text comes out). Bit
widths follow a realistic 4.0 bpw mix: attention mostly 4-bit with some 5-bit groups, MLP mostly
4-bit with some 3-bit groups, a 6-bit head; the achieved average is printed and stored in the config.

usage: python bench/synthetic_exl2.py OUT_DIR [--shape llama3-8b] [--tokenizer-from FOLDER]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.exl2 import Exl2Tensors, pack_scales  # noqa: E402
from app.engine.exl2_writer import TOKENIZER_FILES, _save_sharded, split_groups, tensors_of  # noqa: E402

SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                  "rope_theta": 500000.0, "max_position_embeddings": 8192},
    "tiny": {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 640, "vocab_size": 1000, "rope_theta": 10000.0, "max_position_embeddings": 512},
    "llama3.2-1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
                    "rope_theta": 500000.0, "max_position_embeddings": 8192},
}
ATTN_MIX = [(5, 0.1), (4, 0.9)]
MLP_MIX = [(4, 0.8), (3, 0.2)]
HEAD_MIX = [(6, 1.0)]


def random_layer(k: int, n: int, mix: list[tuple[int, float]], gen: torch.Generator) -> Exl2Tensors:
    groups = split_groups(k, mix)
    q_groups, qrow = [], 0
    for bits, rows in groups:
        q_groups += [bits, qrow]
        qrow += rows * bits // 32  # hidden sizes are multiples of 32: whole groups
    q_weight = torch.randint(-2**31, 2**31 - 1, (qrow, n), generator=gen, dtype=torch.int64).to(torch.int32)
    # small scales keep activations finite through dozens of random layers
    return Exl2Tensors(
        q_weight=q_weight, q_invperm=torch.argsort(torch.randperm(k, generator=gen)).to(torch.int32),
        q_scale=pack_scales(torch.randint(1, 17, (len(groups), n), generator=gen)),
        q_scale_max=torch.full((len(groups),), 0.0015, dtype=torch.float16),
        q_groups=torch.tensor(q_groups, dtype=torch.int16))


def stored_bits(t: Exl2Tensors) -> int:
    return sum(x.numel() * x.element_size() * 8 for x in (t.q_weight, t.q_invperm, t.q_scale, t.q_scale_max, t.q_groups))


def build(out: str, shape: str = "llama3-8b", tokenizer_from: str | None = None, seed: int = 0) -> dict:
    cfg = SHAPES[shape]
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    bits = weights = 0
    modules = {"self_attn.q_proj": (h, h, ATTN_MIX), "self_attn.k_proj": (h, kv, ATTN_MIX),
               "self_attn.v_proj": (h, kv, ATTN_MIX), "self_attn.o_proj": (h, h, ATTN_MIX),
               "mlp.gate_proj": (h, inter, MLP_MIX), "mlp.up_proj": (h, inter, MLP_MIX),
               "mlp.down_proj": (inter, h, MLP_MIX)}
    for i in range(layers):
        for name, (k, n, mix) in modules.items():
            t = random_layer(k, n, mix, gen)
            tensors.update(tensors_of(f"model.layers.{i}.{name}", t))
            bits += stored_bits(t)
            weights += k * n
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16)
    head = random_layer(h, cfg["vocab_size"], HEAD_MIX, gen)
    tensors.update(tensors_of("lm_head", head))
    tensors["model.norm.weight"] = torch.ones(h, dtype=torch.float16)
    tensors["model.embed_tokens.weight"] = (torch.randn(cfg["vocab_size"], h, generator=gen) * 0.02).half()
    bpw = bits / weights
    os.makedirs(out, exist_ok=True)
    _save_sharded(tensors, out, 4 * 2**30)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16",
              "bos_token_id": 1, "eos_token_id": 2, **cfg,
              "quantization_config": {"quant_method": "exl2", "version": "kestrel-synthetic", "bits": round(bpw, 3),
                                      "head_bits": 6}}
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    if tokenizer_from:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_from, name)
            if os.path.isfile(src):
                shutil.copy2(src, os.path.join(out, name))
    return {"folder": out, "shape": shape, "bpw_layers": round(bpw, 3),
            "weight_bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--tokenizer-from", default=None, help="copy tokenizer files from this model folder")
    a = ap.parse_args()
    print(json.dumps(build(a.out, a.shape, a.tokenizer_from)))


if __name__ == "__main__":
    main()
