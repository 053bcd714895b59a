"""Checked access to safetensors files: headers validated up front (st_header), tensor data read with
the `safetensors` library (no pickle anywhere)."""

from __future__ import annotations

import torch
from safetensors import safe_open

from .errors import ModelFormatError
from .st_header import REDOWNLOAD, TensorEntry, model_files, read_header

__all__ = ["REDOWNLOAD", "TensorEntry", "TensorStore", "model_files", "read_header"]


class TensorStore:
    """All tensors of a model folder, validated up front, read lazily by name."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.entries: dict[str, TensorEntry] = {}
        for path in model_files(folder):
            for name, entry in read_header(path).items():
                if name in self.entries:
                    raise ModelFormatError(f"tensor {name!r} appears in two shards", path=path)
                self.entries[name] = entry
        self._handles: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str, shape: tuple[int, ...] | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor; with `shape`, check it first so a wrong file fails with a clear message."""
        entry = self.entries.get(name)
        if entry is None:
            raise ModelFormatError(f"tensor {name!r} is missing", path=self.folder,
                                   hint="The model folder does not match its config.json; download it again.")
        if shape is not None and tuple(shape) != entry.shape:
            raise ModelFormatError(
                f"tensor {name!r} has shape {list(entry.shape)}, config.json implies {list(shape)}",
                path=entry.file, hint="The weights and config.json belong to different models.")
        handle = self._handles.get(entry.file)
        if handle is None:
            handle = safe_open(entry.file, framework="pt", device="cpu")
            self._handles[entry.file] = handle
        tensor = handle.get_tensor(name)  # type: ignore[attr-defined]
        return tensor.to(device) if str(device) != "cpu" else tensor

    def close(self) -> None:
        self._handles.clear()
