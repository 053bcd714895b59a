"""Download one EXL2 branch into the local library: parallel, resumable, verified, moved into place atomically.

Layout while downloading:
    <library>/.partial/<name>/.kestrel-download.json   what is being fetched (repo, branch, pinned commit, files)
    <library>/.partial/<name>/<file>.incomplete         bytes so far; continued with an HTTP Range request
    <library>/.partial/<name>/<file>                     verified against the Hub's sha256 / git sha1
and when every file is verified, one rename makes <library>/<name> appear complete. A job killed at any
point (even SIGKILL) continues from the .incomplete files when a new DownloadJob for the same
(repo, branch, library) runs. The commit is pinned when the download starts, so a branch that moves
mid-download cannot mix files of two uploads; if it moved between runs the partial folder starts over.

We use huggingface_hub for metadata (model_info with files_metadata), URLs, auth headers and its
HTTP session, and stream the bytes ourselves so that pause/cancel act within one chunk and progress
is exact.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from .access import HubAccess
from .browse import RemoteFile
from .errors import (
    DiskFullError,
    HubError,
    HubIntegrityError,
    HubNetworkError,
    HubOfflineError,
    translate,
)

PARTIAL_DIR = ".partial"
MANIFEST = ".kestrel-download.json"
INCOMPLETE = ".incomplete"
CHUNK = 1 << 20
DEFAULT_IGNORE = (".gitattributes",)
DEFAULT_RESERVE = 256 << 20   # keep this much free after the download (swap, temp files, the OS)


class JobState(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    COMPLETE = "complete"
    FAILED = "failed"


@dataclass(frozen=True)
class FileProgress:
    path: str
    done: int
    total: int
    speed_bps: float = 0.0
    eta_s: float | None = None
    state: str = "queued"   # queued | downloading | verifying | retrying | done


@dataclass(frozen=True)
class DownloadProgress:
    """A snapshot for the UI: overall numbers plus every file's."""

    repo_id: str
    branch: str
    state: JobState
    done: int
    total: int
    speed_bps: float
    eta_s: float | None
    files: tuple[FileProgress, ...] = ()

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 0.0


# Called from the download's worker threads (at most ~10 times a second, plus on every state change);
# a GUI must hand the snapshot over to its own thread (e.g. a queued Qt signal).
ProgressCallback = Callable[[DownloadProgress], None]
DiskUsage = Callable[[str], Any]   # shutil.disk_usage-compatible: returns an object with .free


def folder_name(repo_id: str, branch: str) -> str:
    """Library folder name for a (repo, branch): "owner--repo--branch", filesystem-safe."""
    raw = f"{repo_id.replace('/', '--')}--{branch}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw)


def pending_downloads(library_dir: str) -> list[dict[str, Any]]:
    """Manifests of downloads that were interrupted (to offer "resume" after a restart)."""
    root = os.path.join(library_dir, PARTIAL_DIR)
    out = []
    if os.path.isdir(root):
        for entry in sorted(os.listdir(root)):
            manifest = _read_manifest(os.path.join(root, entry))
            if manifest:
                out.append(manifest)
    return out


def _read_manifest(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _safe_relpath(path: str) -> str:
    """Reject repo paths that would escape the model folder (the file list comes from a server)."""
    norm = os.path.normpath(path)
    if not path or os.path.isabs(path) or norm.startswith("..") or "\\" in path or norm in (".", ""):
        raise HubError(f"the Hub listed an unsafe file path {path!r}", hint="Report this repo to its owner.")
    return norm


def _hasher(f: RemoteFile) -> Any:
    """sha256 of the content for LFS files; git's blob sha1 ("blob <size>\\0" + content) for the rest."""
    if f.sha256:
        return hashlib.sha256()
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % f.size)
    return h


def _expected_digest(f: RemoteFile) -> str | None:
    return f.sha256 or f.blob_id


class _Stopped(Exception):
    """Internal: a worker saw pause/cancel and stopped between chunks."""


@dataclass
class _Speed:
    """Bytes per second over the last few seconds of samples."""

    window_s: float = 5.0
    samples: deque = field(default_factory=deque)

    def add(self, now: float, total: int) -> float:
        self.samples.append((now, total))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        return (total - b0) / (now - t0) if now > t0 else 0.0


