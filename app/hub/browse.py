"""Browse EXL2 quants on the Hub: search repos, list a repo's bpw branches with their files and sizes.

EXL2 uploaders publish one repo with one git branch per bits-per-weight (`4_0`, `6_5`, `4.0bpw`,
`8.0bpw-h8`...), so a "model you can download" is a (repo, branch) pair: a BranchInfo.
Everything here returns plain dataclasses; the planner gets its input from `fit_input` before any
download happens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from app.engine.config import ModelConfig
from app.engine.errors import ConfigError

from .access import HubAccess
from .errors import HubError, HubNotFoundError, translate

SortKey = Literal["downloads", "likes", "last_modified"]
SORT_KEYS: tuple[SortKey, ...] = ("downloads", "likes", "last_modified")

BPW_RANGE = (1.0, 16.0)
WEIGHT_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class RepoSummary:
    """One search hit: enough for a results table row."""

    repo_id: str
    author: str
    name: str
    downloads: int = 0
    likes: int = 0
    last_modified: datetime | None = None
    tags: tuple[str, ...] = ()
    architecture: str | None = None   # lower-case family guessed from tags/name: "llama", "qwen2"...
    params_b: float | None = None      # billions of parameters, parsed from the name ("8B", "8x7B")
    gated: bool = False
    private: bool = False


@dataclass(frozen=True)
class RemoteFile:
    """A file in one branch with what we need to size and verify its download."""

    path: str
    size: int
    sha256: str | None = None   # LFS files: sha256 of the content
    blob_id: str | None = None  # git blob sha1 (of the content for non-LFS files, of the pointer for LFS)

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass(frozen=True)
class BranchInfo:
    """One downloadable quant: a branch of a repo, its bpw and its files."""

    repo_id: str
    name: str
    commit: str | None = None
    bpw: float | None = None
    head_bits: int | None = None
    files: tuple[RemoteFile, ...] = ()
    config: dict[str, Any] | None = field(default=None, repr=False)
    architecture: str | None = None      # e.g. "LlamaForCausalLM"
    supported: bool = False               # the engine implements this architecture
    params: int | None = None             # estimated from config.json geometry
    context_length: int | None = None
    problem: str | None = None            # why config.json could not be used, when it could not

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def has_weights(self) -> bool:
        return any(f.path.endswith(WEIGHT_SUFFIX) for f in self.files)


# ---------------------------------------------------------------------------------------------
# Pure parsing helpers

_BRANCH_UNDERSCORE = re.compile(r"^(\d{1,2})[_.](\d{1,3})(?:[_-]?h(\d{1,2}))?$", re.IGNORECASE)
_BPW = re.compile(r"(?<![\d.])(\d{1,2}(?:[._]\d{1,3})?)[_-]?bpw", re.IGNORECASE)
_HEAD = re.compile(r"(?:^|[^a-z0-9])h(\d{1,2})(?![\d.])", re.IGNORECASE)
_PARAMS = re.compile(r"(?<![a-z0-9.])(?:(\d{1,2})x)?(\d{1,4}(?:\.\d{1,2})?)\s*([bm])(?![a-z])", re.IGNORECASE)


def _in_range(bpw: float) -> bool:
    return BPW_RANGE[0] <= bpw <= BPW_RANGE[1]


def parse_bpw(name: str) -> tuple[float | None, int | None]:
    """(bpw, head_bits) from a branch or repo name: "4_65" -> 4.65, "6.5bpw_h8" -> (6.5, 8), "main" -> None."""
    bpw: float | None = None
    head: int | None = None
    m = _BRANCH_UNDERSCORE.match(name.strip())
    if m:
        bpw = float(f"{m.group(1)}.{m.group(2)}")
        head = int(m.group(3)) if m.group(3) else None
    else:
        m2 = _BPW.search(name)
        if m2:
            bpw = float(m2.group(1).replace("_", "."))
        h = _HEAD.search(name)
        if h and bpw is not None:
            head = int(h.group(1))
    if bpw is not None and not _in_range(bpw):
        return None, None
    if head is not None and not 2 <= head <= 16:
        head = None
    return bpw, head


def quant_from_config(config: dict[str, Any] | None) -> tuple[float | None, int | None]:
    """(bits, head_bits) from config.json's EXL2 quantization_config, or (None, None)."""
    if not isinstance(config, dict):
        return None, None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or str(qc.get("quant_method", "exl2")).lower() != "exl2":
        return None, None
    bits = qc.get("bits")
    head = qc.get("head_bits")
    bpw = float(bits) if isinstance(bits, int | float) and _in_range(float(bits)) else None
    head_bits = int(head) if isinstance(head, int | float) and not isinstance(head, bool) else None
    return bpw, head_bits


