"""Speculative decoding speed: tokens/s with and without, and the acceptance rate (device benchmark).

Cases, each through the real Engine (chat template, samplers, streaming), greedy and sampled:
  a. --target with --draft as draft model (e.g. the fp16 SmolLM2 folder with its EXL2 folder),
  b. --target with n-gram prompt lookup, on a prompt whose answer repeats text ("rewrite this code
     with one change"),
  c. --high with --low as draft (a high-bpw EXL2 with a low-bpw one), when both are given.
Greedy runs also check that the speculative output is identical to plain decoding.

usage: python bench/bench_speculative.py --target DIR [--draft DIR] [--high DIR --low DIR]
           [--device cuda] [--backend auto] [--new 160] [--draft-tokens 4]
Prints a table; writes $OUT/speculative.json when OUT is set (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.session import Engine  # noqa: E402
from app.engine.types import GenerationSettings  # noqa: E402

STORY = [{"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message "
                                      "in a bottle. Use at least five paragraphs."}]
CODE = """def parse_config(path):
    settings = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise ValueError(f"{path}:{number}: expected KEY=VALUE")
            key, value = line.split("=", 1)
            settings[key.strip()] = value.strip()
    return settings


def merge_settings(base, override):
    merged = dict(base)
    for key, value in override.items():
        merged[key] = value
    return merged
"""
REWRITE = [{"role": "user", "content": "Rewrite this code with one change: rename `settings` to `options`. "
                                        "Reply with the whole code only.\n\n```python\n" + CODE + "```"}]


def timed(engine: Engine, messages: list[dict], settings: GenerationSettings) -> dict:
    t0 = time.perf_counter()
    text, last = [], None
    for chunk in engine.stream_chat(messages, settings):
        text.append(chunk.text)
        last = chunk
    wall = time.perf_counter() - t0
    assert last is not None
    return {"text": "".join(text), "tokens": last.generated_tokens, "decode_tok_s": last.tokens_per_second,
            "wall_s": wall, "proposed": last.draft_proposed, "accepted": last.draft_accepted,
            "acceptance": last.draft_acceptance}


def compare(engine: Engine, name: str, messages: list[dict], mode: str, args: argparse.Namespace) -> list[dict]:
    rows = []
    for label, samplers, seed in (("greedy", {"temperature": 0}, None),
                                  ("sampled", {"temperature": 0.7, "top_p": 0.9}, 1)):
        def settings(spec: str, samplers: dict = samplers, seed: int | None = seed) -> GenerationSettings:
            return GenerationSettings(max_new_tokens=args.new, samplers=samplers, seed=seed, stop_on_eos=False,
                                      speculative=spec, draft_tokens=args.draft_tokens)

        timed(engine, messages, GenerationSettings(max_new_tokens=16, samplers=samplers))  # warm-up
        plain = max((timed(engine, messages, settings("off")) for _ in range(args.repeat)),
                    key=lambda r: r["decode_tok_s"])
        spec = max((timed(engine, messages, settings(mode)) for _ in range(args.repeat)),
                   key=lambda r: r["decode_tok_s"])
        rows.append({
            "case": name, "mode": mode, "sampling": label, "draft_tokens": args.draft_tokens,
            "tokens": spec["tokens"], "plain_tok_s": round(plain["decode_tok_s"], 1),
            "spec_tok_s": round(spec["decode_tok_s"], 1),
            "speedup": round(spec["decode_tok_s"] / plain["decode_tok_s"], 3) if plain["decode_tok_s"] else None,
            "acceptance": round(spec["acceptance"], 3), "proposed": spec["proposed"], "accepted": spec["accepted"],
            "identical": plain["text"] == spec["text"] if label == "greedy" else None,
        })
        print_row(rows[-1])
    return rows


HEADER = f"{'case':<28} {'mode':<6} {'sampling':<8} {'plain tok/s':>11} {'spec tok/s':>10} {'speedup':>7} " \
         f"{'accept':>6} {'identical':>9}"


def print_row(r: dict) -> None:
    same = "" if r["identical"] is None else ("yes" if r["identical"] else "NO")
    print(f"{r['case'][:28]:<28} {r['mode']:<6} {r['sampling']:<8} {r['plain_tok_s']:>11.1f} {r['spec_tok_s']:>10.1f} "
          f"{r['speedup'] or 0:>7.2f} {r['acceptance']:>6.2f} {same:>9}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="model to speed up (e.g. the fp16 SmolLM2 folder)")
    ap.add_argument("--draft", default=None, help="draft model for --target (same tokenizer)")
    ap.add_argument("--high", default=None, help="case c: high-bpw EXL2 folder")
    ap.add_argument("--low", default=None, help="case c: low-bpw EXL2 folder, draft for --high")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--new", type=int, default=160, help="tokens generated per run")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting; the fastest counts")
    ap.add_argument("--json", default=None, help="output file (default: $OUT/speculative.json if OUT is set)")
    args = ap.parse_args()

    rows: list[dict] = []
    print(HEADER)
    engine = Engine.load(args.target, args.device, backend=args.backend, max_seq_len=2048, draft=args.draft)
    base = os.path.basename(os.path.normpath(args.target))
    if args.draft:
        rows += compare(engine, f"a {base} <- {os.path.basename(os.path.normpath(args.draft))}", STORY,
                        "draft", args)
    rows += compare(engine, f"b {base} code rewrite", REWRITE, "ngram", args)
    engine.unload()
    if args.high and args.low:
        engine = Engine.load(args.high, args.device, backend=args.backend, max_seq_len=2048, draft=args.low)
        name = f"c {os.path.basename(os.path.normpath(args.high))} <- {os.path.basename(os.path.normpath(args.low))}"
        rows += compare(engine, name, STORY, "draft", args)
        engine.unload()

    out = args.json or (os.path.join(os.environ["OUT"], "speculative.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump({"device": args.device, "backend": args.backend, "new_tokens": args.new, "rows": rows}, f,
                      indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