class DownloadJob:
    """Fetch (repo, branch) into `library_dir`. Call run() in a worker thread, or start()/wait().

    pause() and cancel() may be called from any thread; run() then returns PAUSED or CANCELLED.
    After PAUSED (or a crash), run() again continues from the bytes on disk.
    """

    def __init__(self, repo_id: str, branch: str, library_dir: str, *, access: HubAccess | None = None,
                 on_progress: ProgressCallback | None = None, max_workers: int = 4,
                 reserve_bytes: int = DEFAULT_RESERVE, disk_usage: DiskUsage = shutil.disk_usage,
                 ignore_patterns: Iterable[str] = DEFAULT_IGNORE, name: str | None = None,
                 network_retries: int = 3, retry_delay_s: float = 0.5, progress_interval_s: float = 0.1) -> None:
        self.repo_id = repo_id
        self.branch = branch
        self.library_dir = os.path.abspath(library_dir)
        self.access = access or HubAccess()
        self.on_progress = on_progress
        self.max_workers = max(1, max_workers)
        self.reserve_bytes = reserve_bytes
        self.disk_usage = disk_usage
        self.ignore_patterns = tuple(ignore_patterns)
        self.name = name or folder_name(repo_id, branch)
        self.network_retries = network_retries
        self.retry_delay_s = retry_delay_s
        self.progress_interval_s = progress_interval_s
        self.state = JobState.PENDING
        self.error: BaseException | None = None
        self.files: tuple[RemoteFile, ...] = ()
        self.commit: str | None = None
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self._progress: dict[str, FileProgress] = {}
        self._file_speed: dict[str, _Speed] = {}
        self._speed = _Speed()
        self._session_bytes = 0
        self._last_emit = 0.0

    # -- paths ---------------------------------------------------------------------------------
    @property
    def partial_dir(self) -> str:
        return os.path.join(self.library_dir, PARTIAL_DIR, self.name)

    @property
    def final_dir(self) -> str:
        return os.path.join(self.library_dir, self.name)

    @property
    def what(self) -> str:
        return f"{self.repo_id}@{self.branch}"

    # -- control -------------------------------------------------------------------------------
    def pause(self) -> None:
        """Stop after the current chunk of each file, keeping the bytes for a later run()."""
        self._stop.set()

    def cancel(self) -> None:
        """Stop and delete the partial download."""
        self._cancel.set()
        self._stop.set()
        with self._lock:
            running = self._running
        if not running:
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            self.state = JobState.CANCELLED

    def start(self) -> threading.Thread:
        """run() in a daemon thread; wait() for the outcome."""
        self._thread = threading.Thread(target=self._run_catching, name=f"download {self.what}", daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: float | None = None) -> JobState:
        """Join the start() thread; re-raises the job's error."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.state

    def _run_catching(self) -> None:
        try:
            self.run()
        except BaseException as e:  # noqa: BLE001 - kept for wait()
            self.error = e

    # -- the job -------------------------------------------------------------------------------
    def run(self) -> JobState:
        """Download everything (or continue); returns COMPLETE, PAUSED or CANCELLED, raises HubError."""
        with self._lock:
            if self._running:
                raise HubError("this download is already running", path=self.what)
            self._running = True
        self._stop.clear()
        self.error = None
        try:
            return self._run()
        except BaseException as e:
            self.state = JobState.FAILED
            self._emit(force=True)
            if isinstance(e, HubError | KeyboardInterrupt):
                raise
            raise translate(e, what=self.what, token_used=self.access.token_in_use()) from e
        finally:
            with self._lock:
                self._running = False

    def _run(self) -> JobState:
        if self._cancel.is_set():
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            self.state = JobState.CANCELLED
            return self.state
        if os.path.isfile(os.path.join(self.final_dir, "config.json")):
            self.state = JobState.COMPLETE   # already in the library: nothing to fetch, works offline
            return self.state
        if self.access.is_offline:
            raise HubOfflineError("offline mode is on and this model is not in the library", path=self.what,
                                  hint="Turn offline mode off to download it.")
        self.state = JobState.RUNNING
        self._plan()
        self._check_disk_space()
        todo = [f for f in self.files if self._progress[f.path].state != "done"]
        self._emit(force=True)
        errors: list[BaseException] = []
        if todo:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(todo)),
                                    thread_name_prefix="kestrel-dl") as pool:
                futures = [pool.submit(self._fetch_file, f) for f in todo]
                for fut in futures:
                    try:
                        fut.result()
                    except _Stopped:
                        pass
                    except BaseException as e:  # noqa: BLE001 - first error wins, others stop
                        errors.append(e)
                        self._stop.set()
        if self._cancel.is_set():
            shutil.rmtree(self.partial_dir, ignore_errors=True)
            self.state = JobState.CANCELLED
            self._emit(force=True)
            return self.state
        if errors:
            raise errors[0]
        if self._stop.is_set():
            self.state = JobState.PAUSED
            self._emit(force=True)
            return self.state
        self._finish()
        self.state = JobState.COMPLETE
        self._emit(force=True)
        return self.state

    def _plan(self) -> None:
        """Pin the branch's commit, list its files, reconcile with what is already on disk."""
        try:
            info = self.access.api().model_info(self.repo_id, revision=self.branch, files_metadata=True)
        except Exception as e:  # noqa: BLE001
            raise translate(e, what=self.what, token_used=self.access.token_in_use()) from e
        files = []
        for s in info.siblings or []:
            if any(fnmatch.fnmatch(s.rfilename, p) for p in self.ignore_patterns):
                continue
            files.append(RemoteFile(path=_safe_relpath(s.rfilename), size=int(s.size or 0),
                                    sha256=s.lfs.sha256 if s.lfs else None, blob_id=s.blob_id))
        if not files:
            raise HubError("this branch has no files to download", path=self.what,
                           hint="Pick a branch with a bpw in its name; main often holds only the README.")
        manifest = _read_manifest(self.partial_dir)
        if manifest and manifest.get("commit") != info.sha:
            shutil.rmtree(self.partial_dir, ignore_errors=True)  # branch moved: old bytes are of other files
        os.makedirs(self.partial_dir, exist_ok=True)
        self.commit = info.sha
        self.files = tuple(sorted(files, key=lambda f: f.path))
        self._write_manifest(complete=False)
        for f in self.files:
            target = os.path.join(self.partial_dir, f.path)
            if os.path.isfile(target) and os.path.getsize(target) == f.size:
                done, state = f.size, "done"
            else:
                part = target + INCOMPLETE
                done = min(os.path.getsize(part), f.size) if os.path.isfile(part) else 0
                state = "queued"
            self._progress[f.path] = FileProgress(f.path, done, f.size, state=state)
            self._file_speed[f.path] = _Speed()

    def _write_manifest(self, *, complete: bool) -> None:
        data = {"repo_id": self.repo_id, "branch": self.branch, "commit": self.commit,
                "endpoint": self.access.endpoint, "complete": complete, "name": self.name,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "blob_id": f.blob_id}
                          for f in self.files]}
        path = os.path.join(self.partial_dir, MANIFEST)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
        os.replace(tmp, path)

    def _check_disk_space(self) -> None:
        remaining = sum(p.total - p.done for p in self._progress.values())
        free = int(self.disk_usage(self.library_dir).free)
        if remaining + self.reserve_bytes > free:
            raise DiskFullError(
                f"needs {_gb(remaining)} more (plus {_gb(self.reserve_bytes)} headroom) but only {_gb(free)} "
                "is free", path=self.library_dir,
                hint="Free some space (delete models in the Library tab) or choose a library folder on "
                     "another disk.")

    def _finish(self) -> None:
        self._write_manifest(complete=True)
        if os.path.exists(self.final_dir):
            raise HubError("the destination folder already exists", path=self.final_dir,
                           hint="Delete or rename it, then download again; the files wait in "
                                f"{self.partial_dir}.")
        os.rename(self.partial_dir, self.final_dir)   # same filesystem: atomic
        parent = os.path.dirname(self.partial_dir)
        try:
            os.rmdir(parent)
        except OSError:
            pass

    # -- one file ------------------------------------------------------------------------------
    def _fetch_file(self, f: RemoteFile) -> None:
        """Download, verify, and re-fetch once from scratch if the checksum is wrong."""
        target = os.path.join(self.partial_dir, f.path)
        part = target + INCOMPLETE
        os.makedirs(os.path.dirname(target), exist_ok=True)
        for attempt in (1, 2):
            digest = self._stream(f, part)
            expected = _expected_digest(f)
            if expected is None or digest == expected:
                os.replace(part, target)
                self._update(f.path, state="done", done=f.size)
                return
            os.remove(part)
            if attempt == 1:
                self._update(f.path, state="retrying", done=0)
        raise HubIntegrityError(
            f"checksum mismatch for {f.path} twice (expected {expected}, got {digest})", path=self.what,
            hint="The download was damaged twice in a row; check your network or proxy, then retry.")

    def _url(self, f: RemoteFile) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, f.path, revision=self.commit or self.branch, endpoint=self.access.endpoint)

    def _stream(self, f: RemoteFile, part: str) -> str:
        """Append the missing bytes of `f` to `part` (Range from its current size); return its digest."""
        import httpx2
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        hasher = _hasher(f)
        open(part, "ab").close()   # exists even for an empty file, so the rename after verification works
        offset = os.path.getsize(part)
        if offset > f.size:
            os.truncate(part, 0)
            offset = 0
        if offset:
            with open(part, "rb") as fh:   # the digest covers the bytes a previous run wrote
                while block := fh.read(CHUNK):
                    hasher.update(block)
        self._update(f.path, state="downloading", done=offset)
        failures = 0
        url = self._url(f)
        session = get_session()
        while offset < f.size:
            if self._stop.is_set():
                raise _Stopped()
            headers = build_hf_headers(token=self.access.resolved_token())
            headers["Accept-Encoding"] = "identity"
            if offset:
                headers["Range"] = f"bytes={offset}-"
            try:
                with session.stream("GET", url, headers=headers,
                                    timeout=httpx2.Timeout(60.0, connect=15.0)) as r:
                    if r.status_code >= 400:
                        r.read()
                        hf_raise_for_status(r)
                    if offset and r.status_code != 206:   # server ignored Range: start over
                        os.truncate(part, 0)
                        offset, hasher = 0, _hasher(f)
                        self._update(f.path, done=0)
                    with open(part, "ab", buffering=0) as out:   # unbuffered: on-disk size = bytes kept
                        for chunk in r.iter_bytes():
                            if self._stop.is_set():
                                raise _Stopped()
                            if offset + len(chunk) > f.size:
                                chunk = chunk[: f.size - offset]   # never grow past the known size
                            try:
                                _write_all(out, chunk)
                            except OSError as e:
                                if e.errno == errno.ENOSPC:
                                    raise DiskFullError("the disk filled up while downloading",
                                                        path=part, hint="Free some space, then resume.") from e
                                raise
                            hasher.update(chunk)
                            offset += len(chunk)
                            failures = 0
                            self._add_bytes(f.path, len(chunk), offset)
                            if offset >= f.size:
                                break
                if offset < f.size and r.status_code in (200, 206):
                    raise httpx2.RemoteProtocolError("response ended before the file was complete")
            except (httpx2.TransportError, httpx2.StreamError) as e:
                failures += 1
                if failures > self.network_retries:
                    raise HubNetworkError(
                        f"the connection kept breaking while downloading {f.path} ({e})", path=self.what,
                        hint="Check your connection and press Resume; finished bytes are kept.") from e
                self._update(f.path, state="retrying")
                if self._stop.wait(self.retry_delay_s * failures):
                    raise _Stopped() from e
                self._update(f.path, state="downloading")
        self._update(f.path, state="verifying")
        return hasher.hexdigest()

    # -- progress ------------------------------------------------------------------------------
    def _update(self, path: str, *, state: str | None = None, done: int | None = None) -> None:
        with self._lock:
            p = self._progress[path]
            self._progress[path] = replace(p, state=state or p.state, done=p.done if done is None else done,
                                           speed_bps=0.0 if state in ("done", "retrying") else p.speed_bps,
                                           eta_s=0.0 if state == "done" else p.eta_s)
        self._emit(force=state is not None)

    def _add_bytes(self, path: str, n: int, done: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._session_bytes += n
            speed = self._file_speed[path].add(now, done)
            p = self._progress[path]
            eta = (p.total - done) / speed if speed > 0 else None
            self._progress[path] = replace(p, done=done, speed_bps=speed, eta_s=eta)
            self._speed.add(now, self._session_bytes)
        self._emit()

    def _emit(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last_emit < self.progress_interval_s:
                return
            self._last_emit = now
            files = tuple(self._progress[f.path] for f in self.files if f.path in self._progress)
            done = sum(p.done for p in files)
            total = sum(p.total for p in files)
            samples = self._speed.samples
            speed = ((samples[-1][1] - samples[0][1]) / (samples[-1][0] - samples[0][0])
                     if len(samples) > 1 and samples[-1][0] > samples[0][0] else 0.0)
            if self.state != JobState.RUNNING:
                speed = 0.0
            eta = (total - done) / speed if speed > 0 else None
            snapshot = DownloadProgress(self.repo_id, self.branch, self.state, done, total, speed, eta, files)
        self.on_progress(snapshot)


def _write_all(out: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


def _gb(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GiB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{n / 1024:.0f} KiB"


def download(repo_id: str, branch: str, library_dir: str, **kwargs: Any) -> str:
    """Blocking convenience: download (or continue) and return the final folder."""
    job = DownloadJob(repo_id, branch, library_dir, **kwargs)
    state = job.run()
    if state != JobState.COMPLETE:
        raise HubError(f"download ended {state.value}", path=job.what)
    return job.final_dir
