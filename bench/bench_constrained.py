"""Decode speed with and without a JSON-schema constraint (device benchmark; target: <= 10% slower).

    python bench/bench_constrained.py MODEL_DIR [--tokens 200] [--device cuda]

Runs the same seeded generation plain, with json_object, and with a JSON schema (tests/data/schemas/
product_list.json, with its bounds lifted so the reply can run long) and prints decode tok/s and the
slowdown. Writes $OUT/constrained.json when OUT is set. About a minute on an H100 with a small model.
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


def run(engine: Engine, tokens: int, repeats: int, **fields) -> dict:
    rates, counts = [], []
    for seed in range(repeats):
        settings = GenerationSettings(max_new_tokens=tokens, seed=seed, stop_on_eos=False,
                                      samplers={"temperature": 0.8}, **fields)
        last = list(engine.stream_chat(PROMPT, settings))[-1]
        rates.append(last.tokens_per_second)
        counts.append(last.generated_tokens)
    return {"tok_s": statistics.median(rates), "tokens": statistics.median(counts)}


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
    rows = {"plain": run(engine, args.tokens, args.repeats),
            "json_object": run(engine, args.tokens, args.repeats, json_object=True),
            "json_schema": run(engine, args.tokens, args.repeats, json_schema=SCHEMA)}
    base = rows["plain"]["tok_s"]
    info = engine.info
    print(f"\n{info.name} ({info.backend} on {info.device}), {args.tokens} tokens, median of {args.repeats}")
    print("| mode | decode tok/s | tokens | slowdown |\n|---|---|---|---|")
    for name, r in rows.items():
        r["slowdown_pct"] = 100.0 * (1 - r["tok_s"] / base) if base else 0.0
        print(f"| {name} | {r['tok_s']:.1f} | {r['tokens']:.0f} | {r['slowdown_pct']:.1f}% |")
    print(f"(target: <= 10% slowdown; took {time.perf_counter() - t:.0f} s)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "constrained.json").write_text(json.dumps(
            {"model": info.name, "device": info.device, "backend": info.backend, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
