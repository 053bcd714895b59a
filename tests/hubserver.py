"""A fake Hugging Face Hub on 127.0.0.1: the subset of the HTTP API that huggingface_hub 2.x calls
for search, repo info, refs, tree listings and file resolution, with switches to inject failures.

Endpoints (as huggingface_hub builds them, see hf_api.py / file_download.py):
  GET  /api/models?search=&filter=&author=&sort=&limit=          list_models
  GET  /api/models/{repo}[/revision/{rev}]?blobs=True             model_info(files_metadata=True)
  GET  /api/models/{repo}/refs                                    list_repo_refs
  GET  /api/models/{repo}/tree/{rev}[/{path}]?recursive=          list_repo_tree
  HEAD /{repo}/resolve/{rev}/{file}    X-Repo-Commit, ETag, X-Linked-Etag/X-Linked-Size (LFS), Content-Length
  GET  /{repo}/resolve/{rev}/{file}    small files directly; LFS files 302 to /cdn/... like the real Hub
  GET  /cdn/{repo}/{commit}/{file}     the "CDN": Range requests, Accept-Ranges, no auth
Errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo) so
huggingface_hub raises the same exception types it raises against huggingface.co.

Failure injection (keys are (repo_id, path)):
  repo.gated_token   401 GatedRepo unless "Authorization: Bearer <token>"
  drop_after[key]    [n1, n2, ...]: the next responses close the socket after n1, n2... body bytes
  corrupt[key]       n: serve a body with one byte flipped, n times
  hold_after[key]    nbytes: send nbytes, then wait until release(key) (lets a test act mid-file)
Counters: body_bytes[key] (file bytes sent), requests (method, path, range header, auth header).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{hashlib.sha256(data).hexdigest()}\n"
            f"size {len(data)}\n").encode()


@dataclass
class FakeFile:
    path: str
    data: bytes

    @property
    def lfs(self) -> bool:
        return self.path.endswith(LFS_SUFFIXES)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def blob_id(self) -> str:
        return git_blob_sha1(lfs_pointer(self.data) if self.lfs else self.data)

    def tree_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": self.path}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": len(self.data), "pointerSize": len(lfs_pointer(self.data))}
        return entry

    def sibling(self, blobs: bool) -> dict[str, Any]:
        s: dict[str, Any] = {"rfilename": self.path}
        if blobs:
            s.update(size=len(self.data), blobId=self.blob_id)
            if self.lfs:
                s["lfs"] = {"sha256": self.sha256, "size": len(self.data),
                            "pointerSize": len(lfs_pointer(self.data))}
        return s


@dataclass
class FakeRepo:
    repo_id: str
    branches: dict[str, dict[str, bytes]]
    tags: list[str] = field(default_factory=list)
    downloads: int = 0
    likes: int = 0
    last_modified: str = "2024-05-01T12:00:00.000Z"
    library_name: str | None = None
    gated_token: str | None = None

    def commit(self, branch: str) -> str:
        h = hashlib.sha1(f"{self.repo_id}@{branch}".encode())
        for path, data in sorted(self.branches[branch].items()):
            h.update(path.encode() + hashlib.sha256(data).digest())
        return h.hexdigest()

    def resolve(self, rev: str) -> str | None:
        """Branch name for a branch name or a commit hash."""
        if rev in self.branches:
            return rev
        for b in self.branches:
            if self.commit(b) == rev:
                return b
        return None

    def files(self, branch: str) -> list[FakeFile]:
        return [FakeFile(p, d) for p, d in sorted(self.branches[branch].items())]

    def summary(self) -> dict[str, Any]:
        main = "main" if "main" in self.branches else next(iter(self.branches))
        return {"_id": hashlib.md5(self.repo_id.encode()).hexdigest()[:24], "id": self.repo_id,
                "modelId": self.repo_id, "author": self.repo_id.split("/")[0], "sha": self.commit(main),
                "lastModified": self.last_modified, "createdAt": self.last_modified, "private": False,
                "gated": "manual" if self.gated_token else False, "disabled": False,
                "downloads": self.downloads, "likes": self.likes, "tags": list(self.tags),
                "library_name": self.library_name, "pipeline_tag": "text-generation"}


class HubServer:
    """Threaded HTTP server holding fake repos; `url` is the endpoint to give huggingface_hub."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.drop_after: dict[tuple[str, str], list[int]] = {}
        self.corrupt: Counter[tuple[str, str]] = Counter()
        self.hold_after: dict[tuple[str, str], int] = {}
        self._held: dict[tuple[str, str], threading.Event] = {}
        self.body_bytes: Counter[tuple[str, str]] = Counter()
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        for ev in self._held.values():
            ev.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    def hold(self, repo_id: str, path: str, nbytes: int) -> None:
        key = (repo_id, path)
        self.hold_after[key] = nbytes
        self._held[key] = threading.Event()

    def release(self, repo_id: str, path: str) -> None:
        key = (repo_id, path)
        self.hold_after.pop(key, None)
        ev = self._held.pop(key, None)
        if ev:
            ev.set()

    def file_requests(self, repo_id: str, path: str, since: int = 0) -> list[dict[str, Any]]:
        """GETs that carried bytes of one file (resolve for small files, cdn for LFS), from request #since."""
        with self.lock:
            return [r for r in self.requests[since:]
                    if r["method"] == "GET" and r.get("file") == (repo_id, path) and r["sent"] > 0]

    def reset_counters(self) -> None:
        with self.lock:
            self.body_bytes.clear()
            self.requests.clear()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _record(self, **extra: Any) -> None:
        self._rec = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
                     "auth": self.headers.get("Authorization"), "sent": 0, **extra}
        with self.hub.lock:
            self.hub.requests.append(self._rec)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(200, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> None:
        h = dict(headers or {})
        if code:
            h["X-Error-Code"] = code
        h["X-Error-Message"] = message
        self._send(status, json.dumps({"error": message}).encode(), h)

    def _repo(self, repo_id: str) -> FakeRepo | None:
        """The repo if it exists and the caller may see it; sends the error response otherwise."""
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.gated_token and self.headers.get("Authorization") != f"Bearer {repo.gated_token}":
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access "
                                          "to it and be authenticated to access it. Please log in.")
            return None
        return repo

    def _branch(self, repo: FakeRepo, rev: str) -> str | None:
        branch = repo.resolve(rev)
        if branch is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return branch

    # -- routing -------------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_GET(self) -> None:  # noqa: N802
        self._route()

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        query = parse_qs(url.query)
        try:
            if parts[:2] == ["api", "models"]:
                self._record()
                self._api(parts[2:], query)
            elif parts and parts[0] == "cdn" and len(parts) >= 5:
                self._cdn(f"{parts[1]}/{parts[2]}", parts[3], "/".join(parts[4:]))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self._record()
                self._error(404, None, "Not found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(self, rest: list[str], query: dict[str, list[str]]) -> None:
        if not rest:
            return self._search(query)
        if len(rest) < 2:
            return self._error(404, None, "Not found")
        repo = self._repo(f"{rest[0]}/{rest[1]}")
        if repo is None:
            return None
        tail = rest[2:]
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        if not tail:
            return self._info(repo, "main" if "main" in repo.branches else next(iter(repo.branches)), blobs)
        if tail[0] == "revision" and len(tail) == 2:
            branch = self._branch(repo, tail[1])
            return self._info(repo, branch, blobs) if branch else None
        if tail == ["refs"]:
            return self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": repo.commit(b)}
                                            for b in repo.branches], "converts": [], "tags": []})
        if tail[0] == "tree" and len(tail) >= 2:
            branch = self._branch(repo, tail[1])
            if branch is None:
                return None
            prefix = "/".join(tail[2:])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._json(_tree(repo.files(branch), prefix, recursive))
        return self._error(404, None, "Not found")

    def _search(self, query: dict[str, list[str]]) -> None:
        found = list(self.hub.repos.values())
        if "search" in query:
            needle = query["search"][0].lower()
            found = [r for r in found if needle in r.repo_id.lower()]
        for f in query.get("filter", []):
            found = [r for r in found if f in r.tags or f == r.library_name]
        if "author" in query:
            found = [r for r in found if r.repo_id.split("/")[0] == query["author"][0]]
        sort = query.get("sort", [None])[0]
        key = {"downloads": lambda r: r.downloads, "likes": lambda r: r.likes,
               "lastModified": lambda r: r.last_modified, "createdAt": lambda r: r.last_modified}.get(sort)
        if key:
            found.sort(key=key, reverse=True)
        if "limit" in query:
            found = found[: int(query["limit"][0])]
        self._json([r.summary() for r in found])

    def _info(self, repo: FakeRepo, branch: str, blobs: bool) -> None:
        data = repo.summary()
        data["sha"] = repo.commit(branch)
        data["siblings"] = [f.sibling(blobs) for f in repo.files(branch)]
        self._json(data)

    def _file(self, repo: FakeRepo, branch: str, path: str) -> FakeFile | None:
        for f in repo.files(branch):
            if f.path == path:
                return f
        self._error(404, "EntryNotFound", f"{path} does not exist on \"{branch}\"",
                    {"X-Repo-Commit": repo.commit(branch)})
        return None

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        self._record(file=(repo_id, path), kind="resolve")
        repo = self._repo(repo_id)
        if repo is None:
            return
        branch = self._branch(repo, rev)
        if branch is None:
            return
        f = self._file(repo, branch, path)
        if f is None:
            return
        commit = repo.commit(branch)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"ETag": f'"{f.sha256}"', "X-Linked-Etag": f'"{f.sha256}"',
                            "X-Linked-Size": str(len(f.data))})
            if self.command == "GET":
                location = f"/cdn/{repo_id}/{commit}/{quote(path)}"
                return self._send(302, b"", {**headers, "Location": location})
        else:
            headers["ETag"] = f'"{f.blob_id}"'
        if self.command == "HEAD":
            self.send_response(200)
            self.send_header("Content-Length", str(len(f.data)))
            self.send_header("Content-Type", "application/octet-stream")
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            return
        self._body(repo_id, f, headers)

    def _cdn(self, repo_id: str, commit: str, path: str) -> None:
        self._record(file=(repo_id, path), kind="cdn")
        repo = self.hub.repos.get(repo_id)
        branch = repo.resolve(commit) if repo else None
        f = next((x for x in repo.files(branch) if x.path == path), None) if repo and branch else None
        if f is None:
            return self._error(404, None, "NoSuchKey")
        self._body(repo_id, f, {"ETag": f'"{f.sha256}"', "Accept-Ranges": "bytes"})

    def _body(self, repo_id: str, f: FakeFile, headers: dict[str, str]) -> None:
        key = (repo_id, f.path)
        size = len(f.data)
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start = int(a) if a else 0
            end = min(int(b), size - 1) if b else size - 1
            if start >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"})
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        body = bytearray(f.data[start:end + 1])
        hub = self.hub
        with hub.lock:
            if hub.corrupt[key] > 0:
                hub.corrupt[key] -= 1
                body[len(body) // 2] ^= 0xFF
            drops = hub.drop_after.get(key)
            limit = drops.pop(0) if drops else None
            hold = hub.hold_after.get(key)
            held = hub._held.get(key)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent = 0
        step = 16 << 10
        while True:
            if limit is not None and sent >= limit:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            if sent >= len(body):
                return
            n = step
            if limit is not None:
                n = min(n, limit - sent)
            if hold is not None and sent < hold:
                n = min(n, hold - sent)
            chunk = bytes(body[sent:sent + n])
            self.wfile.write(chunk)
            sent += len(chunk)
            with hub.lock:
                hub.body_bytes[key] += len(chunk)
                self._rec["sent"] += len(chunk)
            if hold is not None and sent == hold and held is not None:
                self.wfile.flush()
                held.wait(30)
                hold = None


def _tree(files: list[FakeFile], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    prefix = prefix.strip("/")
    out: list[dict[str, Any]] = []
    dirs: set[str] = set()
    for f in files:
        if prefix and not f.path.startswith(prefix + "/"):
            continue
        rel = f.path[len(prefix) + 1:] if prefix else f.path
        parts = rel.split("/")
        base = f"{prefix}/" if prefix else ""
        for i in range(1, len(parts)):
            d = base + "/".join(parts[:i])
            if (recursive or i == 1) and d not in dirs:
                dirs.add(d)
                out.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                            "path": d})
        if recursive or len(parts) == 1:
            out.append(f.tree_entry())
    return out


