"""Downloads against a real HTTP fake Hub: verification, resume after SIGKILL, broken connections,
corrupted bytes, auth, 404, offline mode and a full disk (a real tmpfs when we may mount one)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from app.hub.access import HubAccess
from app.hub.download import (
    INCOMPLETE,
    MANIFEST,
    PARTIAL_DIR,
    DownloadJob,
    JobState,
    folder_name,
    pending_downloads,
)
from app.hub.errors import (
    DiskFullError,
    HubAuthError,
    HubIntegrityError,
    HubNetworkError,
    HubNotFoundError,
    HubOfflineError,
)
from tests.hubserver import HubServer

ROOT = Path(__file__).resolve().parent.parent
TINY = "kestrel-test/TinyLlama-1.1B-exl2"
GATED = "kestrel-test/Gated-Llama-exl2"
WEIGHTS = "output.safetensors"


def branch_files(hub: HubServer, repo: str = TINY, branch: str = "4_0") -> dict[str, bytes]:
    return {p: d for p, d in hub.repos[repo].branches[branch].items() if p != ".gitattributes"}


def assert_complete(folder: str, expected: dict[str, bytes]) -> None:
    for path, data in expected.items():
        got = Path(folder, path).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), path
    leftovers = [p for p in Path(folder).rglob("*") if p.name.endswith(INCOMPLETE)]
    assert leftovers == []


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def test_full_download_verifies_and_moves_into_place(hub, access, tmp_path):
    snapshots = []
    lib = tmp_path / "lib"
    job = DownloadJob(TINY, "4_0", str(lib), access=access, on_progress=snapshots.append, reserve_bytes=0)
    assert job.run() is JobState.COMPLETE
    final = lib / folder_name(TINY, "4_0")
    assert job.final_dir == str(final) and final.is_dir()
    expected = branch_files(hub)
    assert_complete(job.final_dir, expected)
    assert not (final / ".gitattributes").exists()
    assert not (lib / PARTIAL_DIR).exists()               # moved out, nothing left behind
    assert (final / MANIFEST).is_file()
    # every byte crossed the wire exactly once
    for path, data in expected.items():
        assert hub.body_bytes[(TINY, path)] == len(data)
    # LFS went through the CDN redirect, with the commit pinned in the URL
    commit = hub.repos[TINY].commit("4_0")
    cdn = hub.file_requests(TINY, WEIGHTS)
    assert len(cdn) == 1 and cdn[0]["kind"] == "cdn" and commit in cdn[0]["path"]
    # progress: overall and per file, ending complete
    last = snapshots[-1]
    assert last.state is JobState.COMPLETE and last.done == last.total == sum(map(len, expected.values()))
    assert {f.path for f in last.files} == set(expected) and all(f.state == "done" for f in last.files)
    assert any(s.state is JobState.RUNNING for s in snapshots)
    # a second job finds it in the library and fetches nothing
    before = len(hub.requests)
    assert DownloadJob(TINY, "4_0", str(lib), access=access).run() is JobState.COMPLETE
    assert len(hub.requests) == before


def test_killed_process_resumes_with_range_without_refetching(hub, access, tmp_path):
    lib = tmp_path / "lib"
    expected = branch_files(hub)
    size = len(expected[WEIGHTS])
    held = 600_000
    hub.hold(TINY, WEIGHTS, held)   # the server sends 600 kB then waits: the kill lands mid-file
    script = (
        "import sys\n"
        "from app.hub.access import HubAccess\n"
        "from app.hub.download import DownloadJob\n"
        "DownloadJob(sys.argv[1], '4_0', sys.argv[3], access=HubAccess(endpoint=sys.argv[2]),"
        " reserve_bytes=0).run()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script, TINY, hub.url, str(lib)], cwd=ROOT, env=env)
    partial = lib / PARTIAL_DIR / folder_name(TINY, "4_0")
    part = partial / (WEIGHTS + INCOMPLETE)
    try:
        wait_for(lambda: size_of(part) == held and (partial / "config.json").is_file()
                 or proc.poll() is not None, what="600 kB on disk")
        assert proc.poll() is None, "the download process exited before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        hub.release(TINY, WEIGHTS)
    assert proc.returncode == -signal.SIGKILL
    assert size_of(part) == held
    assert [m["branch"] for m in pending_downloads(str(lib))] == ["4_0"]

    mark = len(hub.requests)
    job = DownloadJob(TINY, "4_0", str(lib), access=access, reserve_bytes=0)
    assert job.run() is JobState.COMPLETE
    assert_complete(job.final_dir, expected)
    resumed = hub.file_requests(TINY, WEIGHTS, since=mark)
    assert [r["range"] for r in resumed] == [f"bytes={held}-"]
    assert resumed[0]["sent"] == size - held                  # only the missing bytes came again
    assert hub.file_requests(TINY, "config.json", since=mark) == []   # finished files untouched
    assert pending_downloads(str(lib)) == []


def test_pause_resume_and_cancel(hub, access, tmp_path):
    lib = tmp_path / "lib"
    expected = branch_files(hub)
    hub.hold(TINY, WEIGHTS, 300_000)
    job = DownloadJob(TINY, "4_0", str(lib), access=access, reserve_bytes=0)
    part = Path(job.partial_dir) / (WEIGHTS + INCOMPLETE)
    job.start()
    wait_for(lambda: size_of(part) == 300_000, what="first 300 kB")
    job.pause()
    hub.release(TINY, WEIGHTS)
    assert job.wait(20) is JobState.PAUSED
    kept = size_of(part)
    assert 300_000 <= kept < len(expected[WEIGHTS])

    mark = len(hub.requests)
    assert job.run() is JobState.COMPLETE
    assert [r["range"] for r in hub.file_requests(TINY, WEIGHTS, since=mark)] == [f"bytes={kept}-"]
    assert_complete(job.final_dir, expected)

    hub.hold(TINY, WEIGHTS, 200_000)
    other = DownloadJob(TINY, "6_5", str(lib), access=access, reserve_bytes=0)
    other_part = Path(other.partial_dir) / (WEIGHTS + INCOMPLETE)
    other.start()
    wait_for(lambda: size_of(other_part) == 200_000, what="200 kB of 6_5")
    other.cancel()
    hub.release(TINY, WEIGHTS)
    assert other.wait(20) is JobState.CANCELLED
    assert not Path(other.partial_dir).exists() and not Path(other.final_dir).exists()

    hub.hold(TINY, WEIGHTS, 100_000)   # cancelling a paused job deletes its bytes too
    third = DownloadJob(TINY, "3.0bpw_h6", str(lib), access=access, reserve_bytes=0)
    third_part = Path(third.partial_dir) / (WEIGHTS + INCOMPLETE)
    third.start()
    wait_for(lambda: size_of(third_part) == 100_000, what="100 kB of 3.0bpw_h6")
    third.pause()
    hub.release(TINY, WEIGHTS)
    assert third.wait(20) is JobState.PAUSED and third_part.is_file()
    third.cancel()
    assert third.state is JobState.CANCELLED and not Path(third.partial_dir).exists()
    assert pending_downloads(str(lib)) == []


def test_dropped_connection_is_resumed_in_place(hub, access, tmp_path):
    hub.drop_after[(TINY, WEIGHTS)] = [300_000]
    job = DownloadJob(TINY, "4_0", str(tmp_path / "lib"), access=access, reserve_bytes=0, retry_delay_s=0.05)
    assert job.run() is JobState.COMPLETE
    expected = branch_files(hub)
    assert_complete(job.final_dir, expected)
    reqs = hub.file_requests(TINY, WEIGHTS)
    assert [(r["range"], r["sent"]) for r in reqs] == [(None, 300_000),
                                                        ("bytes=300000-", len(expected[WEIGHTS]) - 300_000)]


def test_connection_that_keeps_dropping_fails_then_resumes(hub, access, tmp_path):
    lib = tmp_path / "lib"
    # Bytes received reset the retry budget, so it gives up only after 3 breaks (1 try + 2 retries)
    # with no byte in between: 100k|0|100k, then 0|0 are the 2nd and 3rd breaks in a row.
    hub.drop_after[(TINY, WEIGHTS)] = [100_000, 0, 100_000, 0, 0]
    job = DownloadJob(TINY, "4_0", str(lib), access=access, reserve_bytes=0, network_retries=2,
                      retry_delay_s=0.01)
    with pytest.raises(HubNetworkError, match="connection kept breaking") as info:
        job.run()
    assert "Resume" in str(info.value)
    assert job.state is JobState.FAILED
    part = Path(job.partial_dir) / (WEIGHTS + INCOMPLETE)
    assert size_of(part) == 200_000                 # two 100 kB pieces, the second continuing the first
    assert hub.drop_after[(TINY, WEIGHTS)] == []
    mark = len(hub.requests)
    assert DownloadJob(TINY, "4_0", str(lib), access=access, reserve_bytes=0).run() is JobState.COMPLETE
    assert [r["range"] for r in hub.file_requests(TINY, WEIGHTS, since=mark)] == ["bytes=200000-"]
    assert_complete(job.final_dir, branch_files(hub))


def test_corrupted_file_is_refetched_once(hub, access, tmp_path):
    hub.corrupt[(TINY, WEIGHTS)] = 1
    hub.corrupt[(TINY, "config.json")] = 1          # non-LFS: checked against the git blob sha1
    snapshots = []
    job = DownloadJob(TINY, "4_0", str(tmp_path / "lib"), access=access, reserve_bytes=0,
                      on_progress=snapshots.append)
    assert job.run() is JobState.COMPLETE
    expected = branch_files(hub)
    assert_complete(job.final_dir, expected)
    assert hub.body_bytes[(TINY, WEIGHTS)] == 2 * len(expected[WEIGHTS])
    assert hub.body_bytes[(TINY, "config.json")] == 2 * len(expected["config.json"])
    assert any(f.state == "retrying" for s in snapshots for f in s.files)


def test_file_corrupted_twice_raises_integrity_error(hub, access, tmp_path):
    hub.corrupt[(TINY, WEIGHTS)] = 2
    job = DownloadJob(TINY, "4_0", str(tmp_path / "lib"), access=access, reserve_bytes=0)
    with pytest.raises(HubIntegrityError, match="checksum mismatch for output.safetensors"):
        job.run()
    assert not Path(job.final_dir).exists()


def test_gated_repo_asks_for_token_then_downloads(hub, access, tmp_path):
    lib = str(tmp_path / "lib")
    with pytest.raises(HubAuthError, match="token"):
        DownloadJob(GATED, "4_0", lib, access=access, reserve_bytes=0).run()
    with_token = HubAccess(endpoint=hub.url, cache_dir=access.cache_dir, token="hf_kestrel_test_token")
    job = DownloadJob(GATED, "4_0", lib, access=with_token, reserve_bytes=0)
    assert job.run() is JobState.COMPLETE
    assert_complete(job.final_dir, branch_files(hub, GATED))


def test_not_found(access, tmp_path):
    with pytest.raises(HubNotFoundError, match="nobody/missing@4_0"):
        DownloadJob("nobody/missing", "4_0", str(tmp_path / "lib"), access=access).run()
    with pytest.raises(HubNotFoundError, match="branch does not exist"):
        DownloadJob(TINY, "9_9", str(tmp_path / "lib"), access=access).run()


def test_unreachable_hub_is_a_network_error(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    server = HubServer()
    url = server.url
    server.httpd.server_close()                    # nothing listens on that port any more
    with pytest.raises(HubNetworkError, match="network error"):
        DownloadJob(TINY, "4_0", str(tmp_path / "lib"), access=HubAccess(endpoint=url)).run()


def test_offline_mode_works_from_library_only(hub, access, tmp_path, monkeypatch):
    lib = str(tmp_path / "lib")
    assert DownloadJob(TINY, "4_0", lib, access=access, reserve_bytes=0).run() is JobState.COMPLETE
    before = len(hub.requests)
    offline = HubAccess(endpoint=hub.url, offline=True)
    assert DownloadJob(TINY, "4_0", lib, access=offline).run() is JobState.COMPLETE
    with pytest.raises(HubOfflineError, match="not in the library"):
        DownloadJob(TINY, "6_5", lib, access=offline).run()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubOfflineError):
        DownloadJob(TINY, "6_5", lib, access=access).run()
    assert len(hub.requests) == before


@pytest.fixture
def small_fs(tmp_path):
    """A real 512 KiB tmpfs when we may mount one (root on Linux); None otherwise."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                              capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        yield None
        return
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10)


