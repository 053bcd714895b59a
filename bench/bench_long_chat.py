"""Long chats on the device: prompt caching across turns, and the quantized KV cache modes.

1. A 10-turn chat (long user messages, greedy replies): time to first token per turn with prompt
   caching, then the same prompts with the cache reset before each turn. With caching TTFT follows
   the new message's length; without it, the whole history's.
2. Perplexity at 4k context for fp16 / q8 / q6 / q4 caches over one row made by concatenating the
   reference rows (../shared/fixtures/reference/ppl_ids.npy), the % change vs fp16 (targets: q8 <=
   0.3%, q4 <= 1.5%; scored in chunks of --ppl-chunk so each token sees what decoding sees), bytes per token of cache measured from torch's allocations against
   kv_bytes_per_token, and decode speed at that context.

usage: python bench/bench_long_chat.py --model DIR [--device cuda] [--turns 10] [--ctx 4096]
Prints tables; writes $OUT/long_chat.json when OUT is set. ~1 min for SmolLM2-135M on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.engine.cache import kv_bytes_per_token  # noqa: E402
from app.engine.generator import Generator  # noqa: E402
from app.engine.session import Engine  # noqa: E402
from app.engine.types import GenerationSettings  # noqa: E402

SHARED = Path(os.environ.get("KESTREL_SHARED", REPO.parent / "shared"))
TOPICS = ["the history of the printing press", "how tides work", "the rules of chess openings",
          "why the sky is blue", "how vaccines train the immune system", "the life cycle of stars",
          "the invention of the telephone", "how bees communicate", "plate tectonics", "how compilers work",
          "the water cycle", "the causes of the French revolution"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def user_message(turn: int, words: int) -> str:
    topic = TOPICS[turn % len(TOPICS)]
    filler = (f"I have been reading about {topic} and I would like a clear, careful explanation. ") * (words // 16)
    return f"Turn {turn + 1}. {filler}Please explain {topic} in a few sentences."


def ttft(engine: Engine, messages: list[dict], settings: GenerationSettings, device: str) -> tuple[float, str, int]:
    """(seconds to the first streamed chunk, the whole reply, tokens prefilled)."""
    sync(device)
    t0 = time.perf_counter()
    first = None
    parts = []
    for chunk in engine.stream_chat(messages, settings):
        if first is None:
            sync(device)
            first = time.perf_counter() - t0
        parts.append(chunk.text)
    return float(first or 0.0), "".join(parts), engine.generator.last_prefill_tokens


def chat_bench(engine: Engine, args: argparse.Namespace) -> list[dict]:
    settings = GenerationSettings(max_new_tokens=args.reply_tokens, samplers={"temperature": 0}, stop_on_eos=False)
    list(engine.stream_chat([{"role": "user", "content": user_message(0, args.message_words)}], settings))  # warm-up
    engine.generator.reset_cache()
    messages: list[dict] = [{"role": "system", "content": "You are a knowledgeable, patient teacher."}]
    rows = []
    prompts = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": user_message(turn, args.message_words)})
        prompts.append(list(messages))
        seconds, reply, prefilled = ttft(engine, messages, settings, args.device)
        history = engine.count_chat_tokens(messages)
        rows.append({"turn": turn + 1, "prompt_tokens": history, "prefilled_cached": prefilled,
                     "ttft_cached_ms": seconds * 1000})
        messages.append({"role": "assistant", "content": reply})
    for row, prompt in zip(rows, prompts):
        engine.generator.reset_cache()
        seconds, _, prefilled = ttft(engine, prompt, settings, args.device)
        row.update(prefilled_reset=prefilled, ttft_reset_ms=seconds * 1000)
    print(f"\n10-turn chat, replies of {args.reply_tokens} tokens (TTFT = time to the first streamed chunk)")
    print(f"{'turn':>4} {'prompt':>7} {'prefilled':>9} {'TTFT cached':>12} {'prefilled':>9} {'TTFT reset':>11}")
    for r in rows:
        print(f"{r['turn']:>4} {r['prompt_tokens']:>7} {r['prefilled_cached']:>9} {r['ttft_cached_ms']:>10.1f}ms "
              f"{r['prefilled_reset']:>9} {r['ttft_reset_ms']:>9.1f}ms")
    return rows


def long_ids(ctx: int) -> list[int]:
    ref = SHARED / "fixtures" / "reference"
    rows = np.load(ref / "ppl_ids.npy").astype(np.int64)
    flat = rows.reshape(-1).tolist()
    while len(flat) < ctx:
        flat += rows.reshape(-1).tolist()
    return flat[:ctx]


def allocated(device: str) -> int:
    return torch.cuda.memory_allocated() if device.startswith("cuda") else 0


@torch.inference_mode()
def cache_bench(engine: Engine, args: argparse.Namespace) -> list[dict]:
    ids = long_ids(args.ctx)
    cfg = engine.model.config
    out = []
    base = None
    for mode in args.modes.split(","):
        gen = Generator(engine.model, engine.tokenizer, args.ctx, mode, prefill_chunk=args.ppl_chunk)
        engine.model.set_rope_length(args.ctx)  # RoPE tables first, so they are not counted as cache
        sync(args.device)
        before = allocated(args.device)
        cache = gen.cache  # allocates the storage
        sync(args.device)
        fixed = cache.overhead_bytes() if hasattr(cache, "overhead_bytes") else 0  # exact sink/recent copies
        measured = (allocated(args.device) - before - fixed) if args.device.startswith("cuda") else cache.storage_bytes()
        t0 = time.perf_counter()
        ppl = gen.perplexity([ids])
        sync(args.device)
        t_ppl = time.perf_counter() - t0
        base = base if base is not None else ppl
        # decode speed at ~ctx - 64 tokens of context
        settings = GenerationSettings(max_new_tokens=32, samplers={"temperature": 0}, stop_on_eos=False)
        gen.reset_cache()
        _, last = gen.generate(ids[: args.ctx - 64], settings)
        overhead = cache.overhead_bytes() if hasattr(cache, "overhead_bytes") else 0
        row = {"mode": mode, "perplexity": ppl, "change_pct": (ppl / base - 1) * 100,
               "bytes_per_token_measured": measured / args.ctx, "bytes_per_token_formula": kv_bytes_per_token(cfg, mode),
               "storage_bytes": cache.storage_bytes(), "overhead_bytes": overhead,
               "ppl_seconds": t_ppl, "decode_tok_s": last.tokens_per_second}
        out.append(row)
        del gen, cache
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(f"\nKV cache modes at {args.ctx} tokens ({len(ids)} reference ids, one row)")
    print(f"{'mode':>5} {'ppl':>9} {'change':>8} {'B/token meas.':>13} {'B/token formula':>15} "
          f"{'fixed extra':>11} {'decode tok/s':>12}")
    for r in out:
        print(f"{r['mode']:>5} {r['perplexity']:>9.4f} {r['change_pct']:>+7.3f}% {r['bytes_per_token_measured']:>13.1f} "
              f"{r['bytes_per_token_formula']:>15} {r['overhead_bytes']:>11} {r['decode_tok_s']:>12.1f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--message-words", type=int, default=160, help="about this many words per user message")
    ap.add_argument("--reply-tokens", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--modes", default="fp16,q8,q6,q4")
    ap.add_argument("--skip-chat", action="store_true")
    ap.add_argument("--skip-modes", action="store_true", help="only the 10-turn chat")
    ap.add_argument("--ppl-chunk", type=int, default=128,
                    help="prefill chunk for the perplexity pass: the tokens being written and the latest 64 "
                         "are read exact, so small chunks score what decoding sees (2048 would flatter Q4)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    engine = Engine.load(args.model, args.device, max_seq_len=args.ctx)
    info = engine.info
    print(f"{info.name}: {info.architecture}, {info.backend} on {info.device}, context {info.max_seq_len}")
    result: dict = {"model": info.name, "backend": info.backend, "device": info.device,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    if not args.skip_chat:
        result["chat"] = chat_bench(engine, args)
    if not args.skip_modes:
        result["cache_modes"] = cache_bench(engine, args)
    result["seconds"] = time.perf_counter() - t0
    print(f"\ntotal {result['seconds']:.1f} s")
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "long_chat.json").write_text(json.dumps(result, indent=1))
        print(f"wrote {Path(out) / 'long_chat.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
