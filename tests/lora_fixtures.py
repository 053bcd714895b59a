"""Real PEFT adapter folders made in the tests from a known low-rank delta (fixed seed), so the
expected effect of an adapter (W + s * B @ A) can be computed exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

PEFT_PREFIX = "base_model.model."
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def module_dims(config: dict) -> dict[str, tuple[str, int, int]]:
    """projection -> (parent, in_features, out_features) from a config.json dict."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    hd = config.get("head_dim") or h // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    return {"q_proj": ("self_attn", h, q), "k_proj": ("self_attn", h, kv), "v_proj": ("self_attn", h, kv),
            "o_proj": ("self_attn", q, h), "gate_proj": ("mlp", h, inter), "up_proj": ("mlp", h, inter),
            "down_proj": ("mlp", inter, h)}


def write_adapter(folder: str | Path, model_dir: str | Path, *, rank: int = 4, alpha: float = 8.0,
                  rslora: bool = False, targets: tuple[str, ...] = ATTN + MLP, layers: range | None = None,
                  seed: int = 0, strength: float = 1.0, in_override: int | None = None,
                  config_extra: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write adapter_config.json + adapter_model.safetensors; return {module: (A (r, in), B (out, r))}
    in float32 as written (fp16-exact values, so the merged reference matches bit for bit)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    dims = module_dims(config)
    layers = layers if layers is not None else range(config["num_hidden_layers"])
    gen = torch.Generator().manual_seed(seed)
    tensors, factors = {}, {}
    for i in layers:
        for proj in targets:
            parent, fan_in, fan_out = dims[proj]
            fan_in = in_override or fan_in
            a = (torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)).half()
            b = (torch.randn(fan_out, rank, generator=gen) * 0.05 * strength).half()
            module = f"model.layers.{i}.{parent}.{proj}"
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
            factors[module] = (a.float(), b.float())
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(model_dir),
           "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "target_modules": list(targets),
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None}
    cfg.update(config_extra or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return factors


def scale_of(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank
