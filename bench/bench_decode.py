"""Decode and prefill speed of EXL2 models with the torch and cuda backends (run on the GPU machine).

For each EXL2 folder and backend: decode tok/s (batch 1, 128-token prompt, 256 new greedy tokens,
the host reading every token as a chat does, after a warm-up; through the captured CUDA graph, and
eagerly for comparison), prefill tok/s (2048-token prompt, best of 3 after a warm-up),
peak VRAM, and how many greedy tokens agree with the torch backend. Then a kernel-level table: the
gemv alone against F.linear on the dequantized weight for Llama-size layers, with achieved GB/s
(one row: the half2 gemv, and the exact fp32 one as exact_us).
exllamav2 side by side: add a runner to EXTRA_RUNNERS (same signature as bench_backend).

usage: python bench/bench_decode.py DIR [DIR ...] [--out results.json] [--backends torch,cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.backend import Linear  # noqa: E402
from app.engine.exl2 import Exl2Tensors, pack_scales  # noqa: E402
from app.engine.graphs import DecodeGraph  # noqa: E402
from app.engine.loader import load_model  # noqa: E402

# name -> fn(folder, args) returning a result dict like bench_backend's (the lead adds exllamav2 here)
EXTRA_RUNNERS: dict[str, Callable[[str, argparse.Namespace], dict]] = {}


def _sync_time(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


@torch.inference_mode()
def bench_backend(folder: str, backend: str, args: argparse.Namespace) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t_load = time.perf_counter()
    model = load_model(folder, device="cuda", backend=backend)
    t_load = time.perf_counter() - t_load
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    cache = model.allocate_cache(-(-(max(args.prefill, args.prompt + args.new) + 16) // 256) * 256)

    prompt = torch.randint(100, vocab - 100, (1, args.prompt), generator=gen).cuda()

    def decode(n: int) -> list[torch.Tensor]:
        cache.reset()
        logits = model.forward(prompt, cache, 0, last_only=True)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        toks = []
        for i in range(n):
            toks.append(tok)
            logits = model.forward(tok, cache, args.prompt + i)
            tok = logits[:, -1].argmax(-1, keepdim=True)
        return toks

    decode(16)  # warm-up: allocator, cuBLAS handles, kernel caches

    def timed(step: Callable[[int, int], torch.Tensor]) -> tuple[float, list[int]]:
        """tok/s of greedy decoding through step(token, position) -> logits; the host reads every
        token, as a chat does."""
        cache.reset()
        logits = model.forward(prompt, cache, 0, last_only=True)
        tok = int(logits[0, -1].argmax())
        out = []
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(args.new):
            out.append(tok)
            tok = int(step(tok, args.prompt + i).argmax())
        return args.new / (time.perf_counter() - t0), out

    def eager_step(tok: int, pos: int) -> torch.Tensor:
        return model.forward(torch.tensor([[tok]], device="cuda"), cache, pos)[0, -1]

    def timed_graph() -> tuple[float, list[int]]:
        return timed(DecodeGraph(model, cache).step)

    eager_tps, token_ids = timed(eager_step)
    graph_tps, graph_ids = timed_graph()
    graph_tps = max(graph_tps, timed_graph()[0])
    long_prompt = torch.randint(100, vocab - 100, (1, args.prefill), generator=gen).cuda()

    def prefill() -> None:
        cache.reset()
        model.forward(long_prompt, cache, 0, last_only=True)

    prefill()
    prefill_s = min(_sync_time(prefill) for _ in range(3))
    result = {
        "backend": model.backend.name, "load_s": round(t_load, 2),
        "decode_tok_s": round(graph_tps, 1), "decode_eager_tok_s": round(eager_tps, 1),
        "graph_tokens_equal_eager": next((i for i, (a, b) in enumerate(zip(token_ids, graph_ids)) if a != b),
                                         len(token_ids)),
        "prefill_tok_s": round(args.prefill / prefill_s, 1),
        "peak_vram_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "tokens": token_ids,
    }
    return result  # model and cache are freed with this frame


def synthetic_exl2(k: int, n: int, bits: int, seed: int = 0) -> Exl2Tensors:
    """A random layer in EXL2 layout (valid codes and scales; values do not matter for speed)."""
    gen = torch.Generator().manual_seed(seed)
    groups = -(-k // 32)
    qrows = k * bits // 32
    q_weight = torch.randint(-2**31, 2**31 - 1, (qrows, n), generator=gen, dtype=torch.int64).to(torch.int32)
    q_groups = []
    for g in range(groups):
        q_groups += [bits, g * bits]
    return Exl2Tensors(
        q_weight=q_weight, q_invperm=torch.argsort(torch.randperm(k, generator=gen)).to(torch.int32),
        q_scale=pack_scales(torch.randint(1, 17, (groups, n), generator=gen)),
        q_scale_max=torch.full((groups,), 0.02, dtype=torch.float16),
        q_groups=torch.tensor(q_groups, dtype=torch.int16))


def graph_time(fn: Callable[[], object], reps: int = 20) -> float:
    """Seconds per call of fn with launch overhead removed: reps calls captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    return _sync_time(lambda: [g.replay() for _ in range(5)]) / (5 * reps)