def parse_params_b(name: str) -> float | None:
    """Billions of parameters from a repo name: "Llama-3-8B" -> 8, "Mixtral-8x7B" -> 56, "135M" -> 0.135."""
    best: float | None = None
    for m in _PARAMS.finditer(name):
        experts = int(m.group(1)) if m.group(1) else 1
        value = float(m.group(2)) * experts
        if m.group(3).lower() == "m":
            value /= 1000.0
        if 0.01 <= value <= 2000 and (best is None or value > best):
            best = value
    return best


_ARCH_WORDS = ("llama", "mistral", "mixtral", "qwen3", "qwen2", "qwen", "gemma", "phi", "yi", "command-r")


def guess_architecture(repo_id: str, tags: Iterable[str]) -> str | None:
    """Model family from tags (model_type tags like "llama"), else from the repo name."""
    tagset = {t.lower() for t in tags}
    for word in _ARCH_WORDS:
        if word in tagset:
            return word
    lowered = repo_id.lower()
    for word in _ARCH_WORDS:
        if word in lowered:
            return word
    return None


def is_exl2(repo_id: str, tags: Iterable[str], library_name: str | None = None) -> bool:
    tagset = {t.lower() for t in tags}
    return ("exl2" in tagset or (library_name or "").lower() in {"exl2", "exllamav2"}
            or "exl2" in repo_id.lower())


