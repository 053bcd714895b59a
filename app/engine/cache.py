"""KV cache: storage of keys and values per layer, and the one formula for its memory.

Layout per layer: keys and values of shape (batch, max_seq_len, num_kv_heads, head_dim). FP16 stores
them as they are. Quantized modes (Q8/Q6/Q4) store `bits`-bit integers plus one fp16 scale per
group of CACHE_GROUP_SIZE elements of one head (per-head grouped, symmetric); the planner's memory
estimate comes from `kv_bytes_per_token` below and from nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import ModelConfig
from .errors import GenerationError

CACHE_MODES: dict[str, int] = {"fp16": 16, "q8": 8, "q6": 6, "q4": 4}
CACHE_GROUP_SIZE = 32
SCALE_BYTES = 2


def kv_bytes_per_token(config: ModelConfig, mode: str = "fp16") -> int:
    """Bytes of KV cache one token takes across all layers (keys and values).

    fp16: 2 bytes per element. Quantized: bits/8 per element, plus an fp16 scale per group of
    CACHE_GROUP_SIZE elements (head_dim is padded up to a whole number of groups).
    """
    if mode not in CACHE_MODES:
        raise GenerationError(f"unknown cache mode {mode!r}", hint=f"Use one of {', '.join(CACHE_MODES)}.")
    bits = CACHE_MODES[mode]
    elems = config.num_kv_heads * config.head_dim
    if bits == 16:
        per_layer_kv = elems * 2
    else:
        groups_per_head = -(-config.head_dim // CACHE_GROUP_SIZE)
        padded = groups_per_head * CACHE_GROUP_SIZE
        per_layer_kv = config.num_kv_heads * (padded * bits // 8 + groups_per_head * SCALE_BYTES)
    return 2 * config.num_layers * per_layer_kv


def check_room(end: int, max_seq_len: int) -> int:
    """`end` if a write ending there fits the cache, else the error every cache mode raises."""
    if end > max_seq_len:
        raise GenerationError(
            f"context is full ({end} > {max_seq_len} tokens)",
            hint="Start a new chat, shorten the prompt or load the model with a longer context.")
    return end


@dataclass
class KVCache:
    """Static FP16 cache: preallocated, written in place; `length` tokens are valid."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    max_seq_len: int
    length: int = 0
    mode: str = "fp16"

    @classmethod
    def allocate(cls, config: ModelConfig, max_seq_len: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float16, batch: int = 1, mode: str = "fp16",
                 rope: Any = None) -> KVCache:
        """FP16 gives this class; q8/q6/q4 give a QuantKVCache (app/engine/kv_quant.py), same contract.
        rope: the model's (start, length) -> (cos, sin), which quantized caches use to centre keys."""
        if mode not in CACHE_MODES:
            raise GenerationError(f"unknown cache mode {mode!r}", hint=f"Use one of {', '.join(CACHE_MODES)}.")
        if mode != "fp16":
            from .kv_quant import QuantKVCache

            return QuantKVCache(config.num_layers, config.num_kv_heads, config.head_dim,  # type: ignore[return-value]
                                max_seq_len, CACHE_MODES[mode], mode, device, dtype, batch, rope=rope)
        shape = (batch, max_seq_len, config.num_kv_heads, config.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        return cls(keys, values, max_seq_len, 0, mode)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def reset(self) -> None:
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget everything after `length` tokens (used to reuse a cached prefix)."""
        self.length = min(self.length, max(0, length))

    def decode_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where Transformer.decode_step writes a token's k/v and attention reads them: the cache itself."""
        return self.keys[layer], self.values[layer]

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (batch, seq, heads, dim) at `start` and return views of the whole valid span."""
        end = check_room(start + k.shape[1], self.max_seq_len)
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]