# ---------------------------------------------------------------------------------------------
# fixture content: tiny but real EXL2-shaped model files

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 256, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
}

# (name, dtype, shape) of the tensors in every fixture output.safetensors; the filler makes the file
# ~1.6 MB so a download can be interrupted halfway.
FIXTURE_TENSORS = [
    ("model.embed_tokens.weight", "float16", (256, 64)),
    ("model.norm.weight", "float16", (64,)),
    ("lm_head.weight", "float16", (256, 64)),
    ("model.layers.0.mlp.down_proj.q_weight", "int32", (16, 64)),     # K=128 at 4 bits -> 128*4/32 rows
    ("model.layers.0.mlp.down_proj.q_invperm", "int32", (128,)),
    ("model.layers.0.mlp.down_proj.q_scale", "int32", (1, 8)),
    ("model.layers.0.mlp.down_proj.q_scale_max", "float16", (1,)),
    ("model.layers.0.mlp.down_proj.q_groups", "int16", (2,)),
    ("model.layers.1.mlp.up_proj.weight", "float16", (768, 1024)),
]
FIXTURE_PARAMS = 256 * 64 + 64 + 256 * 64 + 128 * 64 + 768 * 1024


def make_safetensors(seed: int) -> bytes:
    import numpy as np
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    tensors = {}
    for name, dtype, shape in FIXTURE_TENSORS:
        if dtype == "float16":
            tensors[name] = rng.standard_normal(shape).astype(np.float16)
        else:
            tensors[name] = rng.integers(0, 1 << 15, size=shape).astype(dtype)
    return save(tensors, metadata={"format": "pt"})


