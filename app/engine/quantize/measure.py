"""Measurement: how much each block's output suffers under each candidate bit mix, and what it costs.

Per decoder layer there are two blocks (attention, MLP). Each linear layer is GPTQ-quantized once
per distinct candidate spec; each block option (one spec per projection) is then scored by the
relative error of the block's output (residual included) against the fp16 block on the calibration
states, token by token and averaged (blocks.relative_error says why not one norm per row), and
costed in exact stored bits. States flow to the next layer through the
fp16 blocks. The result is saved as our own JSON; exllamav2's measurement.json can be read too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from .blocks import ATTN, INPUT_OF, MLP, BlockRunner, LayerWeights, batches, relative_error
from .gptq import Hessian, Prepared, QuantizeError, QuantSpec, gptq_quantize_many, prepare

FORMAT = "kestrel-exl2-measurement"
VERSION = 1

# Per-layer candidate mixes, cheapest first (about 2.1 to 8.0 bits per weight before overhead).
SPECS: list[QuantSpec] = [
    QuantSpec.of([(3, 0.05), (2, 0.95)], 64),
    QuantSpec.of([(3, 0.3), (2, 0.7)], 64),
    QuantSpec.of([(4, 0.2), (3, 0.3), (2, 0.5)], 64),
    QuantSpec.of([(3, 1.0)], 128),
    QuantSpec.of([(4, 0.25), (3, 0.75)], 128),
    QuantSpec.of([(4, 0.5), (3, 0.5)], 64),
    QuantSpec.of([(4, 1.0)], 128),
    QuantSpec.of([(4, 1.0)], 32),
    QuantSpec.of([(5, 0.25), (4, 0.75)], 64),
    QuantSpec.of([(5, 0.5), (4, 0.5)], 32),
    QuantSpec.of([(5, 1.0)], 64),
    QuantSpec.of([(6, 0.25), (5, 0.75)], 32),
    QuantSpec.of([(6, 1.0)], 128),
    QuantSpec.of([(8, 0.25), (6, 0.75)], 64),
    QuantSpec.of([(8, 0.5), (6, 0.5)], 128),
    QuantSpec.of([(8, 1.0)], 128),
]

# The projection in each block that gains most from extra bits gets a "boosted" variant of each option.
SENSITIVE = {"self_attn": ("v_proj",), "mlp": ("down_proj",)}

HEAD_SPECS: dict[int, QuantSpec] = {
    2: QuantSpec.of([(4, 0.3), (2, 0.7)], 32),
    3: QuantSpec.of([(4, 0.15), (3, 0.85)], 32),
    4: QuantSpec.of([(6, 0.15), (4, 0.85)], 32),
    5: QuantSpec.of([(6, 0.15), (5, 0.85)], 128),
    6: QuantSpec.of([(8, 0.15), (6, 0.85)], 128),
    8: QuantSpec.of([(8, 1.0)], 128),
}

Progress = Callable[[float, str], None]


def block_options(kind: str, specs: list[QuantSpec] = SPECS, boost: int = 2) -> list[dict[str, QuantSpec]]:
    """Candidate settings of one block: every spec uniformly, plus the sensitive projection `boost` specs up."""
    projs = ATTN if kind == "self_attn" else MLP
    out: list[dict[str, QuantSpec]] = []
    for j, spec in enumerate(specs):
        out.append({p: spec for p in projs})
        if boost and j + boost < len(specs):
            out.append({p: specs[j + boost] if p in SENSITIVE[kind] else spec for p in projs})
    return out


@dataclass
class Option:
    error: float
    total_bits: int
    modules: dict[str, QuantSpec]

    def to_dict(self) -> dict:
        return {"error": self.error, "accuracy": 1.0 - self.error, "total_bits": self.total_bits,
                "modules": {k: v.to_dict() for k, v in self.modules.items()}}


@dataclass
class Measurement:
    """Options per block ("model.layers.i.self_attn" / ".mlp"), plus what produced them."""

    blocks: dict[str, list[Option]] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "info": self.info,
                "blocks": {k: {"numel": self.numel[k], "options": [o.to_dict() for o in v]}
                           for k, v in self.blocks.items()}}

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)


def _block_numel(config: ModelConfig, kind: str) -> int:
    c = config
    if kind == "self_attn":
        return c.hidden_size * c.q_dim * 2 + c.hidden_size * c.kv_dim * 2
    return c.hidden_size * c.intermediate_size * 3


def load_measurement(path: str, config: ModelConfig | None = None) -> Measurement:
    """Read our measurement JSON or exllamav2's measurement.json (accuracy -> error = 1 - accuracy)."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantizeError(f"cannot be read as JSON ({e})", path=path, hint="Measure the model again.") from e
    m = Measurement()
    try:
        if raw.get("format") == FORMAT:
            m.info = raw.get("info", {})
            for name, block in raw["blocks"].items():
                m.numel[name] = int(block["numel"])
                m.blocks[name] = [Option(float(o["error"]), int(o["total_bits"]),
                                         {k: QuantSpec.from_dict(v) for k, v in o["modules"].items()})
                                  for o in block["options"]]
        elif "measurement" in raw:  # exllamav2
            m.info = {"source": "exllamav2", "last_module_idx": raw.get("last_module_idx")}
            for name, opts in raw["measurement"].items():
                if opts is None:  # modules it does not measure (norm, head)
                    continue
                if not isinstance(opts, list):
                    raise QuantizeError(f"block {name} is not a list of options (parallel/MoE layouts are "
                                        "not supported)", path=path)
                m.blocks[name] = [Option(max(0.0, 1.0 - float(o["accuracy"])), int(o["total_bits"]),
                                         {k: QuantSpec.from_dict(v) for k, v in o.items()
                                          if k not in ("accuracy", "total_bits")}) for o in opts]
                if config is not None:
                    m.numel[name] = _block_numel(config, name.rsplit(".", 1)[1])
        else:
            raise QuantizeError("is neither a Kestrel nor an exllamav2 measurement", path=path,
                                hint="Measure the model again.")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise QuantizeError(f"is malformed ({e!r})", path=path, hint="Measure the model again.") from e
    return m