@torch.inference_mode()
def bench_kernels(args: argparse.Namespace) -> list[dict]:
    """Kernel time inside CUDA graphs (what a captured decode step pays), per blocks-per-SM target."""
    from app.engine.cuda_backend import CudaBackend

    be = CudaBackend(torch.device("cuda"), torch.float16)
    rows_out = []
    shapes = [(576, 1536), (1536, 576), (576, 49152), (4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]
    for k, n in shapes:
        for bits in ([2, 3, 4, 5, 6, 8] if (k, n) == (4096, 14336) else [4]):
            t = synthetic_exl2(k, n, bits)
            lin = be.prepare_linear(Linear("bench", k, n, exl2=t))
            w = be.dequantized_weight(lin)
            nbytes = be.packed(lin).qweight.numel() * 4
            for m in (1, 4):
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                row = {"K": k, "N": n, "bits": bits, "rows": m,
                       "fp16_linear_us": round(graph_time(lambda: torch.nn.functional.linear(x, w)) * 1e6, 1)}  # noqa: B023
                for bps in args.blocks_per_sm:
                    be.ext.set_gemv_blocks_per_sm(bps)
                    t_q = graph_time(lambda: be.linear(x, lin))  # noqa: B023
                    row[f"gemv_us@{bps}"] = round(t_q * 1e6, 1)
                    row[f"GBps@{bps}"] = round(nbytes / t_q / 1e9, 1)
                    if m == 1 and not be.gemv_exact:  # gemv_us is the half2 kernel: the exact one too
                        be.gemv_exact = True
                        t_e = graph_time(lambda: be.linear(x, lin))  # noqa: B023
                        be.gemv_exact = False
                        row[f"exact_us@{bps}"] = round(t_e * 1e6, 1)
                rows_out.append(row)
    be.ext.set_gemv_blocks_per_sm(4)
    return rows_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="*")
    ap.add_argument("--out", default=None, help="JSON file to write (default: $OUT/bench_decode.json)")
    ap.add_argument("--backends", default="torch,cuda")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel-level table")
    ap.add_argument("--exllamav2", action="store_true", help="measure exllamav2 0.3.2 on each folder too")
    ap.add_argument("--blocks-per-sm", type=lambda s: [int(v) for v in s.split(",")], default=[4],
                    help="gemv K-split targets to compare in the kernel table, e.g. 2,4,8,16")
    args = ap.parse_args()
    if args.exllamav2:
        from bench.exllamav2_side import measure

        def run_exllamav2(folder: str, a: argparse.Namespace) -> dict:
            r = measure(folder, a.prompt, a.new, a.prefill)
            return {"backend": "exllamav2", "decode_tok_s": round(r["decode_tok_s"], 1),
                    "prefill_tok_s": round(r["prefill_tok_s"], 1),
                    "peak_vram_mib": round(r["peak_vram_bytes"] / 2**20, 1)}

        EXTRA_RUNNERS["exllamav2"] = run_exllamav2
    out_path = args.out or os.path.join(os.environ.get("OUT", "."), "bench_decode.json")
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "models": {}}
    for folder in args.folders:
        runs = {}
        for name in args.backends.split(","):
            try:
                runs[name] = bench_backend(folder, name, args)
            except Exception as e:  # noqa: BLE001 - one failing backend must not lose the others' numbers
                runs[name] = {"error": f"{type(e).__name__}: {e}"}
        for name, runner in EXTRA_RUNNERS.items():
            try:
                runs[name] = runner(folder, args)
            except Exception as e:  # noqa: BLE001
                runs[name] = {"error": f"{type(e).__name__}: {e}"}
        ref = runs.get("torch", {}).get("tokens")
        for r in runs.values():
            if ref and "tokens" in r:
                same = next((i for i, (a, b) in enumerate(zip(ref, r["tokens"])) if a != b), len(ref))
                r["greedy_tokens_equal_to_torch"] = same
        report["models"][folder] = runs
        print(f"\n{folder}")
        print(f"{'backend':<12}{'decode tok/s':>14}{'prefill tok/s':>15}{'peak MiB':>10}{'same toks':>11}")
        for name, r in runs.items():
            if "error" in r:
                print(f"{name:<12}  ERROR {r['error']}")
                continue
            print(f"{name:<12}{r['decode_tok_s']:>14}{r['prefill_tok_s']:>15}{r['peak_vram_mib']:>10}"
                  f"{r.get('greedy_tokens_equal_to_torch', '-'):>11}")
        ex = runs.get("exllamav2", {})
        ours = runs.get("cuda", {})
        if "decode_tok_s" in ex and "decode_tok_s" in ours:
            ratios = {"decode": ours["decode_tok_s"] / ex["decode_tok_s"],
                      "prefill": ours["prefill_tok_s"] / ex["prefill_tok_s"],
                      "peak_vram": ours["peak_vram_mib"] / ex["peak_vram_mib"]}
            runs["ratio_cuda_vs_exllamav2"] = {k: round(v, 3) for k, v in ratios.items()}
            print("cuda / exllamav2: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if not args.no_kernels and "cuda" in args.backends:
        try:
            report["kernels"] = bench_kernels(args)
            for r in report["kernels"]:
                print("  ".join(f"{k}={v}" for k, v in r.items()))
        except Exception as e:  # noqa: BLE001
            report["kernels"] = {"error": f"{type(e).__name__}: {e}"}
            print("kernel table failed:", e)
    for runs in report["models"].values():
        for r in runs.values():
            r.pop("tokens", None)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
