"""The CUDA sources compile (CI's guard against a broken .cu file), where nvcc is on PATH.

Every .cu file in app/engine/csrc goes through `nvcc -c` for one architecture (sm_80: the oldest we
support, and one arch keeps this to minutes on 2 cores), the .cpp through the host compiler, against
the installed torch's headers with the flags of the real build (app/engine/_ext_build.py plus torch's
own nvcc flags). Nothing is linked or run, so no GPU and no CUDA build of torch are needed: the CPU
wheel ships the ATen/c10 CUDA headers. Host code is compiled at -O0 (device code stays optimized by
ptxas), which changes no diagnostics and saves most of the host compiler's time.
A deliberately broken copy of a .cu file must fail, with nvcc's error text, or this check proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from app.engine import _ext_build

NVCC = shutil.which("nvcc")
pytestmark = [
    pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA sources are not compile-checked here"),
    pytest.mark.slow,
    pytest.mark.timeout(3600),      # minutes on an idle 2-core machine; far longer when it is shared
]
ARCH = "80"
# A CPU build of torch ships the CUDA headers but not this one, which its build generates.
CMAKE_MACROS = "c10/cuda/impl/cuda_cmake_macros.h"


def jobs() -> int:
    return max(1, int(os.environ.get("KESTREL_NVCC_JOBS") or os.cpu_count() or 1))


@pytest.fixture(scope="module")
def include_dirs(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    dirs = list(include_paths())
    if not any((Path(d) / CMAKE_MACROS).is_file() for d in dirs):
        shim = tmp_path_factory.mktemp("torch-shim")
        (shim / CMAKE_MACROS).parent.mkdir(parents=True)
        (shim / CMAKE_MACROS).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(shim))
    return [*dirs, sysconfig.get_paths()["include"], str(_ext_build.CSRC)]


def common_flags(include_dirs: list[str]) -> list[str]:
    import torch

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    return ([f"-I{d}" for d in include_dirs] +
            ["-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DTORCH_EXTENSION_NAME={_ext_build.EXT_NAME}",
             "-DTORCH_API_INCLUDE_EXTENSION_H"])


def compile_command(src: Path, obj: Path, include_dirs: list[str]) -> list[str]:
    """nvcc -c for .cu (device code for sm_80, host at -O0), the host compiler for .cpp (syntax only)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    if src.suffix == ".cu":
        flags = [f for f in _ext_build.NVCC_FLAGS if not f.startswith("-O")]
        return [NVCC, "-c", str(src), "-o", str(obj), *common_flags(include_dirs), *COMMON_NVCC_FLAGS, *flags,
                "-O0", "-Xcompiler", "-fPIC", f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}"]
    cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
    return [cxx, "-fsyntax-only", str(src), *common_flags(include_dirs), "-fPIC"]


def compile_one(src: Path, out_dir: Path, include_dirs: list[str]) -> tuple[Path, int, str]:
    cmd = compile_command(src, out_dir / (src.name + ".o"), include_dirs)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3300)
    return src, proc.returncode, proc.stdout + proc.stderr


def errors_of(output: str) -> str:
    """nvcc/gcc's error lines with a little context (warnings from torch's headers left out)."""
    lines = output.splitlines()
    picked = [i for i, line in enumerate(lines) if "error" in line.lower()]
    keep = sorted({j for i in picked for j in range(max(0, i - 1), min(len(lines), i + 3))})
    return "\n".join(lines[j] for j in keep)[-6000:] or output[-6000:]


def test_every_cuda_source_compiles(include_dirs: list[str], tmp_path: Path) -> None:
    sources = [Path(s) for s in _ext_build.sources()]
    assert any(s.suffix == ".cu" for s in sources), f"no .cu files in {_ext_build.CSRC}"
    with ThreadPoolExecutor(max_workers=jobs()) as pool:
        results = list(pool.map(lambda s: compile_one(s, tmp_path, include_dirs), sources))
    failed = [f"{src.name} (exit {rc}):\n{errors_of(out)}" for src, rc, out in results if rc != 0]
    assert not failed, "CUDA sources do not compile:\n\n" + "\n\n".join(failed)
    for src in sources:
        if src.suffix == ".cu":
            assert (tmp_path / (src.name + ".o")).stat().st_size > 0


def test_a_broken_cu_file_fails_to_compile(include_dirs: list[str], tmp_path: Path) -> None:
    """The check above can fail: a copy of a real kernel file with one undefined name does not compile."""
    original = min((Path(s) for s in _ext_build.sources() if s.endswith(".cu")), key=lambda p: p.stat().st_size)
    broken = tmp_path / original.name
    broken.write_text(original.read_text(encoding="utf-8") +
                      "\n__global__ void kestrel_broken(float* p) { p[0] = kestrel_undefined_name; }\n",
                      encoding="utf-8")
    src, rc, out = compile_one(broken, tmp_path, include_dirs)
    assert rc != 0, f"nvcc accepted a broken file:\n{out[-2000:]}"
    assert "kestrel_undefined_name" in errors_of(out) and "undefined" in errors_of(out)
