"""Paged KV cache: one pool of fixed-size pages for all layers, shared by many sequences.

Why pages: continuous batching runs many requests of different lengths at once; a per-request
contiguous cache would waste the gap between each request's length and the longest one. A page holds
`page_size` consecutive token positions of keys and values for every layer; a sequence's page table
lists its pages in order, so position p lives in slot `pages[p // page_size] * page_size + p % page_size`.

Shared prefixes: once a page is full, its content depends only on the tokens up to its end, so it is
registered under a hash of the whole token prefix (chained page by page). A new sequence whose prompt
starts with the same full pages takes those pages (refcount + 1) instead of computing them again. Full
pages are never written again, so sharing needs no copy-on-write; the one exception is `truncate`
back into a full page (banned-string rollback), which first copies that page to a private one.

Recycling: a page whose refcount drops to 0 keeps its content and hash and goes to an LRU list; new
pages come from never-hashed pages first, then from the least recently freed hashed page. So the
prefix of a conversation that just finished stays reusable until the pool really needs the room.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .config import ModelConfig
from .errors import GenerationError

DEFAULT_PAGE_SIZE = 32
_ROOT = b"kestrel-page-root"


def page_hash(previous: bytes, tokens: list[int]) -> bytes:
    """Hash of a full page given the hash of everything before it: equal iff the whole prefix is."""
    h = hashlib.blake2b(previous, digest_size=16)
    h.update(b"".join(t.to_bytes(4, "little", signed=False) for t in tokens))
    return h.digest()


@dataclass
class PagedSequence:
    """One sequence's view of the pool: its pages in order and the tokens whose K/V they hold."""

    pages: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # ids whose K/V are written (length = len(tokens))
    hashes: list[bytes] = field(default_factory=list)  # chained hash of each full page, in order
    reused: int = 0  # tokens taken from shared pages at allocation (not computed for this sequence)

    @property
    def length(self) -> int:
        return len(self.tokens)


