"""safetensors headers, read and checked without torch (the planner, the Hub library and the loader share it).

Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
(plus "__metadata__"), then the data. We check every entry against the file's real size, so a
truncated download or a header that lies about sizes becomes a ModelFormatError naming the file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod

from .errors import ModelFormatError

DTYPE_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
MAX_HEADER = 100 * 1024 * 1024
REDOWNLOAD = "Delete the file and download the model again."


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # byte offsets inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorEntry]:
    """Parse and validate one file's header; return its tensors by name."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError("is too short to be a safetensors file (truncated?)", path=path,
                                       hint=REDOWNLOAD)
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ModelFormatError(f"header length {n} does not fit in the file ({size} bytes): "
                                       "the file is truncated or not safetensors", path=path, hint=REDOWNLOAD)
            raw = f.read(n)
    except OSError as e:
        raise ModelFormatError(f"cannot be read ({e.strerror})", path=path, hint=REDOWNLOAD) from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError("has a header that is not valid JSON", path=path, hint=REDOWNLOAD) from e
    if not isinstance(header, dict):
        raise ModelFormatError("has a header that is not a JSON object", path=path, hint=REDOWNLOAD)
    data_size = size - 8 - n
    out: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFormatError(f"tensor {name!r} has a malformed header entry", path=path,
                                   hint=REDOWNLOAD) from e
        if dtype not in DTYPE_BYTES:
            raise ModelFormatError(f"tensor {name!r} has unsupported dtype {dtype}", path=path)
        expected = prod(shape) * DTYPE_BYTES[dtype]
        if end - start != expected or start < 0 or any(d < 0 for d in shape):
            raise ModelFormatError(
                f"tensor {name!r}: header says shape {list(shape)} {dtype} ({expected} bytes) "
                f"but gives offsets {start}..{end}", path=path, hint=REDOWNLOAD)
        if end > data_size:
            raise ModelFormatError(
                f"tensor {name!r} ends at byte {end} but the file holds only {data_size} data bytes: "
                "the file is truncated", path=path, hint=REDOWNLOAD)
        out[name] = TensorEntry(name, path, dtype, shape, start, end)
    return out


def model_files(folder: str) -> list[str]:
    """The safetensors shards of a model folder (from the index file when there is one)."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ModelFormatError("is not a valid safetensors index", path=index, hint=REDOWNLOAD) from e
        files = [os.path.join(folder, n) for n in names]
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise ModelFormatError(f"shard {os.path.basename(missing[0])} listed in the index is missing",
                                   path=folder, hint="The download is incomplete; download the model again.")
        return files
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not files:
        raise ModelFormatError("holds no .safetensors files", path=folder,
                               hint="Kestrel loads safetensors models (EXL2 or fp16/bf16 Hugging Face folders).")
    return files


