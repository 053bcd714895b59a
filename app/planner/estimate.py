"""VRAM estimate for running a model: one function, one documented formula per term.

    total = weights + kernel_layout + kv_cache + kv_scratch + activations + logits + cuda_context
            + decode_graph + allocator

weights           Exact tensor bytes from the folder's safetensors headers, or the branch's file sizes on
                  the Hub (slight overestimate: each file's header is counted too), or parameters x bpw
                  for a planned quantization (see weights.quantized_weight_bytes).
kernel_layout     EXL2 models only: Overheads.exl2_layout_fraction x weights, what the CUDA kernels' copy
                  of the packed tensors adds on load (padding rows, widened permutations; measured 2.6 % on
                  a 1B and 2.8 % on an 8B shape). Unquantized weights are used as stored: 0.
kv_cache          app.engine.cache.kv_bytes_per_token(config, cache_mode) x context x batch x slots: the
                  engine's own formula, not restated here. `slots` is how many conversations keep their
                  cache on the GPU at once (the engine keeps a second one only when memory allows).
kv_scratch        Quantized modes only: what the cache holds beside its storage (app.engine.kv_quant.
                  fixed_bytes: fp16 read-back buffers, exact sink/recent copies, key means) plus the fp32
                  temporaries of one read-back piece (kv_quant.scratch_bytes); the engine's formulas, not
                  restated here. FP16 caches are read in place: 0.
activations       Scratch for one prefill chunk of c = min(chunk_size, context) tokens, fp16 (2 bytes):
                  batch x c x 2 x (2*hidden [residual, normed] + 2*q_dim [q, attention output]
                  + 2*kv_dim [new k, v] + 3*intermediate [gate, up, gate*up]), plus
                  Overheads.workspace_bytes (cuBLAS workspace and small buffers from the same allocator).
                  Attention scores are never materialised: SDPA's flash / efficient kernels get a
                  lower-right causal bias, and the measured peak does not grow with the context.
logits            batch x vocab x 4 bytes: chat keeps the fp32 logits of the last position only
                  (perplexity scoring of a whole chunk needs c times as much; the planner plans chats).
cuda_context      Overheads.cuda_context_bytes: the CUDA context and loaded kernels (outside torch's
                  allocator; NVML sees it, torch.cuda.max_memory_allocated does not).
decode_graph      Overheads.graph_bytes, what NVML shows beyond the context once the decode step is
                  captured in a CUDA graph (every cache mode: quantized ones through csrc/kv_quant.cu).
allocator         Overheads.allocator_fraction x weights + Overheads.allocator_fixed_bytes: what the
                  caching allocator reserves beyond what is allocated. Measured, it follows the weights
                  (many blocks) and not the cache (a few large blocks, allocated once).

Calibration (docs/MEASUREMENTS.md, "VRAM planner"): an H100 80GB, torch 2.11 + CUDA 13; SmolLM2-135M
(fp16) and synthetic 1B / 8B-shape EXL2 folders at 2k/8k/32k with fp16 and q4 caches, each case's peak
read from NVML (sampled every 10 ms) and from torch's reserved and allocated counters.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from app.engine.config import ModelConfig
from app.engine.errors import ConfigError

from .errors import PlannerError
from .weights import ParamCounts, folder_tensor_bytes, param_counts, quantized_weight_bytes

MIB = 1024 ** 2
GIB = 1024 ** 3
MAX_CONTEXT_SEARCH = 1 << 24   # 16M tokens: an upper bound for the inverse search, far above any model


@dataclass(frozen=True)
class Overheads:
    """Constants measured on the device (module docstring)."""

    cuda_context_bytes: int = 692 * MIB    # NVML minus torch's reserved peak, every case without a graph
    graph_bytes: int = 70 * MIB            # the same with the decode step's CUDA graph: 762 MiB
    workspace_bytes: int = 48 * MIB        # cuBLAS workspace and small buffers, allocated through torch
    allocator_fraction: float = 0.04       # reserved minus allocated, per byte of weights
    allocator_fixed_bytes: int = 32 * MIB
    exl2_layout_fraction: float = 0.027    # the kernels' copy of EXL2 tensors beyond the file's bytes


DEFAULT_OVERHEADS = Overheads()


def _cache_module() -> Any:
    """app.engine.cache imports torch; loading it on first estimate keeps `import app.planner` light
    (the GUI reads GPUs and lists models long before anything needs torch)."""
    from app.engine import cache

    return cache


def cache_modes() -> tuple[str, ...]:
    """Cache modes from least to most compressed (fp16, q8, q6, q4)."""
    return tuple(_cache_module().CACHE_MODES)


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about one model (or one quantization branch of it)."""

    name: str
    config: ModelConfig
    weight_bytes: int
    source: str                     # "safetensors headers" | "file sizes" | "parameters x bpw"
    bpw: float | None = None        # EXL2 bits per weight of the layers; None = not quantized
    head_bits: int | None = None

    @property
    def params(self) -> ParamCounts:
        return param_counts(self.config)

    @property
    def bits_per_weight(self) -> float:
        """The EXL2 bpw, or for unquantized weights the stored bits per parameter (16 for fp16)."""
        if self.bpw is not None:
            return self.bpw
        return self.weight_bytes * 8 / max(1, self.params.total)


