"""The local model library: find model folders, describe them, delete them.

A model folder is one holding config.json and at least one *.safetensors file. We look in the
configured library folders and in the Hugging Face cache (scan_cache_dir). Parameter counts come from
the safetensors headers (8-byte little-endian length + JSON), read without touching tensor data.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.engine.errors import ModelFormatError
from app.engine.st_header import read_header

from .browse import describe_config, parse_bpw, quant_from_config
from .download import MANIFEST, PARTIAL_DIR
from .errors import HubError

MAX_HEADER = 100 << 20      # safetensors caps headers at 100 MB
SCAN_DEPTH = 3              # library/<org>/<model>/ is as deep as people nest
EXL2_PARTS = ("q_weight", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups", "q_group_map")


@dataclass(frozen=True)
class ModelCard:
    """One local model, as the Library tab lists it."""

    name: str
    path: str
    architecture: str | None = None
    supported: bool = False
    params: int | None = None
    bpw: float | None = None
    head_bits: int | None = None
    context_length: int | None = None
    size_bytes: int = 0
    source: str = "library"       # "library" | "hf-cache"
    repo_id: str | None = None
    branch: str | None = None
    commit: str | None = None
    problem: str | None = None    # why it may not load (unsupported architecture, unreadable file...)

    @property
    def quantized(self) -> bool:
        return self.bpw is not None


# ---------------------------------------------------------------------------------------------
# safetensors headers

def read_safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a .safetensors file ({name: {dtype, shape, data_offsets}}), without the data."""
    return {e.name: {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.start, e.end]}
            for e in read_header(path).values()}


def count_parameters(headers: Iterable[dict[str, Any]]) -> int:
    """Parameters stored in a model: plain tensors by element count; EXL2 linears as in_features x out_features.

    An EXL2 layer `key` stores packed codes, so its size comes from key.q_invperm (K,) and key.q_weight (*, N).
    """
    tensors: dict[str, list[int]] = {}
    for header in headers:
        for name, entry in header.items():
            if name != "__metadata__":
                tensors[name] = [int(d) for d in entry["shape"]]
    total = 0
    for name, shape in tensors.items():
        prefix, _, suffix = name.rpartition(".")
        if suffix in EXL2_PARTS:
            if suffix == "q_weight":
                perm = tensors.get(f"{prefix}.q_invperm") or tensors.get(f"{prefix}.q_perm")
                if perm and len(shape) == 2:
                    total += perm[0] * shape[1]
            continue
        total += math.prod(shape) if shape else 1
    return total


# ---------------------------------------------------------------------------------------------
# model folders

def is_model_folder(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return "config.json" in names and any(n.endswith(".safetensors") for n in names)


def _folder_size(path: str) -> int:
    """Bytes of the files in a folder (following the HF cache's symlinks to their blobs)."""
    total = 0
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d != ".cache"]
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def read_model_card(path: str, *, source: str = "library", repo_id: str | None = None,
                    branch: str | None = None, commit: str | None = None) -> ModelCard:
    """Describe one model folder; problems (bad config, unreadable header) go in .problem, not exceptions."""
    path = os.path.abspath(path)
    manifest = _manifest(path)
    repo_id = repo_id or manifest.get("repo_id")
    branch = branch or manifest.get("branch")
    commit = commit or manifest.get("commit")
    problem = None
    config: dict[str, Any] | None = None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            loaded = json.load(f)
        config = loaded if isinstance(loaded, dict) else None
        if config is None:
            problem = "config.json is not a JSON object"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"config.json cannot be read ({e})"
    described = describe_config(config) if config is not None else {
        "architecture": None, "supported": False, "context_length": None, "problem": problem}
    problem = problem or described["problem"]
    bpw, head = quant_from_config(config)
    if bpw is None:
        bpw, head = parse_bpw(branch or os.path.basename(path))
    params = None
    try:
        weights = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        params = count_parameters(read_safetensors_header(os.path.join(path, n)) for n in weights)
    except ModelFormatError as e:
        problem = problem or str(e)
    name = (f"{repo_id.split('/')[-1]} ({branch})" if repo_id and branch and branch != "main"
            else repo_id.split("/")[-1] if repo_id else os.path.basename(path))
    return ModelCard(
        name=name, path=path, architecture=described["architecture"], supported=described["supported"],
        params=params, bpw=bpw, head_bits=head, context_length=described["context_length"],
        size_bytes=_folder_size(path), source=source, repo_id=repo_id, branch=branch, commit=commit,
        problem=problem,
    )