def estimate_params(cfg: ModelConfig) -> int:
    """Parameter count of a Llama-style model from its geometry (what the weights would hold at fp16)."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    attn = h * cfg.q_dim + 2 * h * cfg.kv_dim + cfg.q_dim * h
    if cfg.qkv_bias:
        attn += cfg.q_dim + 2 * cfg.kv_dim
    if cfg.arch.qk_norm:
        attn += 2 * cfg.head_dim
    mlp = 3 * h * i
    per_layer = attn + mlp + 2 * h
    embed = cfg.vocab_size * h
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return embed + layers * per_layer + h + head


def describe_config(config: dict[str, Any] | None) -> dict[str, Any]:
    """architecture, supported, params, context_length, problem: what a branch row shows."""
    if not isinstance(config, dict):
        return {"architecture": None, "supported": False, "params": None, "context_length": None,
                "problem": "config.json is missing from this branch"}
    archs = config.get("architectures")
    arch_name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    ctx = config.get("max_position_embeddings")
    context = ctx if isinstance(ctx, int) and not isinstance(ctx, bool) else None
    try:
        cfg = ModelConfig.from_dict(config)
    except ConfigError as e:
        return {"architecture": arch_name, "supported": False, "params": None, "context_length": context,
                "problem": str(e)}
    return {"architecture": cfg.architecture, "supported": True, "params": estimate_params(cfg),
            "context_length": cfg.max_position_embeddings, "problem": None}


def make_branch_info(repo_id: str, name: str, files: Iterable[RemoteFile], *, commit: str | None = None,
                     config: dict[str, Any] | None = None) -> BranchInfo:
    """Combine what the tree, the branch name and config.json say; config.json wins for bpw."""
    name_bpw, name_head = parse_bpw(name)
    if name_bpw is None and name == "main":
        name_bpw, name_head = parse_bpw(repo_id.split("/")[-1])
    cfg_bpw, cfg_head = quant_from_config(config)
    return BranchInfo(
        repo_id=repo_id, name=name, commit=commit,
        bpw=cfg_bpw if cfg_bpw is not None else name_bpw,
        head_bits=cfg_head if cfg_head is not None else name_head,
        files=tuple(sorted(files, key=lambda f: f.path)),
        config=config,
        **describe_config(config),
    )


def fit_input(branch: BranchInfo) -> tuple[dict[str, Any], dict[str, int]]:
    """(config.json dict, {filename: size}) of a branch: what the planner needs to estimate VRAM pre-download."""
    if branch.config is None:
        raise HubError("config.json was not fetched or is missing for this branch",
                       path=f"{branch.repo_id}@{branch.name}",
                       hint="List the branch with fetch_configs=True, or pick a branch that holds a model.")
    return dict(branch.config), {f.path: f.size for f in branch.files}


# ---------------------------------------------------------------------------------------------
# Network calls (through huggingface_hub)

def _summary(info: Any) -> RepoSummary:
    tags = tuple(info.tags or ())
    repo_id = info.id
    author = info.author or (repo_id.split("/")[0] if "/" in repo_id else "")
    return RepoSummary(
        repo_id=repo_id, author=author, name=repo_id.split("/")[-1],
        downloads=int(info.downloads or 0), likes=int(info.likes or 0),
        last_modified=info.last_modified or info.created_at,
        tags=tags, architecture=guess_architecture(repo_id, tags),
        params_b=parse_params_b(repo_id.split("/")[-1]),
        gated=bool(info.gated), private=bool(info.private),
    )


def _sort_value(s: RepoSummary, sort: SortKey) -> Any:
    if sort == "likes":
        return s.likes
    if sort == "last_modified":
        return s.last_modified.timestamp() if s.last_modified else 0.0
    return s.downloads


_EXPAND = ["author", "downloads", "likes", "lastModified", "createdAt", "tags", "library_name", "gated",
           "private"]


def search_models(query: str = "", *, architecture: str | None = None, min_params_b: float | None = None,
                  max_params_b: float | None = None, sort: SortKey = "downloads", limit: int = 50,
                  access: HubAccess | None = None) -> list[RepoSummary]:
    """EXL2 repos matching `query`: tagged `exl2` or with exl2 in the name, filtered and sorted.

    Two Hub queries are merged because many EXL2 uploads carry no tag, only "exl2" in the name.
    """
    access = access or HubAccess()
    access.require_online("search")
    if sort not in SORT_KEYS:
        raise HubError(f"unknown sort key {sort!r}", hint=f"Use one of {', '.join(SORT_KEYS)}.")
    api = access.api()
    query = query.strip()
    fetch = max(limit * 3, 50)
    queries: list[dict[str, Any]] = [{"filter": "exl2", "search": query or None}]
    queries.append({"search": query if query else "exl2"})
    if query and "exl2" not in query.lower():
        queries.append({"search": f"{query}-exl2"})
    seen: dict[str, RepoSummary] = {}
    try:
        for q in queries:
            for info in api.list_models(sort=sort, limit=fetch, expand=_EXPAND, **q):
                if info.id in seen or not is_exl2(info.id, info.tags or (), info.library_name):
                    continue
                seen[info.id] = _summary(info)
    except Exception as e:  # noqa: BLE001 - translated to our own types
        raise translate(e, what="Hub search", token_used=access.token_in_use()) from e
    words = [w.lower() for w in query.replace("-", " ").split() if w.lower() != "exl2"]
    results = []
    for s in seen.values():
        hay = s.repo_id.lower().replace("-", " ").replace("_", " ")
        if words and not all(w in hay or w in s.tags for w in words):
            continue
        if architecture and (s.architecture or "") != architecture.lower() and architecture.lower() not in hay:
            continue
        if min_params_b is not None and (s.params_b is None or s.params_b < min_params_b):
            continue
        if max_params_b is not None and (s.params_b is None or s.params_b > max_params_b):
            continue
        results.append(s)
    results.sort(key=lambda s: _sort_value(s, sort), reverse=True)
    return results[:limit]


def list_branch_files(repo_id: str, revision: str, *, access: HubAccess | None = None) -> list[RemoteFile]:
    """Every file of one branch with size and checksums (one recursive tree listing)."""
    from huggingface_hub.hf_api import RepoFile

    access = access or HubAccess()
    access.require_online(f"{repo_id}@{revision}")
    try:
        entries = list(access.api().list_repo_tree(repo_id, revision=revision, recursive=True))
    except Exception as e:  # noqa: BLE001
        raise translate(e, what=f"{repo_id}@{revision}", token_used=access.token_in_use()) from e
    return [RemoteFile(path=e.path, size=int(e.size or 0), sha256=e.lfs.sha256 if e.lfs else None,
                       blob_id=e.blob_id)
            for e in entries if isinstance(e, RepoFile)]


def _download_small(repo_id: str, filename: str, revision: str, access: HubAccess) -> str | None:
    """Path of a small file fetched through the HF cache; None if the branch has no such file."""
    from huggingface_hub import errors as hf
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=access.cache_dir,
                               endpoint=access.endpoint, token=access.resolved_token(),
                               local_files_only=access.is_offline)
    except hf.LocalEntryNotFoundError as e:   # before EntryNotFoundError: it is a subclass
        if access.is_offline:
            raise translate(hf.OfflineModeIsEnabled(str(e)), what=f"{repo_id}@{revision}/{filename}") from e
        raise translate(e, what=f"{repo_id}@{revision}/{filename}") from e
    except hf.EntryNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001
        raise translate(e, what=f"{repo_id}@{revision}/{filename}", token_used=access.token_in_use()) from e


def fetch_branch_config(repo_id: str, branch: str, *, access: HubAccess | None = None) -> dict[str, Any] | None:
    """config.json of one branch as a dict (cached; works offline once fetched), None if absent."""
    access = access or HubAccess()
    path = _download_small(repo_id, "config.json", branch, access)
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"config.json is not valid JSON ({e})", path=f"{repo_id}@{branch}",
                       hint="The uploader's file is broken; pick another branch.") from e
    return data if isinstance(data, dict) else None


def fetch_model_card(repo_id: str, branch: str = "main", *, access: HubAccess | None = None) -> str:
    """README.md text of a branch (the model card, Markdown with YAML front matter); "" when there is none."""
    access = access or HubAccess()
    path = _download_small(repo_id, "README.md", branch, access)
    if path is None:
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def strip_front_matter(card: str) -> str:
    """Model card without its leading YAML block, ready for a Markdown renderer."""
    if card.startswith("---"):
        end = card.find("\n---", 3)
        if end != -1:
            return card[end + 4:].lstrip("\n")
    return card


def branch_info(repo_id: str, branch: str, *, commit: str | None = None, fetch_config: bool = True,
                access: HubAccess | None = None) -> BranchInfo:
    """One branch: its files (tree listing), bpw (name/config) and config-derived geometry."""
    access = access or HubAccess()
    files = list_branch_files(repo_id, branch, access=access)
    config = None
    if fetch_config and any(f.path == "config.json" for f in files):
        config = fetch_branch_config(repo_id, commit or branch, access=access)
    return make_branch_info(repo_id, branch, files, commit=commit, config=config)


def list_branches(repo_id: str, *, fetch_configs: bool = True, access: HubAccess | None = None) -> list[BranchInfo]:
    """All branches of a repo as BranchInfo, highest bpw first; branches without weights (main) last."""
    access = access or HubAccess()
    access.require_online(repo_id)
    try:
        refs = access.api().list_repo_refs(repo_id)
    except Exception as e:  # noqa: BLE001
        raise translate(e, what=repo_id, token_used=access.token_in_use()) from e
    if not refs.branches:
        raise HubNotFoundError("the repo has no branches", path=repo_id)
    def one(ref: Any) -> BranchInfo:
        return branch_info(repo_id, ref.name, commit=ref.target_commit, fetch_config=fetch_configs, access=access)

    # A repo has ~5-15 branches, each needing a tree listing and a config.json: fetch them side by side.
    with ThreadPoolExecutor(max_workers=min(8, len(refs.branches))) as pool:
        infos = list(pool.map(one, refs.branches))
    infos.sort(key=lambda b: (not b.has_weights, -(b.bpw or 0.0), b.name))
    return infos
