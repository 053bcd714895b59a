"""Packaging files, checked without building the bundle (CI does not): the PyInstaller spec runs with
PyInstaller's classes stubbed and must name files that exist; the .desktop entry validates; the Inno
Setup script makes the shortcuts; the icons exist at every size; install_desktop.sh really installs
into a throwaway XDG folder; the About dialog and THIRD_PARTY_LICENSES.md list the same components."""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import os
import re
import shutil
import struct
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from app import __version__

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "packaging"
ICON_DIR = REPO / "resources" / "icons" / "app"
PNG_SIZES = (16, 24, 32, 48, 64, 128, 256, 512)
pytestmark = pytest.mark.timeout(60)


# --- the PyInstaller spec ------------------------------------------------------------------------

class Recorder:
    """Stands in for one of PyInstaller's spec classes: keeps its arguments."""

    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]

    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __call__(self, *args: Any, **kwargs: Any) -> types.SimpleNamespace:
        self.calls.append((self.name, args, kwargs))
        return types.SimpleNamespace(pure=[], scripts=[], binaries=[], datas=[], args=args, kwargs=kwargs)


def run_spec(monkeypatch, tmp_path: Path, platform: str, pkg: Path = PKG,
             not_installed: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Execute kestrel.spec as PyInstaller would, with its classes and hook helpers recorded."""
    def copy_metadata(dist: str) -> list[tuple[str, str]]:
        if dist in not_installed:        # what PyInstaller's copy_metadata raises then
            raise importlib.metadata.PackageNotFoundError(dist)
        return [(f"<{dist} metadata>", ".")]

    hooks = types.ModuleType("PyInstaller.utils.hooks")
    hooks.collect_data_files = lambda package: [(f"<{package} data>", package)]
    hooks.collect_submodules = lambda package: [f"{package}.<submodules>"]
    hooks.copy_metadata = copy_metadata
    monkeypatch.setitem(sys.modules, "PyInstaller", types.ModuleType("PyInstaller"))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils", types.ModuleType("PyInstaller.utils"))
    monkeypatch.setitem(sys.modules, "PyInstaller.utils.hooks", hooks)
    monkeypatch.setattr(sys, "platform", platform)
    calls: list = []
    spec_globals = {"__name__": "__main__", "SPECPATH": str(pkg), "workpath": str(tmp_path / "work"),
                    **{name: Recorder(name, calls) for name in ("Analysis", "PYZ", "EXE", "COLLECT")}}
    source = (pkg / "kestrel.spec").read_text(encoding="utf-8")
    exec(compile(source, str(pkg / "kestrel.spec"), "exec"), spec_globals)  # noqa: S102 - our own spec
    return {name: {"args": args, **kwargs} for name, args, kwargs in calls}


def test_spec_builds_a_windowed_one_folder_bundle_with_its_data(monkeypatch, tmp_path: Path) -> None:
    spec = run_spec(monkeypatch, tmp_path, "linux")
    analysis = spec["Analysis"]
    assert analysis["args"][0] == [str(REPO / "main.py")]
    datas = dict((dest, src) for src, dest in analysis["datas"] if not src.startswith("<"))
    assert datas["resources"] == str(REPO / "resources")
    assert datas["app/engine/templates"] == str(REPO / "app" / "engine" / "templates")
    for src in datas.values():
        assert Path(src).exists(), f"the spec bundles {src}, which does not exist"
    assert "PySide6.QtSvg" in analysis["hiddenimports"]          # icons are SVG
    metadata = {src for src, _ in analysis["datas"] if src.endswith(" metadata>")}
    assert {"<torch metadata>", "<PySide6_Essentials metadata>", "<numpy metadata>"} <= metadata  # licenses
    assert "app.<submodules>" in analysis["hiddenimports"]       # lazily imported UI/engine modules
    for binary, dest in analysis["binaries"]:                    # the CUDA extension, when built
        assert dest == "app/engine" and binary.endswith((".so", ".pyd"))
    exe = spec["EXE"]
    assert exe["name"] == "Kestrel" and exe["console"] is False and exe["exclude_binaries"] is True
    assert exe["icon"] is None and exe["version"] is None        # Windows-only resources
    assert spec["COLLECT"]["name"] == "Kestrel"


def test_spec_bundles_a_built_extension(monkeypatch, tmp_path: Path) -> None:
    """A compiled kestrel_cuda module beside the engine goes into the bundle's app/engine."""
    repo = tmp_path / "repo"
    for rel in ("resources", "app/__init__.py", "app/ui", "app/engine/templates", "app/engine/csrc",
                "packaging/kestrel.spec", "packaging/THIRD_PARTY_LICENSES.md", "packaging/version_info.txt"):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).symlink_to(REPO / rel)
    built = repo / "app" / "engine" / "kestrel_cuda.cpython-311-x86_64-linux-gnu.so"
    built.write_bytes(b"\x7fELF")
    spec = run_spec(monkeypatch, tmp_path, "linux", pkg=repo / "packaging")
    assert spec["Analysis"]["binaries"] == [(str(built), "app/engine")]