def _manifest(path: str) -> dict[str, Any]:
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def find_model_folders(root: str, depth: int = SCAN_DEPTH) -> list[str]:
    """Model folders under `root` (itself included), skipping hidden folders such as .partial."""
    found: list[str] = []
    if not os.path.isdir(root):
        return found
    if is_model_folder(root):
        return [os.path.abspath(root)]
    if depth <= 0:
        return found
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return found
    for entry in entries:
        if entry.name.startswith(".") or entry.name == PARTIAL_DIR:
            continue
        if entry.is_dir(follow_symlinks=False):
            found.extend(find_model_folders(entry.path, depth - 1))
    return found


def scan_hf_cache(cache_dir: str | None = None) -> list[ModelCard]:
    """Model snapshots in the Hugging Face cache (what other tools downloaded)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError, ValueError):
        return []
    cards = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.commit_hash):
            snap = str(rev.snapshot_path)
            if is_model_folder(snap):
                refs = sorted(rev.refs)
                cards.append(read_model_card(snap, source="hf-cache", repo_id=repo.repo_id,
                                             branch=refs[0] if refs else None, commit=rev.commit_hash))
    return cards


def scan_library(folders: Iterable[str], *, include_hf_cache: bool = True,
                 hf_cache_dir: str | None = None) -> list[ModelCard]:
    """Every model in the configured folders (and the HF cache), each listed once, sorted by name."""
    cards: dict[str, ModelCard] = {}
    for folder in folders:
        for path in find_model_folders(os.path.expanduser(folder)):
            cards.setdefault(os.path.realpath(path), read_model_card(path))
    if include_hf_cache:
        for card in scan_hf_cache(hf_cache_dir):
            cards.setdefault(os.path.realpath(card.path), card)
    return sorted(cards.values(), key=lambda c: (c.name.lower(), c.path))


def delete_model(card: ModelCard, *, hf_cache_dir: str | None = None) -> int:
    """Delete a model from disk (the GUI asks first); returns the bytes freed."""
    if card.source == "hf-cache":
        return _delete_cache_revision(card, hf_cache_dir)
    path = os.path.abspath(card.path)
    if not is_model_folder(path) or os.path.islink(path):
        raise HubError("is not a model folder (no config.json + *.safetensors), so it was not deleted",
                       path=path, hint="Refresh the library; the folder may have changed.")
    if path in {os.path.abspath(os.sep), os.path.expanduser("~")}:
        raise HubError("refusing to delete a root or home folder", path=path)
    size = _folder_size(path)
    try:
        shutil.rmtree(path)
    except OSError as e:
        raise HubError(f"could not be deleted ({e})", path=path,
                       hint="Close programs using the model and check folder permissions.") from e
    return size


def _delete_cache_revision(card: ModelCard, cache_dir: str | None) -> int:
    from huggingface_hub import scan_cache_dir

    if not card.commit:
        raise HubError("the cache entry has no commit hash", path=card.path)
    try:
        strategy = scan_cache_dir(cache_dir).delete_revisions(card.commit)
        freed = strategy.expected_freed_size
        strategy.execute()
    except OSError as e:
        raise HubError(f"could not delete from the Hugging Face cache ({e})", path=card.path) from e
    return int(freed)
