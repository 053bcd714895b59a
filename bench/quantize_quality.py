"""Quantizer quality: perplexity and a greedy answer at several bpw targets, against fp16.

    python bench/quantize_quality.py FP16_FOLDER PPL_IDS.npy [--device cuda] [--targets 2.5,3,4,5,6,8]
        [--work DIR] [--calibration FILE ...] [--rows 32 --length 512]

Measures once (cached in --work as measurement.json together with the calibration ids, so a second
run, e.g. after a time limit, skips straight to the conversions), converts at each target, then
scores each folder: perplexity over the reference rows (each row alone) and the greedy answer to
"What is the capital of France?". Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.engine.quantize import CalibrationSettings, calibration_rows, convert, measure_model  # noqa: E402
from app.engine.session import Engine  # noqa: E402
from app.engine.types import GenerationSettings  # noqa: E402

QUESTION = "What is the capital of France?"


def score(folder: str, rows: list[list[int]], device: str) -> dict:
    engine = Engine.load(folder, device, max_seq_len=1024)
    try:
        ppl = engine.generator.perplexity(rows)
        text = "".join(c.text for c in engine.stream_chat(
            [{"role": "user", "content": QUESTION}],
            GenerationSettings(max_new_tokens=24, samplers={"temperature": 0.0})))
    finally:
        engine.unload()
    return {"ppl": round(ppl, 4), "answer": text.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("ppl_ids")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--targets", default="2.5,3.0,4.0,5.0,6.0,8.0")
    ap.add_argument("--head-bits", type=int, default=6)
    ap.add_argument("--work", default="bench-quantize-work")
    ap.add_argument("--calibration", nargs="*", default=[], help="text/JSONL/Parquet files; none = self-generated")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    rows = np.load(args.ppl_ids).astype(np.int64).tolist()
    settings = CalibrationSettings(rows=args.rows, length=args.length, files=tuple(args.calibration))
    ids_path = os.path.join(args.work, "calibration_ids.pt")
    t0 = time.perf_counter()
    if os.path.isfile(ids_path):
        ids = torch.load(ids_path)
    else:
        ids = calibration_rows(args.model, settings, args.device)
        torch.save(ids, ids_path)
    t_cal = time.perf_counter() - t0
    m_path = os.path.join(args.work, "measurement.json")
    t0 = time.perf_counter()
    if not os.path.isfile(m_path):
        measure_model(args.model, m_path, settings, calibration_ids=ids, device=args.device,
                      progress=lambda f, msg: print(f"  [{f:5.1%}] {msg}", flush=True))
    t_measure = time.perf_counter() - t0
    print(f"calibration {t_cal:.1f} s, measurement {t_measure:.1f} s", flush=True)

    results = [{"bpw_target": "fp16", **score(args.model, rows, args.device)}]
    print(f"fp16: ppl {results[0]['ppl']}", flush=True)
    for target in [float(t) for t in args.targets.split(",")]:
        out = os.path.join(args.work, f"exl2-{target:.2f}")
        t0 = time.perf_counter()
        if not os.path.isfile(os.path.join(out, "config.json")):
            res = convert(args.model, out, target, args.head_bits, settings, m_path, calibration_ids=ids,
                          device=args.device)
            bpw = res.bpw
        else:
            bpw = json.loads(open(os.path.join(out, "result.json")).read())["bpw"] \
                if os.path.isfile(os.path.join(out, "result.json")) else float("nan")
        t_conv = time.perf_counter() - t0
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump({"bpw": bpw}, f)
        r = {"bpw_target": target, "bpw": round(bpw, 4), "convert_s": round(t_conv, 1), **score(out, rows, args.device)}
        results.append(r)
        print(f"{target}: bpw {r['bpw']} ppl {r['ppl']} ({t_conv:.0f} s) {r['answer'][:60]!r}", flush=True)

    print()
    print(f"{'target':>8} {'bpw':>7} {'ppl':>9}  answer")
    for r in results:
        print(f"{r['bpw_target']!s:>8} {r.get('bpw', 16.0)!s:>7} {r['ppl']:>9.3f}  {r['answer'][:70]!r}")
    print(json.dumps({"device": args.device, "calibration": {"rows": int(ids.shape[0]), "length": int(ids.shape[1]),
                                                              "dataset": settings.dataset},
                      "measure_s": round(t_measure, 1), "results": results}))


if __name__ == "__main__":
    main()