def test_spec_skips_a_listed_component_that_is_not_installed(monkeypatch, tmp_path: Path) -> None:
    """huggingface_hub >= 2 brings httpx2 instead of httpx: the build goes on without httpx's metadata."""
    datas = run_spec(monkeypatch, tmp_path, "linux", not_installed=("httpx",))["Analysis"]["datas"]
    metadata = {src for src, _ in datas if src.endswith(" metadata>")}
    assert "<httpx metadata>" not in metadata and "<torch metadata>" in metadata


def test_windows_bundle_has_the_linux_contents(monkeypatch, tmp_path: Path) -> None:
    """One spec for both: the Windows run adds only the icon and version resource."""
    linux = run_spec(monkeypatch, tmp_path, "linux")["Analysis"]
    windows = run_spec(monkeypatch, tmp_path, "win32")["Analysis"]
    for key in ("datas", "hiddenimports", "excludes", "binaries"):
        assert windows[key] == linux[key], key


def script_steps(text: str) -> dict[str, object]:
    """What a build script does, in terms comparable across bash and PowerShell."""
    call = re.search(r"-m PyInstaller (.*?)kestrel\.spec", text, re.S)
    return {
        "pyinstaller requirement": re.findall(r'"(pyinstaller[<>=!~][^"]*)"', text),
        "installs the repo editable": bool(re.search(r"install --quiet -e ", text)),
        "pyinstaller flags": re.findall(r"--[a-z-]+(?: WARN)?", call.group(1)) if call else None,
        "spec": "kestrel.spec" in text,
        "self-test args": sorted(set(re.findall(r"--self-test|--db|--config-dir", text))),
        "offscreen": "QT_QPA_PLATFORM" in text and "offscreen" in text,
        "archive of the folder": bool(re.search(r"tar -C|Compress-Archive", text)),
        "can reuse the build venv": bool(re.search(r"--reuse-venv\)|\[switch\]\$ReuseVenv", text)),
        "names the built extension": "kestrel_cuda*" in text,
        "checks the build venv": "check_venv.py" in text,
    }


def test_windows_build_script_parallels_the_linux_one() -> None:
    linux = script_steps((PKG / "build_linux.sh").read_text(encoding="utf-8"))
    windows = script_steps((PKG / "build_windows.ps1").read_text(encoding="utf-8"))
    assert linux["pyinstaller requirement"] and linux["pyinstaller flags"]
    assert windows == linux


def load_check_venv() -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_venv", PKG / "check_venv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_venv_names_missing_and_out_of_range_dependencies(tmp_path: Path) -> None:
    """With --reuse-venv nothing is installed: a dependency added to pyproject.toml since the venv was made
    must stop the build (PyInstaller would leave it out and the feature would fail only when used)."""
    check_venv = load_check_venv()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["pytest>=1", "kestrel-no-such-package>=1.0", '
                         '"pytest>=999", "kestrel-other-platform; sys_platform == \'no-such-os\'"]\n')
    pytest_version = importlib.metadata.version("pytest")
    assert check_venv.problems(pyproject) == [
        "kestrel-no-such-package is not installed (needs kestrel-no-such-package>=1.0)",
        f"pytest {pytest_version} is installed (needs pytest>=999)"]
    assert check_venv.problems(REPO / "pyproject.toml") == []     # this test environment has them all


