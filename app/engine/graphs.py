"""The single-token decode step captured in a CUDA graph and replayed.

A decode step launches a few hundred small kernels; launched one by one from Python they cost far
more CPU time than the GPU spends running them (docs/MEASUREMENTS.md). Transformer.decode_step reads
the token and its position from device tensors, so one capture serves every position: a replay only
rewrites two small static inputs. A graph is bound to the cache tensors it was captured with.
"""

from __future__ import annotations

import logging
import os

import torch

from .cache import KVCache
from .model import Transformer

log = logging.getLogger(__name__)


def graphs_enabled(model: Transformer, cache: KVCache) -> bool:
    """Graphs need a CUDA device and an fp16/bf16 cache; KESTREL_CUDA_GRAPHS=0 turns them off."""
    return (model.device.type == "cuda" and cache.mode == "fp16"
            and os.environ.get("KESTREL_CUDA_GRAPHS", "1") != "0")


class DecodeGraph:
    """decode_step(token, pos) of one model on one cache (batch 1), captured once."""

    def __init__(self, model: Transformer, cache: KVCache) -> None:
        self.model = model
        self.cache = cache
        dev = model.device
        self.tokens = torch.zeros((1, 1), dtype=torch.int64, device=dev)
        # Warm-up and capture write k/v at the last slot, which holds nothing valid until the cache
        # is full, and which the step at that position overwrites first anyway.
        self.pos = torch.full((1,), cache.max_seq_len - 1, dtype=torch.int32, device=dev)
        self.tables = model.prepare_decode(cache.max_seq_len)  # held: the graph reads them by address
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, allocator) outside the capture
                model.decode_step(self.tokens, self.pos, cache)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, self.pos, cache)
        log.info("captured the decode step in a CUDA graph (%d-token cache)", cache.max_seq_len)

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (vocab,) float32 for `token` at `pos`; also sets the cache's length to pos + 1."""
        self.tokens.fill_(token)
        self.pos.fill_(pos)
        self.graph.replay()
        self.cache.length = pos + 1
        return self.logits[0].clone()  # the static output is overwritten by the next replay
