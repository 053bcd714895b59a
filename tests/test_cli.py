"""The terminal contract: completion on stdout, stats on stderr, one-line errors, exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "main.py"), *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=300)


def test_generate_chat_greedy_prints_only_the_completion(smollm2_fp16_dir) -> None:
    r = run("generate", "--model", smollm2_fp16_dir, "--prompt", "What is the capital of France?",
            "--chat", "--temperature", "0", "--device", "cpu", "--max-new-tokens", "20")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The capital of France is Paris.\n"
    assert "tok/s" in r.stderr


def test_perplexity_last_line(smollm2_fp16_dir, tmp_path, reference_dir) -> None:
    ids = np.load(reference_dir / "ppl_ids.npy")[:2, :48]
    np.save(tmp_path / "ids.npy", ids)
    r = run("perplexity", "--model", smollm2_fp16_dir, "--ids", str(tmp_path / "ids.npy"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    assert 1.0 < float(last.split(": ")[1]) < 200.0


def test_chat_keeps_history(smollm2_fp16_dir) -> None:
    r = run("chat", "--model", smollm2_fp16_dir, "--device", "cpu", "--temperature", "0",
            "--max-new-tokens", "12", stdin="What is the capital of France?\nRepeat that.\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant> ") == 2
    assert "Paris" in r.stdout


def test_errors_are_one_line_with_nonzero_exit(tmp_path) -> None:
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", "--device", "cpu")
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def test_bad_ids_file(smollm2_fp16_dir, tmp_path) -> None:
    (tmp_path / "x.npy").write_text("not numpy")
    r = run("perplexity", "--model", smollm2_fp16_dir, "--ids", str(tmp_path / "x.npy"), "--device", "cpu")
    assert r.returncode == 2 and "x.npy" in r.stderr and "Traceback" not in r.stderr


def test_bad_sampler_value(smollm2_fp16_dir) -> None:
    r = run("generate", "--model", smollm2_fp16_dir, "--prompt", "hi", "--device", "cpu", "--top-p", "3")
    assert r.returncode == 2 and "top_p" in r.stderr


def test_doctor_runs_without_gpu() -> None:
    r = run("doctor")
    assert r.returncode == 0
    assert "torch" in r.stdout and "GPU" in r.stdout and "Kestrel kernels" in r.stdout
