"""A bounded LRU of KV caches, one per recent conversation, so switching chats keeps their prefixes.

Each slot is a whole KV cache (max_seq_len tokens) plus the token ids it holds. A request goes to
the slot sharing the longest prefix with it when that request continues most of what the slot holds
(the next turn, a regenerate, an edit late in the chat); otherwise it is a different conversation
(or an edit near its start) and takes an empty slot, a new one while there is room, else the least recently
used one. Memory: `slots` caches of max_seq_len tokens each, allocated only when a second (third, ...)
conversation comes, and only while SLOT_HEADROOM stays free on the GPU; otherwise the oldest slot is
reused, so the planner can count one slot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_CACHE_SLOTS = 2
SLOT_HEADROOM = 1 << 30  # GPU memory that must stay free after adding a slot (prefill activations)
SAME_CONVERSATION_SHARE = 0.5  # a request continuing this share of a slot's tokens reuses that slot


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class CacheSlot:
    cache: Any = None                  # KVCache (or QuantKVCache); None until first used
    ids: list[int] = field(default_factory=list)
    used: int = 0                      # request counter at last use (bigger = more recent)


def choose_slot(slots: list[CacheSlot], ids: list[int], capacity: int) -> tuple[int | None, int]:
    """(index of the slot to use, or None for a new one; tokens of it that can be kept)."""
    best, best_keep = None, -1
    for i, slot in enumerate(slots):
        keep = common_prefix(slot.ids, ids)
        if keep > best_keep:
            best, best_keep = i, keep
    if best is not None and best_keep >= SAME_CONVERSATION_SHARE * len(slots[best].ids):
        return best, best_keep
    empty = [i for i, slot in enumerate(slots) if not slot.ids]
    if empty:
        return empty[0], 0
    if len(slots) < capacity:
        return None, 0
    lru = min(range(len(slots)), key=lambda i: slots[i].used)
    return lru, common_prefix(slots[lru].ids, ids)


def slot_fits(model: Any, max_seq_len: int, mode: str) -> bool:
    """Whether one more cache of max_seq_len tokens leaves SLOT_HEADROOM free on the model's GPU
    (always True on the CPU). Extra slots are a convenience: never worth an out-of-memory later."""
    import torch

    from .cache import kv_bytes_per_token

    if model.device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(model.device)
    need = max_seq_len * kv_bytes_per_token(model.config, mode)
    if mode != "fp16":
        need += 2 * max_seq_len * model.config.kv_dim * 2  # its fp16 read-back buffers
    return free >= need + SLOT_HEADROOM