def exl2_branch(bits: float | None, head_bits: int | None, seed: int) -> dict[str, bytes]:
    config = dict(TINY_CONFIG)
    if bits is not None:
        config["quantization_config"] = {"quant_method": "exl2", "version": "0.2.3", "bits": bits,
                                         "head_bits": head_bits, "calibration": {"rows": 115, "length": 2048}}
    return {
        "config.json": json.dumps(config, indent=2).encode(),
        "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}).encode(),
        "output.safetensors": make_safetensors(seed),
        "notes.txt": b"",   # an empty file must download and verify too
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    }


README = b"---\nlicense: mit\ntags: [exl2]\n---\n# TinyLlama EXL2\n\nBranches hold 3.0, 4.0 and 6.5 bpw.\n"


def standard_repos(hub: HubServer) -> None:
    """The repos every hub test uses."""
    hub.add(FakeRepo(
        "kestrel-test/TinyLlama-1.1B-exl2",
        branches={"main": {"README.md": README, "measurement.json": b'{"measurement": {}}',
                           ".gitattributes": b"*.safetensors filter=lfs\n"},
                  "4_0": exl2_branch(4.0, 6, seed=1), "6_5": exl2_branch(6.5, 8, seed=2),
                  "3.0bpw_h6": exl2_branch(None, None, seed=3)},
        tags=["llama", "text-generation"], downloads=500, likes=7, last_modified="2024-06-01T00:00:00.000Z"))
    hub.add(FakeRepo(
        "quanter/Mistral-7B-Instruct-quant", branches={"main": {"README.md": b"# m\n"},
                                                       "8_0": exl2_branch(8.0, 8, seed=4)},
        tags=["exl2", "mistral"], downloads=900, likes=2, last_modified="2024-03-01T00:00:00.000Z"))
    hub.add(FakeRepo(
        "bigorg/Llama-3-70B-Instruct-exl2", branches={"main": {"README.md": b"# big\n"}},
        tags=["llama"], downloads=100, likes=50, last_modified="2024-07-01T00:00:00.000Z"))
    hub.add(FakeRepo(
        "plain/Llama-3-8B-Instruct", branches={"main": {"README.md": b"# fp16\n"}},
        tags=["llama", "safetensors"], downloads=10_000, likes=999))
    hub.add(FakeRepo(
        "kestrel-test/Gated-Llama-exl2", branches={"main": {"README.md": b"# gated\n"},
                                                   "4_0": exl2_branch(4.0, 6, seed=5)},
        tags=["llama"], downloads=5, likes=1, gated_token="hf_kestrel_test_token"))
