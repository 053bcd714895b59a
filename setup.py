"""Build of the CUDA extension (app.engine.kestrel_cuda) during `pip install`; the rest is pure Python.

The extension is compiled when the environment being installed into has a CUDA build of torch and a
CUDA toolkit (nvcc) of the same major version is found. Anywhere else nothing is compiled and the
install stays fast: the engine runs the pure-PyTorch path and says why (app/engine/_ext_build.py).

pip builds in an isolated environment without torch, so torch is looked up in the target environment:
`python -E` (the interpreter pip runs the build with, minus the PYTHONPATH pip isolates it with) says
where torch lies; its version.py tells CPU from CUDA builds without importing it, and only for a CUDA
build is that site-packages appended to sys.path so torch.utils.cpp_extension can compile against it.

Environment: TORCH_CUDA_ARCH_LIST (default 8.0;8.6;8.9;9.0+PTX), MAX_JOBS (parallel nvcc processes),
CUDA_HOME, KESTREL_NO_CUDA_EXT=1 (never build). A failed compile prints one warning and leaves the
package installable; the reason is kept in app/engine/kestrel_cuda.build-status.txt for the runtime.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _ext_build():
    """app/engine/_ext_build.py by file path: the `app` package may not be importable here."""
    spec = importlib.util.spec_from_file_location("_kestrel_ext_build", ROOT / "app" / "engine" / "_ext_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _say(msg: str) -> None:
    print(f"kestrel: {msg}", file=sys.stderr, flush=True)


def _target_torch_dir() -> str | None:
    """The torch package folder of the environment being installed into, or None."""
    spec = importlib.util.find_spec("torch")
    if spec and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    code = "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s else '')"
    try:
        out = subprocess.run([sys.executable, "-E", "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _torch_cuda(torch_dir: str) -> str | None:
    """torch.version.cuda read from torch/version.py (no import: fast on CPU installs)."""
    try:
        text = (Path(torch_dir) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


def cuda_extension() -> dict:
    eb = _ext_build()
    status = eb.STATUS_FILE
    status.unlink(missing_ok=True)
    if os.environ.get("KESTREL_NO_CUDA_EXT") == "1":
        _say("KESTREL_NO_CUDA_EXT=1: the CUDA extension is not built")
        return {}

    def skip(reason: str) -> dict:
        _say(f"the CUDA extension is not built: {reason}")
        status.write_text(reason + "\n", encoding="utf-8")
        return {}

    torch_dir = _target_torch_dir()
    if torch_dir is None:       # pip installs the dependencies after building this package
        return skip("torch was not installed yet when Kestrel was built; now that it is, run "
                    "`pip install -e .` once more")
    torch_cuda = _torch_cuda(torch_dir)
    if torch_cuda is None:
        _say("torch is a CPU-only build: the CUDA extension is not built (the engine uses PyTorch)")
        return {}

    home = eb.find_cuda_home()
    if home is None:
        return skip(f"torch is built for CUDA {torch_cuda} but no CUDA toolkit (nvcc) was found; install "
                    f"CUDA toolkit {torch_cuda.split('.')[0]}.x and set CUDA_HOME")
    nvcc = os.path.join(home, "bin", "nvcc")
    release = eb.nvcc_release(nvcc)
    if release is None:
        return skip(f"{nvcc} does not run")
    if release.split(".")[0] != torch_cuda.split(".")[0]:
        return skip(f"nvcc {release} ({nvcc}) and torch's CUDA {torch_cuda} differ in major version, which "
                    f"torch cannot link; install CUDA toolkit {torch_cuda.split('.')[0]}.x (set CUDA_HOME to it) "
                    f"or a torch built for CUDA {release.split('.')[0]}")
    sources = [os.path.relpath(s, ROOT) for s in eb.sources()]
    if not sources:
        return {}

    os.environ["CUDA_HOME"] = home                   # before torch.utils.cpp_extension guesses its own
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", eb.DEFAULT_ARCH_LIST)
    site = os.path.dirname(torch_dir)
    if site not in sys.path:
        sys.path.append(site)                        # after the build environment's own packages
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001 - a broken torch: install without the extension
        return skip(f"torch from {torch_dir} does not import ({type(e).__name__}: {e})")
    _say(f"building the CUDA extension with nvcc {release} for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']} (a few minutes; MAX_JOBS sets parallel compiles)")

    import torch

    class OptionalBuildExtension(BuildExtension):
        """A compile error leaves the package installable without the extension.

        Objects go to build/ in the checkout (not pip's temporary folder), so reinstalling after a change
        of Python code recompiles nothing, and after a change of one .cu file only that file (ninja).
        """

        def finalize_options(self) -> None:
            super().finalize_options()
            tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}"
            self.build_temp = str(ROOT / "build" / f"{eb.EXT_NAME}-{tag}")

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001
                reason = f"the compile failed: {eb._first_line(e)}"
                _say(f"warning: the CUDA extension was not built ({reason}); the pure-PyTorch path will be used")
                for ext in self.extensions:
                    Path(self.get_ext_fullpath(ext.name)).parent.joinpath(status.name).write_text(
                        reason + "\n", encoding="utf-8")
                if not self.inplace:
                    status.write_text(reason + "\n", encoding="utf-8")

    ext = CUDAExtension(f"app.engine.{eb.EXT_NAME}", sources,
                        extra_compile_args={"cxx": list(eb.CXX_FLAGS), "nvcc": list(eb.NVCC_FLAGS)})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(**cuda_extension())
