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
    """Graphs need a CUDA device, and for a quantized cache the backend's kernel for it (positions
    read on the device); KESTREL_CUDA_GRAPHS=0 turns them off."""
    fits = cache.mode == "fp16" or getattr(model.backend, "fused_kv_quant", False)
    return model.device.type == "cuda" and fits and os.environ.get("KESTREL_CUDA_GRAPHS", "1") != "0"


class SharedRows:
    """One sequence's fp16 cache seen as `rows` rows (stride 0 over the batch): decode_step over rows
    at consecutive positions then checks drafted tokens in one step, each row writing its own
    position and attending to the positions up to its own, which the rows before it have written."""

    mode = "fp16"

    def __init__(self, cache: KVCache, rows: int) -> None:
        self.cache = cache
        self.rows = rows
        self.max_seq_len = cache.max_seq_len

    def decode_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (self.cache.keys[layer].expand(self.rows, -1, -1, -1),
                self.cache.values[layer].expand(self.rows, -1, -1, -1))


class DecodeGraph:
    """decode_step of one model on one cache, captured once: one token (rows=1), or `rows` tokens of
    the same sequence at consecutive positions (the check of speculative drafts, fp16 caches)."""

    def __init__(self, model: Transformer, cache: KVCache, rows: int = 1) -> None:
        self.model = model
        self.cache = cache
        self.rows = rows
        dev = model.device
        self.tokens = torch.zeros((rows, 1), dtype=torch.int64, device=dev)
        # Warm-up and capture write k/v at the last slots, which hold nothing valid until the cache
        # is full, and which the step at those positions overwrites first anyway.
        last = cache.max_seq_len - rows
        self.pos = torch.arange(last, last + rows, dtype=torch.int32, device=dev)
        self.steps = torch.arange(rows, dtype=torch.int32, device=dev)
        self.tables = model.prepare_decode(cache.max_seq_len)  # held: the graph reads them by address
        view = cache if rows == 1 else SharedRows(cache, rows)
        # a quantized cache also copies the token into an exact sink/recent slot: keep those as they are
        exact = getattr(cache, "exact_tensors", list)()
        saved = [t.clone() for t in exact]
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # lazy initialisation (cuBLAS handles, allocator) outside the capture
                model.decode_step(self.tokens, self.pos, view)  # type: ignore[arg-type]
        torch.cuda.current_stream(dev).wait_stream(side)
        for t, kept in zip(exact, saved):
            t.copy_(kept)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model.decode_step(self.tokens, self.pos, view)  # type: ignore[arg-type]
        log.info("captured the decode step in a CUDA graph (%d row(s), %d-token cache)", rows, cache.max_seq_len)

    def ready(self, pos: int) -> bool:
        """Whether a replay at `pos` is right: always for fp16; a quantized cache after a truncate or a
        one-token first write needs one eager step first (QuantKVCache.decode_ready)."""
        return self.cache.mode == "fp16" or self.cache.decode_ready(pos)  # type: ignore[attr-defined]

    def step(self, token: int, pos: int) -> torch.Tensor:
        """Logits (vocab,) float32 for `token` at `pos`; also sets the cache's length to pos + 1."""
        return self.step_many([token], pos)[0]

    def step_many(self, ids: list[int], pos: int) -> torch.Tensor:
        """Logits (rows, vocab) float32 for ids (`rows` of them) at pos, pos + 1, ...; sets the
        cache's length to pos + rows."""
        if len(ids) == 1:
            self.tokens.fill_(ids[0])
            self.pos.fill_(pos)
        else:
            self.tokens.copy_(torch.tensor(ids, dtype=torch.int64).view(-1, 1), non_blocking=True)
            torch.add(self.steps, pos, out=self.pos)
        self.graph.replay()
        self.cache.length = pos + self.rows
        if self.cache.mode != "fp16":
            self.cache.decoded(pos)  # type: ignore[attr-defined]
        return self.logits.clone()  # the static output is overwritten by the next replay
