"""Quantizer quality and speed: one measurement, then each bpw target: time, bpw, perplexity, answer.

    python bench/quantize_quality.py FP16_FOLDER [PPL_IDS.npy] [--device cuda] [--targets 2.5,3,4,5,6,8]
        [--work DIR] [--calibration FILE ...] [--rows 32 --length 512] [--budget-s 520] [--no-exllamav2]

PPL_IDS defaults to ../shared/fixtures/reference/ppl_ids.npy (8x512; each row scored alone).
Calibration (self-generated unless files are given) and the measurement are done once and cached in
--work, so a second run (e.g. after a time limit) goes straight to the conversions; finished
conversions are reused too. Each target prints one line as it finishes and the JSON file
($OUT/quantize_quality.json, or --work) is rewritten after every step, so partial results survive a
time limit. Targets still waiting when --budget-s is spent are skipped (and listed as skipped).
If exllamav2 is importable, its perplexity on our output is reported too (interop + a second opinion).
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
DEFAULT_IDS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "fixtures",
                           "reference", "ppl_ids.npy")


def score(folder: str, rows: list[list[int]], device: str) -> dict:
    engine = Engine.load(folder, device, max_seq_len=max(len(r) for r in rows) + 64)
    try:
        t0 = time.perf_counter()
        ppl = engine.generator.perplexity(rows)
        prompt = engine.chat_prompt_ids([{"role": "user", "content": QUESTION}])
        chunks = list(engine.generator.stream(prompt, GenerationSettings(
            max_new_tokens=24, samplers={"temperature": 0.0}, stop_on_eos=False)))
    finally:
        engine.unload()
    return {"ppl": round(ppl, 4), "answer": "".join(c.text for c in chunks).strip(),
            "prompt_ids": prompt, "answer_ids": [t for c in chunks for t in c.token_ids],
            "score_s": round(time.perf_counter() - t0, 1)}


def exllamav2_check(folder: str, rows: list[list[int]], prompt: list[int], answer: list[int]) -> dict:
    """exllamav2 on our EXL2 folder: its perplexity (each row alone) and whether its greedy tokens after
    `prompt` are ours (`answer`); strings say why not."""
    try:
        from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    except Exception as e:  # noqa: BLE001 - optional
        return {"exllamav2_ppl": f"not importable: {type(e).__name__}"}
    try:
        cfg = ExLlamaV2Config(folder)
        cfg.max_seq_len = max(len(r) for r in rows) + 16
        # Without flash-attn, exllamav2 0.3.2's SDPA path passes no mask for a plain causal forward
        # (attn.py: `if ... block_diag_layers or causal:` takes the block-diagonal mask, None here), so
        # prompts attend to later tokens: 32.4 instead of 14.7 on the fp16 model. Its matmul path
        # builds the causal mask.
        cfg.no_sdpa = True
        model = ExLlamaV2(cfg)
        cache = ExLlamaV2Cache(model, max_seq_len=cfg.max_seq_len, lazy=True)
        model.load_autosplit(cache)
        nll, count = 0.0, 0
        for row in rows:
            ids = torch.tensor([row])
            logits = model.forward(ids).float()[0, :-1].cpu()
            logp = torch.log_softmax(logits, dim=-1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += len(row) - 1
        ids = list(prompt)
        for _ in answer:  # greedy, the whole sequence each step: a few dozen tokens on a small model
            ids.append(int(model.forward(torch.tensor([ids]))[0, -1].float().argmax()))
        model.unload()
        theirs = ids[len(prompt):]
        # Kestrel's chunks carry no special-token ids (<|im_end|> ...): compare the rest, as far as both go
        from app.engine.tokenizer import Tokenizer

        special = Tokenizer.from_folder(folder).special_ids
        text_ids = [t for t in theirs if t not in special]
        n = min(len(text_ids), len(answer))
        return {"exllamav2_ppl": round(float(np.exp(nll / count)), 4),
                "exllamav2_same_greedy": n > 0 and text_ids[:n] == answer[:n], "exllamav2_compared_tokens": n,
                "exllamav2_answer_ids": theirs}
    except Exception as e:  # noqa: BLE001 - reported, the bench goes on
        return {"exllamav2_ppl": f"failed: {type(e).__name__}: {e}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("ppl_ids", nargs="?", default=DEFAULT_IDS)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--targets", default="2.5,3.0,4.0,5.0,6.0,8.0")
    ap.add_argument("--head-bits", type=int, default=6)
    ap.add_argument("--work", default="bench-quantize-work")
    ap.add_argument("--calibration", nargs="*", default=[], help="text/JSONL/Parquet files; none = self-generated")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=520.0, help="skip targets not started within this time")
    ap.add_argument("--no-exllamav2", action="store_true")
    ap.add_argument("--no-fp16", action="store_true", help="skip scoring the fp16 model")
    args = ap.parse_args()

    start = time.perf_counter()
    os.makedirs(args.work, exist_ok=True)
    out_json = os.path.join(os.environ.get("OUT") or args.work, "quantize_quality.json")
    rows = np.load(args.ppl_ids, allow_pickle=False).astype(np.int64).tolist()
    settings = CalibrationSettings(rows=args.rows, length=args.length, files=tuple(args.calibration))
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "calibration": {"rows": args.rows, "length": args.length, "dataset": settings.dataset},
                    "results": []}

    def save() -> None:
        report["total_s"] = round(time.perf_counter() - start, 1)
        with open(out_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)

    ids_path = os.path.join(args.work, "calibration_ids.npy")
    t0 = time.perf_counter()
    if os.path.isfile(ids_path):
        ids = torch.from_numpy(np.load(ids_path, allow_pickle=False))
        report["calibration_cached"] = True
    else:
        ids = calibration_rows(args.model, settings, args.device)
        np.save(ids_path, ids.numpy())
    report["calibration_s"] = round(time.perf_counter() - t0, 1)
    m_path = os.path.join(args.work, "measurement.json")
    t0 = time.perf_counter()
    if os.path.isfile(m_path):
        report["measurement_cached"] = True
    else:
        measure_model(args.model, m_path, settings, calibration_ids=ids, device=args.device,
                      progress=lambda f, msg: print(f"  [{time.perf_counter() - t0:6.1f} s] {msg}", flush=True))
    report["measure_s"] = round(time.perf_counter() - t0, 1)
    print(f"calibration {report['calibration_s']} s, measurement {report['measure_s']} s", flush=True)
    save()

    if not args.no_fp16:
        r = {"bpw_target": "fp16", **score(args.model, rows, args.device)}
        if not args.no_exllamav2:  # the harness's own check: both engines must agree on the fp16 model
            r.update(exllamav2_check(args.model, rows, r["prompt_ids"], r["answer_ids"]))
        report["results"].append(r)
        print(f"fp16: ppl {r['ppl']} exllamav2 {r.get('exllamav2_ppl')} same greedy "
              f"{r.get('exllamav2_same_greedy')} {r['answer'][:60]!r}", flush=True)
        save()
    for target in [float(t) for t in args.targets.split(",") if t.strip()]:
        if time.perf_counter() - start > args.budget_s:
            report["results"].append({"bpw_target": target, "skipped": "time budget spent"})
            print(f"{target}: skipped (time budget)", flush=True)
            save()
            continue
        out = os.path.join(args.work, f"exl2-{target:.2f}")
        t0 = time.perf_counter()
        r: dict = {"bpw_target": target}
        try:
            res_path = os.path.join(out, "result.json")
            if os.path.isfile(res_path):
                with open(res_path, encoding="utf-8") as f:
                    r.update(json.load(f), cached=True)
            else:
                res = convert(args.model, out, target, args.head_bits, settings, m_path, calibration_ids=ids,
                              device=args.device)
                r.update(bpw=round(res.bpw, 4), convert_s=round(time.perf_counter() - t0, 1))
                with open(res_path, "w", encoding="utf-8") as f:
                    json.dump({"bpw": r["bpw"], "convert_s": r["convert_s"]}, f)
            r.update(score(out, rows, args.device))
            if not args.no_exllamav2:
                r.update(exllamav2_check(out, rows, r["prompt_ids"], r["answer_ids"]))
        except Exception as e:  # noqa: BLE001 - one failing target must not lose the others
            r["error"] = f"{type(e).__name__}: {e}"
        report["results"].append(r)
        save()
        print(f"{target}: bpw {r.get('bpw')} convert {r.get('convert_s')} s ppl {r.get('ppl')} "
              f"exllamav2 {r.get('exllamav2_ppl')} same greedy {r.get('exllamav2_same_greedy')} {r.get('answer', r.get('error', ''))[:60]!r}", flush=True)

    print()
    print(f"{'target':>8} {'bpw':>7} {'conv s':>7} {'ppl':>9} {'exl2 ppl':>9} {'same':>5}  answer")
    for r in report["results"]:
        print(f"{r['bpw_target']!s:>8} {r.get('bpw', '')!s:>7} {r.get('convert_s', '')!s:>7} "
              f"{r.get('ppl', '')!s:>9} {r.get('exllamav2_ppl', '')!s:>9} {r.get('exllamav2_same_greedy', '')!s:>5}  "
              f"{(r.get('answer') or r.get('error') or r.get('skipped') or '')[:60]!r}")
    print(f"total {time.perf_counter() - start:.0f} s; JSON: {out_json}")
    save()


if __name__ == "__main__":
    main()
