"""Decode speed with and without a JSON-schema constraint (device benchmark; target: <= 10% slower).

    python bench/bench_constrained.py MODEL_DIR [--tokens 200] [--device cuda]

Runs the same seeded generations with json_object and with a JSON schema (a product list whose reply
can run long), then plain over the same numbers of tokens, and prints the steady decode rate (the
first token's chunk to the last's) and the slowdown. Writes $OUT/constrained.json when OUT is set. About a minute on an H100 with a small model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.session import Engine  # noqa: E402
from app.engine.types import GenerationSettings  # noqa: E402

SCHEMA = {"type": "object", "properties": {"products": {"type": "array", "items": {
    "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                                     "name": {"type": "string"}, "price": {"type": "number"},
                                     "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["sku", "name", "price", "tags"], "additionalProperties": False}}},
    "required": ["products"], "additionalProperties": False}
PROMPT = [{"role": "user", "content": "List forty products of a hardware store as JSON with sku, name, price, tags."}]


def run(engine: Engine, tokens: int | list[int], repeats: int, **fields) -> dict:
    """Median steady decode rate: tokens 2..n over the time between the first and the last token's
    chunk, so the prompt, the first mask and the first draw (per-request costs) are left out.
    `tokens` may be one count per seed (plain runs match the constrained runs' lengths)."""
    rates, counts = [], []
    for seed in range(repeats):
        n = tokens[seed] if isinstance(tokens, list) else tokens
        settings = GenerationSettings(max_new_tokens=n, seed=seed, stop_on_eos=False,
                                      samplers={"temperature": 0.8}, **fields)
        stamps, last = [], None
        for chunk in engine.stream_chat(PROMPT, settings):
            stamps.append((time.perf_counter(), chunk.generated_tokens))
            last = chunk
        (t_a, n_a), (t_b, n_b) = stamps[0], stamps[-1]
        rates.append((n_b - n_a) / (t_b - t_a) if t_b > t_a else 0.0)
        counts.append(last.generated_tokens)
    return {"tok_s": statistics.median(rates), "tokens": statistics.median(counts), "per_seed_tokens": counts}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    engine = Engine.load(args.model, args.device)
    run(engine, 16, 1)  # warm-up (kernels, llguidance tokenizer)
    run(engine, 16, 1, json_schema=SCHEMA)
    t = time.perf_counter()
    rows = {"json_object": run(engine, args.tokens, args.repeats, json_object=True),
            "json_schema": run(engine, args.tokens, args.repeats, json_schema=SCHEMA)}
    # plain decoding over the same lengths: the rate of a short reply and a long one differ a little
    rows = {"plain (json_object lengths)": run(engine, rows["json_object"]["per_seed_tokens"], args.repeats),
            "plain (json_schema lengths)": run(engine, rows["json_schema"]["per_seed_tokens"], args.repeats),
            **rows}
    for name in ("json_object", "json_schema"):
        rows[name]["slowdown_pct"] = 100.0 * (1 - rows[name]["tok_s"] / rows[f"plain ({name} lengths)"]["tok_s"])
    info = engine.info
    print(f"\n{info.name} ({info.backend} on {info.device}), {args.tokens} tokens, median of {args.repeats}")
    print("| mode | decode tok/s | tokens | slowdown |\n|---|---|---|---|")
    for name, r in rows.items():
        slow = f"{r['slowdown_pct']:.1f}%" if "slowdown_pct" in r else ""
        print(f"| {name} | {r['tok_s']:.1f} | {r['tokens']:.0f} | {slow} |")
    print(f"(target: <= 10% slowdown; took {time.perf_counter() - t:.0f} s)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "constrained.json").write_text(json.dumps(
            {"model": info.name, "device": info.device, "backend": info.backend, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
