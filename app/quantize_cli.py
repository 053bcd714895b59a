"""`python main.py quantize`: fp16/bf16 folder -> EXL2 folder from the terminal.

Kept out of app/cli.py (which only registers it) so the quantizer's options live in one place. One
progress line per stage or layer; a stopped job (Ctrl+C, kill) continues with --resume.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="convert an fp16/bf16 model folder to EXL2")
    p.add_argument("--model", required=True, help="fp16/bf16 Hugging Face model folder")
    p.add_argument("--out", required=True, help="output folder for the EXL2 model")
    p.add_argument("--bpw", type=float, required=True, help="target average bits per weight, 2.0-8.0")
    p.add_argument("--head-bits", type=int, default=6, help="output head bits: 2/3/4/5/6/8, or 16 to keep fp16")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--calibration", action="append", default=[], metavar="FILE",
                     help="calibration text: .txt, .jsonl (field 'text') or .parquet; repeatable")
    src.add_argument("--data-free", action="store_true",
                     help="the model writes its own calibration text (the default without --calibration)")
    p.add_argument("--rows", type=int, default=32, help="calibration rows")
    p.add_argument("--length", type=int, default=512, help="tokens per calibration row")
    p.add_argument("--seed", type=int, default=0, help="seed of the data-free prompts and sampling")
    p.add_argument("--measurement", default=None, metavar="FILE",
                   help="reuse a saved measurement (ours or exllamav2's measurement.json)")
    p.add_argument("--save-measurement", default=None, metavar="FILE", help="also save the measurement here")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--resume", action="store_true", help="continue a stopped conversion of the same settings")
    p.add_argument("--job-dir", default=None, help="where checkpoints go (default: OUT.job)")


def run(args: argparse.Namespace) -> int:
    from app.engine.quantize import CalibrationSettings, QuantizeError, convert

    job_dir = args.job_dir or args.out.rstrip("/\\") + ".job"
    if os.path.exists(job_dir) and not args.resume:
        raise QuantizeError("holds a stopped conversion", path=job_dir,
                            hint="Pass --resume to continue it, or delete the folder to start over.")
    if args.resume and not os.path.isdir(job_dir):
        raise QuantizeError("there is no stopped conversion to resume", path=job_dir,
                            hint="Run without --resume to start one.")
    if not 2.0 <= args.bpw <= 8.0:
        raise QuantizeError(f"--bpw {args.bpw} is outside 2.0-8.0", hint="Pick a target between 2.0 and 8.0.")
    settings = CalibrationSettings(rows=args.rows, length=args.length, files=tuple(args.calibration),
                                   seed=args.seed)
    t0 = time.perf_counter()
    last = [""]

    def progress(fraction: float, message: str) -> None:
        if message != last[0]:
            last[0] = message
            print(f"[{time.perf_counter() - t0:7.1f} s {fraction:4.0%}] {message}", flush=True)

    cancel = threading.Event()
    try:
        res = convert(args.model, args.out, args.bpw, args.head_bits, settings, args.measurement,
                      progress=progress, cancel=cancel, device=args.device, job_dir=job_dir)
    except KeyboardInterrupt:
        print(f"stopped; continue with the same command plus --resume (checkpoints in {job_dir})",
              file=sys.stderr)
        return 130
    if args.save_measurement:
        shutil.copyfile(res.measurement_path, args.save_measurement)
    print(f"wrote {res.out_folder}: {res.bpw:.3f} bpw (target {res.target_bpw}), head {res.head_bits} bits, "
          f"{res.seconds:.1f} s")
    return 0