def _config(config: dict[str, Any] | ModelConfig, source: str) -> ModelConfig:
    return config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config, path=source)


def spec_from_folder(path: str) -> ModelSpec:
    """A local model folder: geometry from config.json, weights exactly from the safetensors headers."""
    config = ModelConfig.from_folder(path)
    quant = config.quant
    return ModelSpec(os.path.basename(os.path.normpath(path)), config, folder_tensor_bytes(path),
                     "safetensors headers", quant.bits if quant else None, quant.head_bits if quant else None)


def spec_from_files(config: dict[str, Any] | ModelConfig, file_sizes: dict[str, int],
                    name: str = "") -> ModelSpec:
    """A Hub branch not yet downloaded: config.json's contents and the branch's {filename: size}."""
    cfg = _config(config, f"{name or 'branch'}/config.json")
    sizes = [size for fname, size in file_sizes.items() if fname.endswith(".safetensors")]
    if not sizes:
        raise PlannerError("lists no .safetensors files", path=name or "branch",
                           hint="Kestrel runs safetensors models; pick another branch or repository.")
    if any(not isinstance(s, int) or s < 0 for s in sizes):
        raise PlannerError("has a weight file of unknown or negative size", path=name or "branch",
                           hint="Refresh the repository's file list.")
    quant = cfg.quant
    return ModelSpec(name, cfg, sum(sizes), "file sizes", quant.bits if quant else None,
                     quant.head_bits if quant else None)


def spec_from_params(config: dict[str, Any] | ModelConfig, bpw: float, head_bits: int = 6,
                     name: str = "") -> ModelSpec:
    """A quantization that does not exist yet (the quantize wizard): parameter counts x target bpw."""
    if not 1.0 <= bpw <= 16.0:
        raise PlannerError(f"target bits per weight {bpw} is outside 1..16", hint="EXL2 uses about 2 to 8 bpw.")
    if not 2 <= head_bits <= 16:
        raise PlannerError(f"head bits {head_bits} is outside 2..16", hint="Use 6 or 8 (16 = unquantized).")
    cfg = _config(config, f"{name or 'model'}/config.json")
    return ModelSpec(name or f"{bpw:g} bpw", cfg, quantized_weight_bytes(cfg, bpw, head_bits),
                     "parameters x bpw", float(bpw), int(head_bits))


