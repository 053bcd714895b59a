"""Hugging Face access, downloads and the local model library (no Qt, no torch).

    from app.hub import search_models, list_branches, fit_input, DownloadJob, scan_library

Submodules import huggingface_hub lazily, so `import app.hub` stays cheap for the GUI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    DiskFullError,
    HubAuthError,
    HubError,
    HubIntegrityError,
    HubNetworkError,
    HubNotFoundError,
    HubOfflineError,
    TokenStoreError,
)

if TYPE_CHECKING:
    from .access import HubAccess, delete_token, get_token, set_token
    from .browse import (
        BranchInfo,
        RemoteFile,
        RepoSummary,
        branch_info,
        fetch_branch_config,
        fetch_model_card,
        fit_input,
        list_branches,
        parse_bpw,
        search_models,
    )
    from .download import DownloadJob, DownloadProgress, FileProgress, JobState, download, pending_downloads
    from .library import ModelCard, delete_model, read_model_card, scan_library

__all__ = [
    "DiskFullError", "HubAuthError", "HubError", "HubIntegrityError", "HubNetworkError", "HubNotFoundError",
    "HubOfflineError", "TokenStoreError",
    "HubAccess", "get_token", "set_token", "delete_token",
    "BranchInfo", "RemoteFile", "RepoSummary", "branch_info", "fetch_branch_config", "fetch_model_card",
    "fit_input", "list_branches", "parse_bpw", "search_models",
    "DownloadJob", "DownloadProgress", "FileProgress", "JobState", "download", "pending_downloads",
    "ModelCard", "delete_model", "read_model_card", "scan_library",
]

_MODULE_OF = {"access": ("HubAccess", "get_token", "set_token", "delete_token"),
              "browse": ("BranchInfo", "RemoteFile", "RepoSummary", "branch_info", "fetch_branch_config",
                         "fetch_model_card", "fit_input", "list_branches", "parse_bpw", "search_models"),
              "download": ("DownloadJob", "DownloadProgress", "FileProgress", "JobState", "download",
                           "pending_downloads"),
              "library": ("ModelCard", "delete_model", "read_model_card", "scan_library")}
_LAZY = {name: module for module, names in _MODULE_OF.items() for name in names}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
