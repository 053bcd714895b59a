"""Planner accuracy on a real GPU: the VRAM estimate against what loading + a prefill really use.

    python bench/planner_accuracy.py MODEL_DIR [MODEL_DIR ...] [--contexts 2048 8192 32768]
           [--cache-modes fp16 q8 q6 q4] [--chunk 2048] [--json out.json] [--dry-run]

Each (model, context, cache mode) runs in a fresh subprocess, so every measurement includes the
CUDA context exactly once, as the estimate does. In the child: NVML used memory before; load with
app.engine.Engine on cuda with max_seq_len=context; allocate the cache; prefill context - 8 tokens in
chunks of `chunk` (the worst case: the whole context in use) and take a few decode steps; then record
torch.cuda.max_memory_allocated (tensors only: compare with the estimate minus its CUDA-context term)
and the NVML used-memory delta, at the end and at its sampled peak (everything the process holds:
compare with the estimate's total).
Cache modes the engine cannot allocate yet are reported as skipped.

Note: the engine's chat prefill keeps only the last position's logits, while the estimate counts
fp32 logits for a whole chunk (the perplexity worst case), so the estimate should come out high
by about chunk x vocab x 4 bytes. --dry-run prints the estimates only (no GPU needed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MIB = 1024 ** 2


def estimate_row(folder: str, context: int, mode: str, chunk: int) -> dict[str, Any]:
    from app.planner import estimate, spec_from_folder

    est = estimate(spec_from_folder(folder), context, mode, chunk_size=chunk)
    return {"estimate_total": est.total,
            "estimate_tensors": est.total - est.cuda_context - est.decode_graph - est.allocator,
            "estimate_terms": est.terms()}


def nvml_used(index: int) -> int | None:
    from app.planner.gpu import read_gpus

    gpus = read_gpus()
    return gpus[index].used_bytes if len(gpus) > index else None


class NvmlPeak:
    """Samples NVML's used memory every 10 ms on a thread and keeps the highest reading."""

    def __init__(self, index: int) -> None:
        import threading

        self.index, self.top = index, nvml_used(index)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            used = nvml_used(self.index)
            if used is not None and (self.top is None or used > self.top):
                self.top = used

    def stop(self) -> int | None:
        self._stop.set()
        self._thread.join()
        return self.top


def measure_one(folder: str, context: int, mode: str, chunk: int) -> dict[str, Any]:
    """Runs in the child process: load, allocate, prefill, read the peaks."""
    import torch

    from app.engine import Engine, GenerationSettings
    from app.engine.errors import KestrelError

    row: dict[str, Any] = {"model": os.path.basename(os.path.normpath(folder)), "context": context,
                           "cache_mode": mode, "chunk": chunk, **estimate_row(folder, context, mode, chunk)}
    device = torch.cuda.current_device()
    before = nvml_used(device)
    peak = NvmlPeak(device)  # NVML's used memory sampled through the run: its peak, not the last reading
    t0 = time.perf_counter()
    mem = torch.cuda.memory_allocated
    try:
        engine = Engine.load(folder, "cuda", max_seq_len=context, cache_mode=mode)
        engine.generator.prefill_chunk = chunk
        row["alloc_after_load"] = int(mem())              # weights as prepared for the kernels
        _ = engine.generator.cache                        # allocate the whole cache now
        row["alloc_cache"] = int(mem()) - row["alloc_after_load"]
        n = context - 8                                   # fill the context: the worst case
        vocab = min(engine.model.config.vocab_size, engine.tokenizer.vocab_size)  # synthetic models borrow a tokenizer
        ids = torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()
        base = int(mem())
        torch.cuda.reset_peak_memory_stats()
        # a prefill of the whole context in chunks, then a few decode steps (CUDA-graph capture included), as a chat does
        for _c in engine.generator.stream(ids, GenerationSettings(max_new_tokens=4, stop_on_eos=False)):
            pass
        torch.cuda.synchronize()
        row["step_peak_extra"] = int(torch.cuda.max_memory_allocated()) - base
        row["alloc_after_steps"] = int(mem())
    except KestrelError as e:
        row["skipped"] = str(e)
        return row
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["max_allocated"] = base + row["step_peak_extra"]
    row["max_reserved"] = int(torch.cuda.max_memory_reserved())
    after = nvml_used(device)
    row["nvml_delta"] = after - before if after is not None and before is not None else None
    top = peak.stop()
    row["nvml_peak_delta"] = top - before if top is not None and before is not None else None
    engine.unload()
    gc.collect()
    return row


def run_child(folder: str, context: int, mode: str, chunk: int) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", folder, str(context), mode, str(chunk)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"model": os.path.basename(os.path.normpath(folder)), "context": context, "cache_mode": mode,
            "chunk": chunk, "error": (proc.stderr or proc.stdout).strip()[-800:]}


def ratio(a: int | None, b: int | None) -> str:
    return f"{a / b:.3f}" if a and b else "—"


def mib(n: int | None) -> str:
    return f"{n / MIB:,.0f}" if n is not None else "—"


def table(rows: list[dict[str, Any]]) -> str:
    """Estimate against NVML's sampled peak (the end reading where no peak was sampled), and the
    estimate's tensor terms (no context, graph or allocator slack) against torch's allocated peak."""
    head = (f"{'model':<28} {'ctx':>7} {'cache':>5} {'est MiB':>9} {'nvml peak':>9} {'est/nvml':>8} "
            f"{'tensors':>9} {'alloc MiB':>9} {'est/alloc':>9} {'reserved':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['model']:<28} {r['context']:>7} {r['cache_mode']:>5}  "
                         f"{'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error'][-120:]}")
            continue
        nvml = r.get("nvml_peak_delta") or r.get("nvml_delta")
        lines.append(f"{r['model'][:28]:<28} {r['context']:>7} {r['cache_mode']:>5} {mib(r['estimate_total']):>9} "
                     f"{mib(nvml):>9} {ratio(r['estimate_total'], nvml):>8} "
                     f"{mib(r['estimate_tensors']):>9} {mib(r.get('max_allocated')):>9} "
                     f"{ratio(r['estimate_tensors'], r.get('max_allocated')):>9} {mib(r.get('max_reserved')):>9}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        folder, context, mode, chunk = argv[1], int(argv[2]), argv[3], int(argv[4])
        print(json.dumps(measure_one(folder, context, mode, chunk)), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders (EXL2 or fp16)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--cache-modes", nargs="+", default=["fp16", "q8", "q6", "q4"])
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (the estimate's chunk_size)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--dry-run", action="store_true", help="estimates only, no GPU")
    args = ap.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("No CUDA GPU here: run this on the device machine, or pass --dry-run for estimates only.",
                  file=sys.stderr)
            return 2
    rows = []
    for folder in args.models:
        for context in args.contexts:
            for mode in args.cache_modes:
                if args.dry_run:
                    row = {"model": os.path.basename(os.path.normpath(folder)), "context": context,
                           "cache_mode": mode, "chunk": args.chunk,
                           **estimate_row(folder, context, mode, args.chunk)}
                else:
                    row = run_child(folder, context, mode, args.chunk)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print(table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
