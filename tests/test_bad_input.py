"""Broken model folders raise our own errors, naming the file, the problem and the remedy."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from app.engine import load_model
from app.engine.errors import ConfigError, KestrelError, ModelFormatError, UnsupportedArchitectureError

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "vocab_size": 32, "tie_word_embeddings": True}


def tiny_folder(path, config=CONFIG, drop=(), reshape=None) -> str:
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    h, i, kv = 16, 24, 8
    shapes = {"model.embed_tokens.weight": (32, h), "model.norm.weight": (h,),
              "model.layers.0.input_layernorm.weight": (h,),
              "model.layers.0.post_attention_layernorm.weight": (h,),
              "model.layers.0.self_attn.q_proj.weight": (h, h), "model.layers.0.self_attn.k_proj.weight": (kv, h),
              "model.layers.0.self_attn.v_proj.weight": (kv, h), "model.layers.0.self_attn.o_proj.weight": (h, h),
              "model.layers.0.mlp.gate_proj.weight": (i, h), "model.layers.0.mlp.up_proj.weight": (i, h),
              "model.layers.0.mlp.down_proj.weight": (h, i)}
    if reshape:
        shapes.update(reshape)
    tensors = {k: torch.randn(s, generator=g).half() for k, s in shapes.items() if k not in drop}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def test_tiny_folder_loads(tmp_path) -> None:
    m = load_model(tiny_folder(tmp_path / "ok"))
    assert m.forward(torch.tensor([[1, 2, 3]])).shape == (1, 3, 32)


def test_missing_folder_and_missing_config(tmp_path) -> None:
    with pytest.raises(ModelFormatError, match="not a folder"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_missing_safetensors(tmp_path) -> None:
    d = tiny_folder(tmp_path / "m")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(ModelFormatError, match="no .safetensors"):
        load_model(d)


def test_truncated_file_names_the_file(tmp_path) -> None:
    d = tiny_folder(tmp_path / "m")
    p = os.path.join(d, "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    with pytest.raises(ModelFormatError, match="truncated") as e:
        load_model(d)
    assert "model.safetensors" in str(e.value) and "download" in str(e.value).lower()


def test_header_that_lies_about_sizes(tmp_path) -> None:
    d = tiny_folder(tmp_path / "m")
    p = os.path.join(d, "model.safetensors")
    raw = open(p, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8: 8 + n])
    header["model.norm.weight"]["shape"] = [17]  # 34 bytes claimed, 32 stored
    new = json.dumps(header).encode()
    open(p, "wb").write(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(ModelFormatError, match="model.norm.weight"):
        load_model(d)


def test_header_length_beyond_file(tmp_path) -> None:
    p = tmp_path / "m"
    d = tiny_folder(p)
    f = os.path.join(d, "model.safetensors")
    raw = open(f, "rb").read()
    open(f, "wb").write(struct.pack("<Q", 10**9) + raw[8:])
    with pytest.raises(ModelFormatError, match="header length"):
        load_model(d)


def test_wrong_shape_names_tensor_and_config(tmp_path) -> None:
    d = tiny_folder(tmp_path / "m", reshape={"model.layers.0.mlp.up_proj.weight": (20, 16)})
    with pytest.raises(ModelFormatError, match="up_proj.weight.*config.json"):
        load_model(d)


def test_missing_tensor(tmp_path) -> None:
    d = tiny_folder(tmp_path / "m", drop=("model.layers.0.self_attn.k_proj.weight",))
    with pytest.raises(ModelFormatError, match="k_proj.weight.*missing"):
        load_model(d)


def test_unknown_architecture(tmp_path) -> None:
    d = tiny_folder(tmp_path / "m", config={**CONFIG, "architectures": ["GPTNeoXForCausalLM"]})
    with pytest.raises(UnsupportedArchitectureError, match="GPTNeoXForCausalLM.*Kestrel runs"):
        load_model(d)


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_config_without_required_field(tmp_path, field) -> None:
    cfg = {k: v for k, v in CONFIG.items() if k != field}
    d = tiny_folder(tmp_path / "m", config=cfg)
    with pytest.raises(ConfigError, match=field):
        load_model(d)


def test_config_not_json(tmp_path) -> None:
    d = tiny_folder(tmp_path / "m")
    open(os.path.join(d, "config.json"), "w").write("{not json")
    with pytest.raises(ConfigError, match="JSON"):
        load_model(d)


def test_damaged_exl2_groups(tmp_path, smollm2_exl2_mixed) -> None:
    """An EXL2 layer whose q_groups do not fit its q_weight is reported with the layer's name."""
    from safetensors import safe_open

    d = tmp_path / "exl2"
    shutil.copytree(smollm2_exl2_mixed, d)
    p = d / "output.safetensors"
    with safe_open(str(p), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.self_attn.q_proj.q_groups"][0] = 7
    save_file(tensors, str(p))
    with pytest.raises(ModelFormatError, match="model.layers.0.self_attn.q_proj"):
        load_model(str(d))


def test_errors_are_kestrel_errors() -> None:
    assert issubclass(ModelFormatError, KestrelError) and issubclass(ConfigError, ModelFormatError)
