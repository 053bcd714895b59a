"""Many streams at once: Kestrel's continuous-batching scheduler against exllamav2's dynamic generator.

For one EXL2 folder, at 1, 4 and 16 concurrent streams (each a distinct random 128-token prompt,
256 new greedy tokens, EOS ignored), both engines in the same run, no HTTP:
  aggregate tok/s  = all new tokens / time from submitting the streams to the last one ending
  per-stream tok/s = mean over streams of (new tokens - 1) / (time from its first token to its end)
exllamav2 runs with paged=True when flash-attn is importable, else paged=False (its fallback mode,
which runs one job at a time: the table says which). Prints a table with Kestrel/exllamav2 ratios and
writes $OUT/concurrency.json when OUT is set (or --out).

usage: python bench/bench_server_concurrency.py DIR [--streams 1,4,16] [--prompt 128] [--new 256]
                                                    [--no-exllamav2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.batching import END, Scheduler  # noqa: E402
from app.engine.loader import load_model  # noqa: E402
from app.engine.tokenizer import Tokenizer  # noqa: E402
from app.engine.types import Chunk, GenerationSettings  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (length,), generator=g).tolist() for _ in range(n)]


def summarize(t0: float, streams: list[tuple[float, float, int]]) -> dict:
    """streams: (first token time, end time, new tokens) each."""
    end = max(s[1] for s in streams)
    total = sum(s[2] for s in streams)
    per = [(k - 1) / (t1 - tf) for tf, t1, k in streams if k > 1 and t1 > tf]
    return {"aggregate_tok_s": total / (end - t0), "per_stream_tok_s": sum(per) / max(1, len(per)),
            "new_tokens": total, "wall_s": end - t0}


class Stream:
    """Times one Kestrel job from the scheduler's thread (emit never blocks)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.end = 0.0
        self.tokens = 0
        self.done = threading.Event()
        self.error: BaseException | None = None

    def __call__(self, item: object) -> None:
        now = time.perf_counter()
        if isinstance(item, Chunk):
            if self.first is None and item.generated_tokens:
                self.first = now
            self.tokens = item.generated_tokens
            self.end = now
        elif isinstance(item, BaseException):
            self.error = item
        elif item is END:
            self.done.set()


def kestrel_round(sched: Scheduler, prompts: list[list[int]], new: int) -> dict:
    settings = GenerationSettings(max_new_tokens=new, samplers={"temperature": 0}, stop_on_eos=False)
    streams = [Stream() for _ in prompts]
    sync()
    t0 = time.perf_counter()
    for ids, s in zip(prompts, streams, strict=True):
        sched.submit(ids, settings, s)
    for s in streams:
        s.done.wait()
        if s.error is not None:
            raise s.error
    return summarize(t0, [(s.first or s.end, s.end, s.tokens) for s in streams])


def run_kestrel(folder: str, counts: list[int], prompt: int, new: int, device: str = "cuda") -> dict:
    model = load_model(folder, device=device)
    tok = Tokenizer.from_folder(folder)
    top = max(counts)
    sched = Scheduler(model, tok, prompt + new + 64, pool_tokens=top * (prompt + new + 64), max_batch=top)
    vocab = model.config.vocab_size
    kestrel_round(sched, prompts_for(top, prompt, vocab, 99), 8)  # warm-up
    out = {"backend": model.backend.name}
    for n in counts:
        out[str(n)] = kestrel_round(sched, prompts_for(n, prompt, vocab, n), new)
    sched.close(cancel=True)
    del sched, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def run_exllamav2(folder: str, counts: list[int], prompt: int, new: int) -> dict:
    try:
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler
    except ImportError as e:
        return {"skipped": f"exllamav2 is not installed ({e})"}
    try:
        import flash_attn  # noqa: F401
        paged = True
    except ImportError:
        paged = False
    top = max(counts)
    cfg = ExLlamaV2Config(folder)
    per_seq = -(-(prompt + new + 64) // 256) * 256
    cfg.max_seq_len = per_seq
    cfg.max_batch_size = top
    model = ExLlamaV2(cfg)
    cache = ExLlamaV2Cache(model, max_seq_len=per_seq * (top if paged else 1), lazy=True)
    model.load_autosplit(cache)
    tokenizer = ExLlamaV2Tokenizer(cfg)
    gen = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=paged,
                                    max_batch_size=top if paged else 1)
    settings = ExLlamaV2Sampler.Settings.greedy()

    def one_round(prompts: list[list[int]], n_new: int) -> dict:
        serial: dict[int, int] = {}
        first: dict[int, float] = {}
        end: dict[int, float] = {}
        count: dict[int, int] = {}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, ids in enumerate(prompts):
            job = ExLlamaV2DynamicJob(input_ids=torch.tensor([ids]), max_new_tokens=n_new, gen_settings=settings,
                                      stop_conditions=[], decode_special_tokens=True)
            serial[gen.enqueue(job)] = i
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r.get("stage") != "streaming":
                    continue
                i = serial[r["serial"]]
                now = time.perf_counter()
                k = r["token_ids"].shape[-1] if "token_ids" in r else 0
                if k and i not in first:
                    first[i] = now
                count[i] = count.get(i, 0) + k
                end[i] = now
        return summarize(t0, [(first.get(i, end[i]), end[i], count.get(i, 0)) for i in range(len(prompts))])

    vocab = cfg.vocab_size
    one_round(prompts_for(min(top, 4), prompt, vocab, 99), 8)  # warm-up
    out: dict = {"paged": paged}
    for n in counts:
        out[str(n)] = one_round(prompts_for(n, prompt, vocab, n), new)
    model.unload()
    gen = cache = model = None  # noqa: F841 - release before empty_cache
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--streams", default="1,4,16")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--no-exllamav2", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the Kestrel side only")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --no-exllamav2 for a smoke run)", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.streams.split(",")]
    result = {"model": os.path.basename(os.path.normpath(args.folder)), "prompt": args.prompt, "new": args.new,
              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    t = time.perf_counter()
    result["kestrel"] = run_kestrel(args.folder, counts, args.prompt, args.new, args.device)
    result["exllamav2"] = ({"skipped": "--no-exllamav2"} if args.no_exllamav2
                           else run_exllamav2(args.folder, counts, args.prompt, args.new))
    result["seconds"] = time.perf_counter() - t
    k, e = result["kestrel"], result["exllamav2"]
    mode = "skipped: " + e["skipped"] if "skipped" in e else ("paged" if e["paged"] else "unpaged, one job at a time")
    print(f"{result['model']} on {result['gpu']}: {args.prompt}-token prompts, {args.new} new tokens; "
          f"kestrel backend {k['backend']}; exllamav2 {mode}")
    print(f"{'streams':>7} | {'kestrel agg':>11} {'per-stream':>10} | {'exl2 agg':>9} {'per-stream':>10} | "
          f"{'agg ratio':>9} {'per ratio':>9}")
    for n in counts:
        kr, er = k[str(n)], e.get(str(n))
        cells = f"{n:>7} | {kr['aggregate_tok_s']:>11.1f} {kr['per_stream_tok_s']:>10.1f} | "
        if er:
            cells += (f"{er['aggregate_tok_s']:>9.1f} {er['per_stream_tok_s']:>10.1f} | "
                      f"{kr['aggregate_tok_s'] / er['aggregate_tok_s']:>9.2f} "
                      f"{kr['per_stream_tok_s'] / er['per_stream_tok_s']:>9.2f}")
        else:
            cells += f"{'-':>9} {'-':>10} | {'-':>9} {'-':>9}"
        print(cells)
    out = args.out or (os.path.join(os.environ["OUT"], "concurrency.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