def column_chunks(items: list, numel: Callable[[object], int], max_weights: int = 2**28) -> list[list]:
    """Split items into runs whose weights together stay under `max_weights` (bounds GPTQ memory)."""
    out: list[list] = [[]]
    size = 0
    for it in items:
        n = numel(it)
        if out[-1] and size + n > max_weights:
            out.append([])
            size = 0
        out[-1].append(it)
        size += n
    return out


# --- measuring one layer -----------------------------------------------------------------------


def _hessians(runner: BlockRunner, lw: LayerWeights, states: torch.Tensor, kind: str,
              weights: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, Hessian], torch.Tensor]:
    """Hessians of the block's input groups and the block's outputs with `weights`."""
    hs: dict[str, Hessian] = {}

    def tap(group: str, x: torch.Tensor) -> None:
        if group not in hs:
            hs[group] = Hessian(x.shape[-1], device)
        hs[group].add(x)

    outs = []
    for sl in batches(states):
        x = states[sl].to(runner.device)
        y = runner.attention(lw, x, weights, tap) if kind == "self_attn" else runner.mlp(lw, x, weights, tap)
        outs.append(y.to(states.device))
    return hs, torch.cat(outs)


def _block_error(runner: BlockRunner, lw: LayerWeights, states: torch.Tensor, ref: torch.Tensor, kind: str,
                 weights: dict[str, torch.Tensor]) -> float:
    errs = []
    for sl in batches(states):
        x = states[sl].to(runner.device)
        y = runner.attention(lw, x, weights) if kind == "self_attn" else runner.mlp(lw, x, weights)
        errs.append(relative_error(y, ref[sl].to(runner.device)))
    return float(torch.cat(errs).mean())


def measure_block(runner: BlockRunner, lw: LayerWeights, states: torch.Tensor, kind: str,
                  options: list[dict[str, QuantSpec]], cancel: Callable[[], None] | None = None
                  ) -> tuple[list[Option], torch.Tensor]:
    """Score every option of one block; return the options and the fp16 block's output states."""
    projs = ATTN if kind == "self_attn" else MLP
    dense = runner.dense(lw, projs)
    hs, ref = _hessians(runner, lw, states, kind, dense, runner.device)
    preps: dict[str, Prepared] = {g: prepare(h.value()) for g, h in hs.items()}
    quantized: dict[tuple[str, QuantSpec], tuple[torch.Tensor, int]] = {}
    for group, prep in preps.items():
        pairs = sorted({(p, s) for opt in options for p, s in opt.items() if INPUT_OF[p] == group},
                       key=lambda ps: (ps[0], ps[1].desc))
        for chunk in column_chunks(pairs, lambda ps: lw.linears[ps[0]].numel()):
            if cancel:
                cancel()
            ws = [lw.linears[p] for p, _ in chunk]
            qs = gptq_quantize_many(ws, prep, [s.layout(w.shape[1]) for (_, s), w in zip(chunk, ws)],
                                    [lw.biases[p] for p, _ in chunk], pack=False)
            for pair, q in zip(chunk, qs):
                quantized[pair] = (q.weight.to(device=runner.device, dtype=torch.float32), q.bits)
    results = []
    for opt in options:
        weights = {p: quantized[(p, s)][0] for p, s in opt.items()}
        bits = sum(quantized[(p, s)][1] for p, s in opt.items())
        results.append(Option(_block_error(runner, lw, states, ref, kind, weights), bits, dict(opt)))
    return results, ref