def test_check_venv_prints_the_extension_state() -> None:
    out = subprocess.run([sys.executable, str(PKG / "check_venv.py")], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "== CUDA extension: " in out.stdout


def test_self_test_reports_the_extension_state(tmp_path: Path) -> None:
    """--self-test (what build_linux.sh runs on the built bundle) says whether the compiled extension is
    there, imports and has every function, besides the backend; exit 0 without a GPU too."""
    from app.engine import _ext_build

    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    out = subprocess.run([sys.executable, str(REPO / "main.py"), "--self-test", "--db", str(tmp_path / "c.sqlite3"),
                          "--config-dir", str(tmp_path / "config")], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("backend: ") for line in lines), out.stdout
    assert f"extension: {_ext_build.import_state()}" in lines, out.stdout


def test_extension_import_state_in_words(monkeypatch) -> None:
    from app.engine import _ext_build

    monkeypatch.setattr(_ext_build, "built_module_path", lambda: None)
    assert _ext_build.import_state() == _ext_build.build_state()
    monkeypatch.setattr(_ext_build, "built_module_path", lambda: "/b/kestrel_cuda.so")
    real_import = _ext_build.importlib.import_module
    modules: dict[str, object] = {}

    def fake_import(name: str, *args: Any) -> object:
        if name == f"app.engine.{_ext_build.EXT_NAME}":
            if isinstance(modules["ext"], Exception):
                raise modules["ext"]
            return modules["ext"]
        return real_import(name, *args)

    monkeypatch.setattr(_ext_build.importlib, "import_module", fake_import)
    modules["ext"] = types.SimpleNamespace(**{name: len for name in _ext_build.FUNCTIONS})
    assert _ext_build.import_state() == (f"present (/b/kestrel_cuda.so), imports with all "
                                         f"{len(_ext_build.FUNCTIONS)} functions")
    modules["ext"] = types.SimpleNamespace(**{name: len for name in _ext_build.FUNCTIONS[:-2]})
    assert _ext_build.import_state() == ("present (/b/kestrel_cuda.so), imports, but is older than its "
                                         f"sources: lacks {', '.join(_ext_build.FUNCTIONS[-2:])}")
    modules["ext"] = ImportError("libc10_cuda.so: cannot open shared object file\nmore")
    assert _ext_build.import_state() == ("present (/b/kestrel_cuda.so), does not import: "
                                         "libc10_cuda.so: cannot open shared object file")


def test_spec_on_windows_adds_icon_and_version_resource(monkeypatch, tmp_path: Path) -> None:
    spec = run_spec(monkeypatch, tmp_path, "win32")
    exe = spec["EXE"]
    assert exe["icon"] == str(ICON_DIR / "kestrel.ico")
    version_file = Path(exe["version"])
    text = version_file.read_text(encoding="utf-8")
    assert "@VERSION" not in text
    tree = ast.parse(text, mode="eval")                          # PyInstaller eval()s this file
    assert isinstance(tree.body, ast.Call) and tree.body.func.id == "VSVersionInfo"
    numbers = tuple(int(n) for n in __version__.split(".")) + (0,) * (4 - len(__version__.split(".")))
    assert f"filevers=({', '.join(map(str, numbers))})" in text
    assert f"StringStruct('ProductVersion', '{__version__}')" in text
    assert "StringStruct('OriginalFilename', 'Kestrel.exe')" in text


# --- desktop integration -------------------------------------------------------------------------

def desktop_entry(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # keys are case-sensitive
    parser.read(path, encoding="utf-8")
    return dict(parser["Desktop Entry"])


def test_desktop_file_is_valid() -> None:
    path = PKG / "kestrel.desktop"
    entry = desktop_entry(path)
    for key in ("Type", "Name", "Exec", "Icon", "Categories", "Comment"):
        assert entry.get(key), f"{path} lacks {key}"
    assert entry["Type"] == "Application" and entry["Terminal"] == "false" and entry["Icon"] == "kestrel"
    assert entry["Categories"].endswith(";")


@pytest.mark.skipif(not shutil.which("desktop-file-validate"),
                    reason="desktop-file-validate is not installed (Debian: desktop-file-utils)")
def test_desktop_file_passes_desktop_file_validate(tmp_path: Path) -> None:
    out = subprocess.run(["desktop-file-validate", str(PKG / "kestrel.desktop")], capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr
    broken = tmp_path / "broken.desktop"      # the validator does reject a bad entry
    broken.write_text((PKG / "kestrel.desktop").read_text().replace("Type=Application", "Type=Program"))
    assert subprocess.run(["desktop-file-validate", str(broken)], capture_output=True).returncode != 0


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("bash"), reason="Linux desktop install")
def test_install_desktop_script_installs_and_uninstalls(tmp_path: Path) -> None:
    fake_bundle = tmp_path / "bundle dir"
    fake_bundle.mkdir()
    exe = fake_bundle / "Kestrel"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "share"))
    out = subprocess.run(["bash", str(PKG / "install_desktop.sh"), str(exe)], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    installed = tmp_path / "share" / "applications" / "kestrel.desktop"
    entry = desktop_entry(installed)
    assert entry["Exec"] == f'"{exe}"' and entry["TryExec"] == str(exe)
    for size in PNG_SIZES:
        assert (tmp_path / f"share/icons/hicolor/{size}x{size}/apps/kestrel.png").is_file()
    assert (tmp_path / "share/icons/hicolor/scalable/apps/kestrel.svg").is_file()
    if shutil.which("desktop-file-validate"):
        check = subprocess.run(["desktop-file-validate", str(installed)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    out = subprocess.run(["bash", str(PKG / "install_desktop.sh"), "--uninstall"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and not installed.exists()
    missing = subprocess.run(["bash", str(PKG / "install_desktop.sh"), str(tmp_path / "nope")], env=env,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "not an executable" in missing.stderr


@pytest.mark.parametrize("script", ["build_linux.sh", "install_desktop.sh"])
def test_shell_scripts_parse(script: str) -> None:
    out = subprocess.run(["bash", "-n", str(PKG / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_inno_setup_script_installs_the_exe_with_shortcuts() -> None:
    text = (PKG / "kestrel.iss").read_text(encoding="utf-8")
    sections = {line.strip() for line in text.splitlines() if line.strip().startswith("[")}
    assert {"[Setup]", "[Files]", "[Icons]", "[Tasks]"} <= sections
    assert '#define AppExe "Kestrel.exe"' in text
    icons = text.split("[Icons]", 1)[1].split("\n[", 1)[0]
    assert '"{group}\\{#AppName}"; Filename: "{app}\\{#AppExe}"' in icons            # Start menu
    assert '"{autodesktop}\\{#AppName}"' in icons and "Tasks: desktopicon" in icons  # optional desktop
    assert 'Name: "desktopicon"' in text and "Flags: unchecked" in text
    ico = (PKG / text.split("SetupIconFile=", 1)[1].splitlines()[0].replace("\\", "/")).resolve()
    assert ico == ICON_DIR / "kestrel.ico" and ico.is_file()
    assert (PKG / text.split("LicenseFile=", 1)[1].splitlines()[0]).is_file()


def test_windows_build_script_uses_the_spec_and_installer() -> None:
    text = (PKG / "build_windows.ps1").read_text(encoding="utf-8")
    assert "kestrel.spec" in text and "kestrel.iss" in text and "--self-test" in text


# --- icons ---------------------------------------------------------------------------------------

def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("size", PNG_SIZES)
def test_png_icon_sizes(size: int) -> None:
    assert png_size(ICON_DIR / f"kestrel-{size}.png") == (size, size)


def test_ico_holds_png_images_up_to_256() -> None:
    data = (ICON_DIR / "kestrel.ico").read_bytes()
    reserved, kind, count = struct.unpack("<HHH", data[:6])
    assert (reserved, kind) == (0, 1) and count >= 5
    sizes = []
    for i in range(count):
        width, height, _, _, _, bpp, length, offset = struct.unpack("<BBBBHHII", data[6 + 16 * i:22 + 16 * i])
        assert width == height and bpp == 32
        assert data[offset:offset + 8] == b"\x89PNG\r\n\x1a\n" and offset + length <= len(data)
        sizes.append(width or 256)
    assert {16, 32, 48, 256} <= set(sizes)


def test_svg_icon_is_square_svg() -> None:
    root = ET.parse(ICON_DIR / "kestrel.svg").getroot()
    assert root.tag.endswith("svg") and root.get("viewBox") == "0 0 512 512"


# --- licenses ------------------------------------------------------------------------------------

def test_license_file_names_every_bundled_component() -> None:
    from app.ui.about import COMPONENTS

    text = (PKG / "THIRD_PARTY_LICENSES.md").read_text(encoding="utf-8")
    for component in COMPONENTS:
        assert f"| {component.name} | {component.license} |" in text, component.name
    assert "LGPL" in text and "replace" in text      # how the bundle meets the LGPL


def test_about_dialog_from_help_menu(qtbot) -> None:
    from PySide6.QtWidgets import QLabel, QMainWindow

    from app.ui.about import install_help_menu, window_title

    window = QMainWindow()
    qtbot.addWidget(window)
    window.show()
    action = install_help_menu(window, Path("/tmp/kestrel-logs"))
    assert [a.text() for a in window.menuBar().actions()] == ["&Help"]
    action.trigger()
    dialog = window.about_dialog
    qtbot.waitUntil(dialog.isVisible, timeout=2000)
    html = dialog.components.toPlainText()
    assert "PySide6" in html and "LGPL-3.0-only" in html and "PyTorch" in html
    labels = " ".join(label.text() for label in dialog.findChildren(QLabel))
    assert f"Kestrel {__version__}" in labels and "/tmp/kestrel-logs" in labels
    assert window_title() == f"Kestrel {__version__}"
    dialog.close()
