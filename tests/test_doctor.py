"""`kestrel doctor` names the GPU, driver, CUDA toolkit, torch, whether our kernels are compiled and loaded
(and why not), and flash-attn; the reasons come from the same code the engine and setup.py use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from app.engine import _ext_build, doctor

REPO = Path(__file__).resolve().parent.parent


def test_doctor_command_prints_every_fact() -> None:
    out = subprocess.run([sys.executable, str(REPO / "main.py"), "doctor"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    facts = {k.strip(): v.strip() for k, _, v in (line.partition(": ") for line in out.stdout.splitlines())}
    for key in ("torch", "torch CUDA build", "GPU", "NVIDIA driver", "CUDA toolkit", "kernels compiled",
                "Kestrel kernels", "flash-attn"):
        assert facts.get(key), f"doctor does not print {key!r}:\n{out.stdout}"
    assert facts["torch"] == torch.__version__
    if torch.version.cuda is None:
        assert facts["Kestrel kernels"] == f"not available: this PyTorch ({torch.__version__}) is a CPU-only build"
    built = _ext_build.built_module_path()
    assert facts["kernels compiled"] == (f"built ({built})" if built else _ext_build.build_state())


def test_toolkit_row_follows_nvcc(monkeypatch: pytest.MonkeyPatch) -> None:
    home = _ext_build.find_cuda_home()
    if home is not None:
        release = _ext_build.nvcc_release(os.path.join(home, "bin", "nvcc"))
        assert release and dict(doctor.report())["CUDA toolkit"] == f"nvcc {release} at {home}"
    monkeypatch.setattr(_ext_build, "find_cuda_home", lambda: None)   # a machine without a toolkit
    assert dict(doctor.report())["CUDA toolkit"] == "no nvcc found (only needed to build Kestrel's kernels)"


def test_find_cuda_home_skips_a_wrapper_without_headers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An nvcc wrapper script on PATH (here /usr/local/bin/nvcc) is not the toolkit folder torch guesses."""
    wrapper_bin = tmp_path / "wrapper" / "bin"
    wrapper_bin.mkdir(parents=True)
    (wrapper_bin / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    (wrapper_bin / "nvcc").chmod(0o755)
    toolkit = tmp_path / "cuda-99.1"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 99.1, V99.1.1'\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", str(wrapper_bin))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "wrapper"))        # no headers there: skipped
    found = _ext_build.find_cuda_home()
    assert found != str(tmp_path / "wrapper")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert _ext_build.find_cuda_home() == str(toolkit)
    assert _ext_build.nvcc_release(str(toolkit / "bin" / "nvcc")) == "99.1"
    assert dict(doctor.report())["CUDA toolkit"] == f"nvcc 99.1 at {toolkit}"


def test_install_note_explains_a_missing_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """setup.py's status file is what doctor (and the engine's log line) quote when nothing was built."""
    monkeypatch.setattr(_ext_build, "EXT_NAME", "kestrel_cuda_not_here")
    monkeypatch.setattr(_ext_build, "STATUS_FILE", tmp_path / "status.txt")
    assert _ext_build.build_state().startswith("not built (pip install builds it")
    (tmp_path / "status.txt").write_text("nvcc 12.4 and torch's CUDA 13.0 differ in major version\n")
    assert _ext_build.build_state() == "not built: nvcc 12.4 and torch's CUDA 13.0 differ in major version"
    assert dict(doctor.report())["kernels compiled"] == _ext_build.build_state()


def test_setup_py_skips_the_build_for_a_cpu_torch() -> None:
    """A CPU torch compiles nothing (README's set-up stays quick): setup.py says so and defines no extension."""
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    code = ("import runpy, setuptools; setuptools.setup = lambda **kw: print('EXT', kw.get('ext_modules')); "
            "runpy.run_path('setup.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "EXT None" in out.stdout and "CPU-only build" in out.stderr
    assert not _ext_build.STATUS_FILE.exists()


def test_functions_list_matches_the_bindings() -> None:
    """_ext_build.FUNCTIONS is what decides whether a prebuilt module is current: with the optional
    entry points it must name every m.def."""
    text = (REPO / "app" / "engine" / "csrc" / "bindings.cpp").read_text(encoding="utf-8")
    named = [*_ext_build.FUNCTIONS, *_ext_build.OPTIONAL_FUNCTIONS]
    assert sorted(re.findall(r'm\.def\("(\w+)"', text)) == sorted(named)


def test_a_prebuilt_extension_from_older_sources_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calling a function it lacks would fail mid-generation; the engine takes the PyTorch path and says why."""
    stale = types.SimpleNamespace(**{name: len for name in _ext_build.FUNCTIONS if name != "rope_cache_decode"})
    real_import = _ext_build.importlib.import_module
    monkeypatch.setattr(_ext_build.importlib, "import_module",
                        lambda name, *a: stale if name == f"app.engine.{_ext_build.EXT_NAME}" else real_import(name, *a))
    monkeypatch.setattr(_ext_build, "built_module_path", lambda: "/b/kestrel_cuda.so")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("KESTREL_JIT", raising=False)
    mod, why = _ext_build._locate()
    assert mod is None
    assert why == ("the built extension does not load (it was built from older sources: lacks rope_cache_decode); "
                   "reinstall Kestrel with `pip install -e .` to rebuild it")
    current = types.SimpleNamespace(**{name: len for name in _ext_build.FUNCTIONS})
    monkeypatch.setattr(_ext_build.importlib, "import_module",
                        lambda name, *a: current if name == f"app.engine.{_ext_build.EXT_NAME}" else real_import(name, *a))
    assert _ext_build._locate() == (current, "prebuilt extension")
