"""Loading model folders: EXL2 (any mix of 2-8 bit groups, act-order, quantized or fp16 head) and
plain fp16/bf16 Hugging Face folders, into the one Transformer definition.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from .backend import Linear, TorchBackend
from .config import ModelConfig
from .errors import KestrelError, ModelFormatError, OutOfMemoryError
from .exl2 import EXL2_SUFFIXES, Exl2Tensors
from .model import ATTN_PROJ, MLP_PROJ, Layer, Transformer
from .safetensors_io import TensorStore

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KestrelError("CUDA was asked for but no NVIDIA GPU is usable here",
                           hint="Run with --device cpu, or check the driver with `python main.py doctor`.")
    return dev


def compute_dtype(device: torch.device, config: ModelConfig) -> torch.dtype:
    """fp16 on the GPU (bf16 for bf16 fp checkpoints); float32 on the CPU, where fp16 math is slow."""
    if device.type == "cpu":
        return torch.float32
    if config.quant is None and config.torch_dtype == "bfloat16":
        return torch.bfloat16
    return torch.float16


def make_backend(device: torch.device, dtype: torch.dtype, name: str | None = None) -> TorchBackend:
    """Pick the fastest backend available for the device (the CUDA extension when it is built)."""
    if name in (None, "auto", "cuda") and device.type == "cuda":
        try:
            from .cuda_backend import CudaBackend, extension_status
        except ImportError:
            pass
        else:
            ok, why = extension_status()
            if ok:
                return CudaBackend(device, dtype)
            if name == "cuda":
                raise KestrelError(f"the CUDA backend is not available: {why}")
            # one line, shown by default: the GPU runs, but slower than it could
            log.warning("Kestrel's CUDA kernels are not available (%s); using the pure-PyTorch path", why)
    return TorchBackend(device, dtype)


def _load_linear(store: TensorStore, key: str, in_f: int, out_f: int, bias: bool) -> Linear:
    """Read one linear layer, quantized or dense, checking shapes against config.json."""
    if f"{key}.q_weight" in store:
        parts = {}
        for suffix in EXL2_SUFFIXES:
            parts[suffix] = store.get(f"{key}.{suffix}")
        b = store.get(f"{key}.bias", (out_f,)) if f"{key}.bias" in store else None
        t = Exl2Tensors(bias=b, **parts)
        try:
            t.groups(in_f)
            if t.q_invperm.shape != (in_f,) or t.q_weight.shape[1] < out_f:
                raise ModelFormatError(
                    f"q_weight {list(t.q_weight.shape)} / q_invperm {list(t.q_invperm.shape)} do not fit a "
                    f"{in_f}x{out_f} layer")
        except ModelFormatError as e:
            raise ModelFormatError(f"EXL2 layer {key}: {e}", path=store.entries[f"{key}.q_weight"].file,
                                   hint="The file is damaged or belongs to another model; download it again.") from e
        bits = t.q_weight.numel() * 32 + t.q_scale.numel() * 32 + t.q_scale_max.numel() * 16
        return Linear(key, in_f, out_f, exl2=t, bits_per_weight=bits / (in_f * out_f))
    w = store.get(f"{key}.weight", (out_f, in_f))
    b = store.get(f"{key}.bias", (out_f,)) if bias or f"{key}.bias" in store else None
    return Linear(key, in_f, out_f, weight=w, bias=b)


def load_model(path: str, device: str | torch.device | None = "cpu", *, backend: str | None = None,
               progress: Progress | None = None) -> Transformer:
    """Load an EXL2 or fp16/bf16 model folder; every problem becomes a KestrelError naming the file."""
    if not os.path.isdir(path):
        raise ModelFormatError("is not a folder", path=path, hint="Pick the folder that holds config.json.")
    config = ModelConfig.from_folder(path)
    store = TensorStore(path)
    dev = resolve_device(device)
    dtype = compute_dtype(dev, config)
    be = make_backend(dev, dtype, backend)
    c = config
    report = progress or (lambda _f, _m: None)
    try:
        embed = store.get("model.embed_tokens.weight", (c.vocab_size, c.hidden_size))
        embed = embed.to(device=dev, dtype=dtype)
        layers: list[Layer] = []
        for i in range(c.num_layers):
            report(i / (c.num_layers + 1), f"layer {i + 1}/{c.num_layers}")
            p = f"model.layers.{i}"
            dims = {"q_proj": (c.hidden_size, c.q_dim), "k_proj": (c.hidden_size, c.kv_dim),
                    "v_proj": (c.hidden_size, c.kv_dim), "o_proj": (c.q_dim, c.hidden_size),
                    "gate_proj": (c.hidden_size, c.intermediate_size),
                    "up_proj": (c.hidden_size, c.intermediate_size),
                    "down_proj": (c.intermediate_size, c.hidden_size)}
            lins = {}
            for name in ATTN_PROJ:
                lins[name] = be.prepare_linear(_load_linear(
                    store, f"{p}.self_attn.{name}", *dims[name], c.qkv_bias and name != "o_proj"))
            for name in MLP_PROJ:
                lins[name] = be.prepare_linear(_load_linear(store, f"{p}.mlp.{name}", *dims[name], c.mlp_bias))
            norm_kw = {}
            if c.arch.qk_norm:
                norm_kw = {"q_norm": store.get(f"{p}.self_attn.q_norm.weight", (c.head_dim,)).to(dev),
                           "k_norm": store.get(f"{p}.self_attn.k_norm.weight", (c.head_dim,)).to(dev)}
            layers.append(Layer(
                input_norm=store.get(f"{p}.input_layernorm.weight", (c.hidden_size,)).to(dev),
                post_norm=store.get(f"{p}.post_attention_layernorm.weight", (c.hidden_size,)).to(dev),
                **lins, **norm_kw))
        norm = store.get("model.norm.weight", (c.hidden_size,)).to(dev)
        if "lm_head.q_weight" in store or "lm_head.weight" in store:
            head = _load_linear(store, "lm_head", c.hidden_size, c.vocab_size, False)
        elif c.tie_word_embeddings:
            head = Linear("lm_head", c.hidden_size, c.vocab_size, weight=embed)
        else:
            raise ModelFormatError("lm_head is missing and tie_word_embeddings is false", path=path,
                                   hint="The model folder is incomplete; download it again.")
        head = be.prepare_linear(head)
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemoryError("the model does not fit in GPU memory", path=path,
                               hint="Pick a lower-bpw version, a smaller model, or close other GPU programs.") from e
    finally:
        store.close()
    report(1.0, "loaded")
    return Transformer(config, embed, layers, norm, head, be, path)
