"""Cost of run-time LoRA on the GPU: decode and prefill speed with 0, 1 and 2 adapters active.

Adapters are made here (random, fixed seed, PEFT layout, rank --rank on all of q/k/v/o/gate/up/down
of every layer) for each model folder, loaded through the Engine API and selected per run exactly as
requests select them (Generator._use_loras). Decode: batch 1, 128-token prompt, --new greedy tokens
(argmax on the GPU) after a warm-up. Prefill: a --prefill (2048) token prompt, best of 3. Also checks that
"no adapter" after an adapter run gives the base logits bit for bit (no leak).

usage: python bench/bench_lora.py DIR [DIR ...] [--backend auto|torch|cuda] [--rank 16] [--new 256]
Prints a table and JSON; writes $OUT/bench_lora.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.lora import TARGETS  # noqa: E402
from app.engine.session import Engine  # noqa: E402


def write_adapter(folder: str, engine: Engine, rank: int, seed: int) -> None:
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, lin in engine.model.linears().items():
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        a = torch.randn(rank, lin.in_features, generator=gen) / math.sqrt(lin.in_features)
        b = torch.randn(lin.out_features, rank, generator=gen) * 0.01
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.half().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.half().contiguous()
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}, f)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


@torch.inference_mode()
def bench(folder: str, args: argparse.Namespace) -> dict:
    engine = Engine.load(folder, args.device, max_seq_len=args.prefill + 128 + args.new + 16, backend=args.backend)
    model, g = engine.model, engine.generator
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            write_adapter(os.path.join(tmp, f"a{i}"), engine, args.rank, seed=i)
            engine.load_lora(os.path.join(tmp, f"a{i}"), f"a{i}")
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, vocab - 100, (1, 128), generator=gen).to(model.device)
    long_prompt = torch.randint(100, vocab - 100, (1, args.prefill), generator=gen).to(model.device)
    cache = g.cache

    def decode(n: int) -> None:
        cache.reset()
        tok = model.forward(prompt, cache, 0, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for i in range(n):
            tok = model.forward(tok, cache, 128 + i)[:, -1].argmax(-1, keepdim=True)

    def prefill() -> None:
        cache.reset()
        model.forward(long_prompt, cache, 0, last_only=True)

    rows = {}
    g._use_loras({})
    base_logits = model.forward(prompt)[0, -1].clone()
    for label, selection in (("none", {}), ("1 adapter", {"a0": 1.0}), ("2 adapters", {"a0": 1.0, "a1": 0.5})):
        g._use_loras(selection)
        decode(16)
        t = timed(lambda: decode(args.new))
        prefill()
        p = min(timed(prefill) for _ in range(3))
        rows[label] = {"decode_tok_s": args.new / t, "prefill_tok_s": args.prefill / p}
    g._use_loras({})
    no_leak = bool(torch.equal(model.forward(prompt)[0, -1], base_logits))
    base = rows["none"]
    for r in rows.values():
        r["decode_vs_none"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_vs_none"] = r["prefill_tok_s"] / base["prefill_tok_s"]
    result = {"model": folder, "backend": model.backend.name, "rank": args.rank, "rows": rows,
              "no_leak": no_leak,
              "gpu": torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"}
    engine.unload()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    results = [bench(f, args) for f in args.folders]
    for r in results:
        print(f"\n{r['model']} ({r['backend']}, rank {r['rank']}, {r['gpu']}), no leak: {r['no_leak']}")
        print(f"{'':>12} {'decode tok/s':>13} {'vs none':>8} {'prefill tok/s':>14} {'vs none':>8}")
        for label, row in r["rows"].items():
            print(f"{label:>12} {row['decode_tok_s']:13.1f} {row['decode_vs_none']:8.3f} "
                  f"{row['prefill_tok_s']:14.0f} {row['prefill_vs_none']:8.3f}")
    print(json.dumps(results))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "bench_lora.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
