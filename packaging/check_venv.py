"""Before a build (build_linux.sh, build_windows.ps1): does the build venv hold the project's
dependencies (pyproject.toml) at the required versions, and what state is the compiled CUDA extension
in (present, imports, built from the current sources)? Exit 1 with the fix when a dependency is missing:
with --reuse-venv nothing is installed, and PyInstaller would quietly leave the package out."""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
except ModuleNotFoundError:
    from pip._vendor.packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def problems(pyproject: Path) -> list[str]:
    """One line per dependency that is not installed, or installed at a version outside its range."""
    out = []
    for text in tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            version = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(f"{req.name} is not installed (needs {text})")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(f"{req.name} {version} is installed (needs {text})")
    return out


def main() -> int:
    bad = problems(REPO / "pyproject.toml")
    for line in bad:
        print(f"== build venv: {line}", flush=True)
    sys.path.insert(0, str(REPO))
    from app.engine._ext_build import import_state

    state = import_state()
    print(f"== CUDA extension: {state}", flush=True)
    if "older than its sources" in state or "does not import" in state:
        print("== warning: on a GPU the bundle will use the PyTorch path instead of this extension; "
              f"rebuild it first: {sys.executable} -m pip install -e {REPO}", flush=True)
    if bad:
        print(f"error: update the build venv: {sys.executable} -m pip install -e {REPO} "
              "(or build without --reuse-venv / -ReuseVenv)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
