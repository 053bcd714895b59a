"""Where one decode step's time goes (device): torch profiler over a few single-token forwards.

usage: python bench/profile_decode.py EXL2_OR_FP16_DIR [--backend torch|cuda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.engine import load_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--backend", default="torch")
    a = ap.parse_args()
    m = load_model(a.model, "cuda", backend=a.backend)
    cache = m.allocate_cache(1024)
    m.forward(torch.randint(100, 1000, (1, 128), device="cuda"), cache, 0, last_only=True)
    tok = torch.tensor([[42]], device="cuda")
    for i in range(5):
        m.forward(tok, cache, 128 + i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(20):
        m.forward(tok, cache, 133 + i)
    torch.cuda.synchronize()
    print(f"{a.backend}: {(time.perf_counter() - t0) / 20 * 1000:.2f} ms per token (wall, eager)")
    from app.engine.graphs import DecodeGraph

    g = DecodeGraph(m, cache)
    for i in range(5):
        g.step(42, 200 + i)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(50):
        g.step(42, 210 + i)
    torch.cuda.synchronize()
    print(f"{a.backend}: {(time.perf_counter() - t0) / 50 * 1000:.3f} ms per token (wall, CUDA graph)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as p:
        for i in range(3):
            m.forward(tok, cache, 160 + i)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return 0


if __name__ == "__main__":
    sys.exit(main())