class PagedKVCache:
    """The pool. Not thread-safe: one engine thread owns it (the batching scheduler)."""

    def __init__(self, config: ModelConfig, num_tokens: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float16, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        if page_size < 1 or num_tokens < page_size:
            raise GenerationError(f"a paged cache of {num_tokens} tokens cannot hold one page of {page_size}",
                                  hint="Give the server a larger cache size.")
        self.config = config
        self.page_size = page_size
        self.num_pages = num_tokens // page_size
        slots = self.num_pages * page_size
        shape = (config.num_layers, slots, config.num_kv_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.device = self.keys.device
        self.refcount = [0] * self.num_pages
        self._hash_of: dict[int, bytes] = {}  # page -> registered prefix hash
        self._page_of: dict[bytes, int] = {}  # prefix hash -> page
        self._blank: list[int] = list(range(self.num_pages - 1, -1, -1))  # free, nothing reusable
        self._cached: OrderedDict[int, None] = OrderedDict()  # free but hashed, least recent first

    # --- accounting ----------------------------------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._blank) + len(self._cached)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def _take_page(self) -> int:
        if self._blank:
            page = self._blank.pop()
        elif self._cached:
            page, _ = self._cached.popitem(last=False)
            del self._page_of[self._hash_of.pop(page)]
        else:
            raise GenerationError("the paged KV cache is full", hint="Wait for other requests or enlarge the cache.")
        self.refcount[page] = 1
        return page

    def _release_page(self, page: int) -> None:
        self.refcount[page] -= 1
        if self.refcount[page] > 0:
            return
        if page in self._hash_of:
            self._cached[page] = None  # most recently freed: evicted last
        else:
            self._blank.append(page)

    def _acquire_shared(self, page: int) -> None:
        if self.refcount[page] == 0:
            self._cached.pop(page, None)
        self.refcount[page] += 1

    # --- sequences -----------------------------------------------------------------------------

    def _shareable(self, prompt: list[int]) -> list[int]:
        """Pages holding the leading full pages of `prompt`; the last prompt token is always left to
        compute, so its logits exist."""
        limit = (len(prompt) - 1) // self.page_size
        prev, p, pages = _ROOT, self.page_size, []
        while len(pages) < limit:
            prev = page_hash(prev, prompt[len(pages) * p:(len(pages) + 1) * p])
            page = self._page_of.get(prev)
            if page is None:
                break
            pages.append(page)
        return pages

    def can_allocate(self, prompt: list[int], total_tokens: int) -> bool:
        """Whether `allocate(prompt, total_tokens)` would find room now."""
        shared = self._shareable(prompt)
        idle_shared = sum(1 for page in shared if self.refcount[page] == 0)
        return self.pages_for(total_tokens) - len(shared) + idle_shared <= self.free_pages

    def allocate(self, prompt: list[int], total_tokens: int) -> PagedSequence:
        """A sequence for `prompt` with pages for `total_tokens` positions, sharing every full prompt
        page the pool already holds; seq.length says how many prompt tokens are already in place."""
        if not self.can_allocate(prompt, total_tokens):
            raise GenerationError(f"the paged KV cache has {self.free_pages} free pages, too few for "
                                  f"{total_tokens} tokens", hint="Wait for other requests or enlarge the cache.")
        seq = PagedSequence()
        for page in self._shareable(prompt):
            self._acquire_shared(page)
            seq.pages.append(page)
            seq.hashes.append(self._hash_of[page])
        seq.tokens = list(prompt[:len(seq.pages) * self.page_size])
        seq.reused = len(seq.tokens)
        for _ in range(self.pages_for(total_tokens) - len(seq.pages)):
            seq.pages.append(self._take_page())
        return seq

    def free(self, seq: PagedSequence) -> None:
        """Give the sequence's pages back; full pages stay reusable until evicted (LRU)."""
        for page in seq.pages:
            self._release_page(page)
        seq.pages, seq.tokens, seq.hashes = [], [], []

    def truncate(self, seq: PagedSequence, length: int) -> None:
        """Forget positions from `length` on (pages stay reserved). A full page cut into is copied to a
        private page first, since others may share it."""
        if length >= seq.length:
            return
        seq.tokens = seq.tokens[:length]
        full = length // self.page_size
        for i in range(full, len(seq.hashes)):
            page = seq.pages[i]
            if i == full and length % self.page_size:
                fresh = self._take_page()
                src = slice(page * self.page_size, (page + 1) * self.page_size)
                dst = slice(fresh * self.page_size, (fresh + 1) * self.page_size)
                self.keys[:, dst] = self.keys[:, src]
                self.values[:, dst] = self.values[:, src]
                seq.pages[i] = fresh
                self._release_page(page)
            elif self.refcount[page] > 1 or page in self._hash_of:
                # a later full page that was shared or registered: swap in a blank one to overwrite
                seq.pages[i] = self._take_page()
                self._release_page(page)
        seq.hashes = seq.hashes[:full]

    # --- data ----------------------------------------------------------------------------------

    def slots(self, seq: PagedSequence, start: int, end: int) -> torch.Tensor:
        """Flat slot index of positions start..end-1 (int64, on the pool's device)."""
        if end > len(seq.pages) * self.page_size:
            raise GenerationError(f"sequence position {end} is past its {len(seq.pages)} reserved pages")
        pos = torch.arange(start, end)
        table = torch.tensor(seq.pages, dtype=torch.int64)
        return (table[pos // self.page_size] * self.page_size + pos % self.page_size).to(self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (N, Hkv, D) for the N slots."""
        self.keys[layer].index_copy_(0, slots, k.to(self.keys.dtype))
        self.values[layer].index_copy_(0, slots, v.to(self.values.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` (any shape S...) -> (S..., Hkv, D)."""
        return self.keys[layer][slots], self.values[layer][slots]

    def commit(self, seq: PagedSequence, ids: list[int]) -> None:
        """Record that K/V of `ids` now sit after seq.tokens; register pages that became full."""
        seq.tokens.extend(ids)
        p = self.page_size
        while (len(seq.hashes) + 1) * p <= len(seq.tokens):
            i = len(seq.hashes)
            prev = seq.hashes[-1] if seq.hashes else _ROOT
            h = page_hash(prev, seq.tokens[i * p:(i + 1) * p])
            seq.hashes.append(h)
            page = seq.pages[i]
            if h not in self._page_of and page not in self._hash_of:
                self._page_of[h] = page
                self._hash_of[page] = h
