"""The batch-1 half2 gemv without a GPU: its bit tricks on the CPU, and which kernel the backend picks.

tests/csrc/half2_decode_check.cu runs the pair decoding of app/engine/csrc/exl2_half2_decode.cuh
(host code, compiled by nvcc where it is on PATH) against plain code extraction for every bit width.
The kernel itself runs in tests/test_cuda_kernels.py on the device.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.engine import _ext_build

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.timeout(1800)
def test_half2_pair_decoding_on_the_host(tmp_path: Path) -> None:
    exe = tmp_path / "half2_decode_check"
    build = subprocess.run([NVCC, "-std=c++17", "-O1", f"-I{_ext_build.CSRC}",
                            str(ROOT / "tests" / "csrc" / "half2_decode_check.cu"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=1700)
    assert build.returncode == 0, build.stdout + build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-3000:]


class FakeExt:
    """Records which gemv entry point the backend calls."""

    def __init__(self, with_half2: bool = True) -> None:
        self.calls: list[tuple[str, int]] = []
        if with_half2:
            self.exl2_gemv_half2 = lambda x, *rest: self.calls.append(("half2", x.shape[0]))

    def exl2_gemv(self, x, *rest) -> None:
        self.calls.append(("exact", x.shape[0]))


def fake_backend(ext: FakeExt, exact: bool | None = None):
    """A CudaBackend on the CPU with a fake extension (only gemv's choice of kernel is exercised)."""
    from app.engine import cuda_backend as cb

    be = object.__new__(cb.CudaBackend)
    be.ext = ext
    be._acc = torch.zeros(0)
    be._counters = torch.zeros(0, dtype=torch.int32)
    be.gemv_exact = (cb.GEMV_EXACT or not hasattr(ext, "exl2_gemv_half2")) if exact is None else exact
    p = cb.PackedExl2(qweight=torch.zeros(8, 8, dtype=torch.int32), qscale=torch.zeros(1, 1, dtype=torch.int32),
                      step=torch.zeros(1), tiles=torch.zeros(1, 2, dtype=torch.int32),
                      perm=torch.empty(0, dtype=torch.int32), perm_long=None, invperm=None,
                      in_features=32, out_features=8)
    return be, p


@pytest.mark.parametrize("exact", [False, True])
def test_one_row_goes_to_half2_unless_exact(exact: bool) -> None:
    ext = FakeExt()
    be, p = fake_backend(ext, exact)
    for rows in (1, 2, 8, 9, 32):
        be.gemv(torch.zeros(rows, 32, dtype=torch.float16), p, None)
    one_row = [("exact", 1)] if exact else [("half2", 1)]
    assert ext.calls == [*one_row, ("exact", 2), ("exact", 8), ("exact", 8), ("exact", 1),
                         ("exact", 8), ("exact", 8), ("exact", 8), ("exact", 8)]


def test_an_extension_without_half2_uses_the_exact_kernel() -> None:
    ext = FakeExt(with_half2=False)
    be, p = fake_backend(ext)
    assert be.gemv_exact
    be.gemv(torch.zeros(1, 32, dtype=torch.float16), p, None)
    assert ext.calls == [("exact", 1)]


@pytest.mark.parametrize("value,want", [("1", True), ("0", False), ("", True)])  # exact unless opted out
def test_kestrel_gemv_exact_is_read_at_import(value: str, want: bool) -> None:
    env = {**os.environ, "KESTREL_GEMV_EXACT": value}
    proc = subprocess.run([sys.executable, "-c", "import app.engine.cuda_backend as cb; print(cb.GEMV_EXACT)"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(want)
