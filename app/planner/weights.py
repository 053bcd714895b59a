"""Model size without loading anything: safetensors headers, Hub file sizes, or parameter counts.

Header format (safetensors spec): 8-byte little-endian unsigned header length N, then N bytes of JSON
mapping tensor name -> {dtype, shape, data_offsets: [begin, end]} (plus optional "__metadata__").
We read only those bytes; tensor data is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.engine.config import ModelConfig
from app.engine.st_header import model_files, read_header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_safetensors_header(path: str) -> list[TensorInfo]:
    """The tensors one .safetensors file declares, checked for consistency with the file size."""
    return [TensorInfo(e.name, e.dtype, e.shape, e.nbytes) for e in read_header(path).values()]


def safetensors_files(folder: str) -> list[str]:
    """The shards of a model folder: from model.safetensors.index.json when present, else *.safetensors."""
    return model_files(folder)


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