def spec_from_config_file(path: str, file_sizes: dict[str, int], name: str = "") -> ModelSpec:
    """spec_from_files with config.json read from disk (e.g. fetched from a Hub branch)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot be read as JSON ({e})", path=path) from e
    return spec_from_files(raw, file_sizes, name)


@dataclass(frozen=True)
class Estimate:
    model: ModelSpec
    context: int
    cache_mode: str
    chunk_size: int
    batch: int
    weights: int
    kernel_layout: int
    kv_cache: int
    kv_scratch: int
    activations: int
    logits: int
    cuda_context: int
    decode_graph: int
    allocator: int
    overheads: Overheads = field(default=DEFAULT_OVERHEADS, repr=False)

    TERMS = ("weights", "kernel_layout", "kv_cache", "kv_scratch", "activations", "logits", "cuda_context",
             "decode_graph", "allocator")

    def terms(self) -> dict[str, int]:
        """Bytes per term, in display order."""
        return {name: getattr(self, name) for name in self.TERMS}

    @property
    def total(self) -> int:
        return sum(self.terms().values())


def estimate(model: ModelSpec, context: int, cache_mode: str, chunk_size: int = 2048, batch: int = 1,
             overheads: Overheads = DEFAULT_OVERHEADS, slots: int = 1) -> Estimate:
    """Bytes of GPU memory to run `model` with a cache of `context` tokens (formulas: module docstring)."""
    cache = _cache_module()
    if cache_mode not in cache.CACHE_MODES:
        raise PlannerError(f"unknown cache mode {cache_mode!r}", hint=f"Use one of {', '.join(cache.CACHE_MODES)}.")
    for label, value in (("context", context), ("chunk size", chunk_size), ("batch", batch), ("slots", slots)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PlannerError(f"{label} must be a whole number of at least 1, not {value!r}")
    c = model.config
    chunk = min(chunk_size, context)
    kv = cache.kv_bytes_per_token(c, cache_mode) * context * batch * slots
    layout = int(model.weight_bytes * overheads.exl2_layout_fraction) if model.bpw is not None else 0
    kv_scratch = 0
    if cache_mode != "fp16":
        from app.engine.kv_quant import fixed_bytes, scratch_bytes

        kv_scratch = fixed_bytes(c.num_layers, c.kv_dim, context, batch) + scratch_bytes(c.kv_dim, context, batch)
    activations = batch * chunk * 2 * (2 * c.hidden_size + 2 * c.q_dim + 2 * c.kv_dim + 3 * c.intermediate_size)
    activations += overheads.workspace_bytes
    logits = batch * c.vocab_size * 4
    graph = overheads.graph_bytes
    allocator = int(model.weight_bytes * overheads.allocator_fraction) + overheads.allocator_fixed_bytes
    return Estimate(model, context, cache_mode, chunk_size, batch, model.weight_bytes, layout, kv, kv_scratch,
                    activations, logits, overheads.cuda_context_bytes, graph, allocator, overheads)


def max_context(model: ModelSpec, free_bytes: int, cache_mode: str, chunk_size: int = 2048, batch: int = 1,
                overheads: Overheads = DEFAULT_OVERHEADS, limit: int | None = None) -> int:
    """The largest context whose estimate fits in `free_bytes` (0 if not even one token fits).

    Bisection over the forward estimate (which grows with context), so the two never disagree.
    `limit` caps the answer (e.g. the model's max_position_embeddings).
    """
    def fits(n: int) -> bool:
        return estimate(model, n, cache_mode, chunk_size, batch, overheads).total <= free_bytes

    top = MAX_CONTEXT_SEARCH if limit is None else max(0, limit)
    if top < 1 or not fits(1):
        return 0
    if fits(top):
        return top
    lo, hi = 1, 2                  # invariant once set: fits(lo), not fits(hi)
    while hi < top and fits(hi):
        lo, hi = hi, min(hi * 2, top)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def best_branch(branches: list[tuple[str, ModelSpec]], free_bytes: int, context: int, cache_mode: str,
                chunk_size: int = 2048, batch: int = 1, overheads: Overheads = DEFAULT_OVERHEADS
                ) -> tuple[str, ModelSpec] | None:
    """The branch with the highest bits per weight that fits (smaller download on ties); None if none."""
    fitting = [(name, spec) for name, spec in branches
               if estimate(spec, context, cache_mode, chunk_size, batch, overheads).total <= free_bytes]
    if not fitting:
        return None
    return max(fitting, key=lambda b: (b[1].bits_per_weight, -b[1].weight_bytes))


def with_bpw(model: ModelSpec, bpw: float) -> ModelSpec:
    """The same model planned at another EXL2 bpw (keeps its head bits, 6 for unquantized models)."""
    head_bits = model.head_bits if model.head_bits is not None else 6
    return replace(spec_from_params(model.config, bpw, head_bits, name=f"{bpw:g} bpw"), name=f"{bpw:g} bpw")