def test_full_disk_is_refused_before_starting(hub, access, tmp_path, small_fs):
    if small_fs is not None:
        lib, usage = small_fs / "lib", None               # the real free space of a 512 KiB filesystem
    else:                                                 # no mount: inject the free-space reading
        lib = tmp_path / "lib"

        def usage(_path: str) -> SimpleNamespace:
            return SimpleNamespace(free=400_000)
    kwargs = {"disk_usage": usage} if usage else {}
    mark = len(hub.requests)
    job = DownloadJob(TINY, "4_0", str(lib), access=access, reserve_bytes=0, **kwargs)
    with pytest.raises(DiskFullError, match="is free") as info:
        job.run()
    assert "Free some space" in str(info.value)
    assert hub.file_requests(TINY, WEIGHTS, since=mark) == []    # refused before any file transfer


def test_disk_filling_up_mid_download(hub, access, small_fs):
    if small_fs is None:
        pytest.skip("cannot mount a tmpfs here (needs root); the pre-check test covers the injected case")

    def lying_usage(_path: str) -> SimpleNamespace:
        return SimpleNamespace(free=1 << 40)            # claims plenty: the write itself must fail
    job = DownloadJob(TINY, "4_0", str(small_fs / "lib"), access=access, reserve_bytes=0, disk_usage=lying_usage)
    with pytest.raises(DiskFullError, match="filled up"):
        job.run()
    assert Path(job.partial_dir).is_dir()                # kept, to resume once space is freed
