"""A strict reader of one .safetensors file: header checked against the file, byte ranges exposed.

We parse the header ourselves (rather than through the safetensors package) for two reasons:
every defect must surface as an EngineError naming the file and tensor, and the streaming
readers need each tensor's absolute byte range to read experts with O_DIRECT.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EngineError

DTYPES = {
    "F32": (np.dtype("<f4"), "f32"),
    "F16": (np.dtype("<f2"), "f16"),
    "BF16": (np.dtype("<u2"), "bf16"),  # no numpy bf16: carried as raw 16-bit words
    "F64": (np.dtype("<f8"), None),
    "I64": (np.dtype("<i8"), None),
    "I32": (np.dtype("<i4"), None),
    "I16": (np.dtype("<i2"), None),
    "I8": (np.dtype("i1"), None),
    "U8": (np.dtype("u1"), None),
    "BOOL": (np.dtype("?"), None),
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int          # absolute offset of the first byte in the file
    end: int            # absolute offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def fmt(self) -> str | None:
        """The kernels format that holds this dtype unchanged (f32, f16, bf16), else None."""
        return DTYPES[self.dtype][1]


class SafetensorsFile:
    """Header of one safetensors file; tensors read on demand with pread."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise EngineError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (hlen,) = struct.unpack("<Q", head)
                if hlen > MAX_HEADER or 8 + hlen > size:
                    raise EngineError(
                        f"{self.path}: corrupt safetensors header: header length {hlen} runs past "
                        f"the end of the file ({size} bytes)")
                raw = f.read(hlen)
        except OSError as e:
            raise EngineError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise EngineError(f"{self.path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + hlen
        self.size = size
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._check(name, entry)

    def _check(self, name: str, entry: object) -> TensorInfo:
        where = f"{self.path}: tensor {name}"
        try:
            dtype = entry["dtype"]  # type: ignore[index]
            shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
            b, e = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError):
            raise EngineError(f"{where}: malformed header entry {entry!r}") from None
        if dtype not in DTYPES:
            raise EngineError(f"{where}: unsupported dtype {dtype}")
        if not 0 <= b <= e:
            raise EngineError(f"{where}: bad data offsets [{b}, {e}]")
        if self.data_start + e > self.size:
            raise EngineError(
                f"{where}: data runs past the end of the file (needs {self.data_start + e} bytes, "
                f"file has {self.size}); the file is truncated")
        want = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][0].itemsize
        if want != e - b:
            raise EngineError(f"{where}: shape {list(shape)} {dtype} needs {want} bytes, header says {e - b}")
        return TensorInfo(name, dtype, shape, self.data_start + b, self.data_start + e)

    def read(self, name: str) -> np.ndarray:
        """The tensor as an owned numpy array of its storage dtype (BF16 as uint16)."""
        info = self.tensors[name]
        dtype = DTYPES[info.dtype][0]
        with open(self.path, "rb") as f:
            f.seek(info.start)
            buf = f.read(info.nbytes)
        if len(buf) != info.nbytes:
            raise EngineError(f"{self.path}: tensor {name}: short read, the file was truncated")
        return np.frombuffer(bytearray(buf), dtype=dtype).reshape(info.shape)
