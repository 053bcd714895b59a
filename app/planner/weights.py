"""Model size without loading anything: safetensors headers, Hub file sizes, or parameter counts.

Header format (safetensors spec): 8-byte little-endian unsigned header length N, then N bytes of JSON
mapping tensor name -> {dtype, shape, data_offsets: [begin, end]} (plus optional "__metadata__").
We read only those bytes; tensor data is never touched.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod

from app.engine.config import ModelConfig
from app.engine.errors import ModelFormatError

DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024
REDOWNLOAD = "Delete the file and download the model again."


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: str) -> list[TensorInfo]:
    """The tensors one .safetensors file declares, checked for consistency with the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError("is too short to be a safetensors file (truncated?)", path=path,
                                       hint=REDOWNLOAD)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelFormatError(f"declares a {n}-byte header in a {size}-byte file: truncated or not "
                                       "safetensors", path=path, hint=REDOWNLOAD)
            raw = f.read(n)
    except OSError as e:
        raise ModelFormatError(f"cannot be read ({e.strerror})", path=path, hint=REDOWNLOAD) from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError("has a header that is not valid JSON", path=path, hint=REDOWNLOAD) from e
    if not isinstance(header, dict):
        raise ModelFormatError("has a header that is not a JSON object", path=path, hint=REDOWNLOAD)
    data_bytes = size - 8 - n
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"tensor {name!r} has a malformed header entry", path=path,
                                   hint=REDOWNLOAD) from e
        if dtype not in DTYPE_BYTES:
            raise ModelFormatError(f"tensor {name!r} has unknown dtype {dtype}", path=path)
        nbytes = prod(shape) * DTYPE_BYTES[dtype]
        if end - begin != nbytes or begin < 0 or end > data_bytes:
            raise ModelFormatError(f"tensor {name!r} ({dtype} {list(shape)}, {nbytes} bytes) has offsets "
                                   f"{begin}..{end} outside or inconsistent with the {data_bytes} data bytes",
                                   path=path, hint=REDOWNLOAD)
        tensors.append(TensorInfo(name, dtype, shape, nbytes))
    return tensors


def safetensors_files(folder: str) -> list[str]:
    """The shards of a model folder: from model.safetensors.index.json when present, else *.safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
            raise ModelFormatError("is not a valid safetensors index", path=index, hint=REDOWNLOAD) from e
        files = [os.path.join(folder, n) for n in names]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise ModelFormatError(f"shard {os.path.basename(missing[0])} named in the index is missing",
                                   path=folder, hint="The download is incomplete; download the model again.")
        return files
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    except OSError as e:
        raise ModelFormatError(f"cannot be listed ({e.strerror})", path=folder) from e
    if not names:
        raise ModelFormatError("holds no .safetensors files", path=folder,
                               hint="Choose a model folder with safetensors weights (EXL2 or fp16/bf16).")
    return [os.path.join(folder, n) for n in names]


def folder_tensor_bytes(folder: str) -> int:
    """Exact bytes of all tensor data in a model folder (what gets copied to the GPU)."""
    return sum(t.nbytes for path in safetensors_files(folder) for t in read_safetensors_header(path))


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by how EXL2 stores them."""

    linear: int       # q/k/v/o/gate/up/down weights of every layer: quantized at the model's bpw
    head: int         # lm_head weight (vocab x hidden): quantized at head_bits
    embedding: int    # embed_tokens (vocab x hidden): always fp16
    other: int        # norms and biases: fp16

    @property
    def total(self) -> int:
        return self.linear + self.head + self.embedding + self.other


def param_counts(config: ModelConfig, *, separate_head: bool | None = None) -> ParamCounts:
    """Count parameters from the geometry. `separate_head` defaults to "not tied": a tied head shares
    the embedding matrix (0 extra), though an EXL2 quantization stores its own quantized copy."""
    c = config
    per_layer_linear = (c.hidden_size * (c.q_dim + 2 * c.kv_dim) + c.q_dim * c.hidden_size
                        + 3 * c.hidden_size * c.intermediate_size)
    per_layer_other = 2 * c.hidden_size
    if c.qkv_bias:
        per_layer_other += c.q_dim + 2 * c.kv_dim
    if c.attention_bias:
        per_layer_other += c.hidden_size
    if c.mlp_bias:
        per_layer_other += 2 * c.intermediate_size + c.hidden_size
    if c.arch.qk_norm:
        per_layer_other += 2 * c.head_dim
    if separate_head is None:
        separate_head = not c.tie_word_embeddings
    vocab_x_hidden = c.vocab_size * c.hidden_size
    return ParamCounts(
        linear=c.num_layers * per_layer_linear,
        head=vocab_x_hidden if separate_head else 0,
        embedding=vocab_x_hidden,
        other=c.num_layers * per_layer_other + c.hidden_size,
    )


def quantized_weight_bytes(config: ModelConfig, bpw: float, head_bits: int) -> int:
    """Bytes of an EXL2 quantization at `bpw` (EXL2's bpw already counts scales, groups and the
    permutation), with the head at `head_bits` and embeddings, norms and biases in fp16.

    A head below 16 bits is always stored (quantized) even when tied; at 16 bits a tied head is shared.
    """
    p = param_counts(config, separate_head=head_bits < 16 or not config.tie_word_embeddings)
    bits = p.linear * bpw + p.head * head_bits + (p.embedding + p.other) * 16
    return int(-(-bits // 8))
