"""bench/synthetic_exl2.py writes folders that our loader reads like any EXL2 model."""

from __future__ import annotations

from pathlib import Path

import torch

from app.engine import load_model
from app.engine.config import ModelConfig
from bench.synthetic_exl2 import build


def test_synthetic_folder_loads_and_runs(tmp_path: Path, smollm2_fp16_dir: str) -> None:
    info = build(str(tmp_path / "tiny"), "tiny", tokenizer_from=smollm2_fp16_dir)
    assert 3.7 < info["bpw_layers"] < 4.4  # the realistic 4.0 bpw mix, scale overhead included
    config = ModelConfig.from_folder(str(tmp_path / "tiny"))
    assert config.quant is not None and config.num_layers == 2 and config.num_kv_heads == 2
    model = load_model(str(tmp_path / "tiny"), "cpu")
    logits = model.forward(torch.tensor([[5, 17, 300, 999]]))
    assert logits.shape == (1, 4, 1000)
    assert torch.isfinite(logits).all()
    # the layers really are mixed-width EXL2: dequantizing the down projection sees 4- and 3-bit groups
    w = model.dequantized_weight("model.layers.0.mlp.down_proj")
    assert w.shape == (256, 640) and w.abs().max() > 0
    assert (tmp_path / "tiny" / "tokenizer.json").is_file()
