"""A strict reader of one .safetensors file: header checked against the file, byte ranges exposed.

We parse the header ourselves (rather than through the safetensors package) for two reasons:
every defect must surface as an EngineError naming the file and tensor, and the streaming
readers need each tensor's absolute byte range to read experts with O_DIRECT.

Block-quantized tensors (what `mer-tui convert --dense-quant` writes into a store's
model.safetensors): safetensors has no dtype for GGUF blocks, so such a tensor is stored as dtype U8
of shape (rows, row_bytes) -- each row its weights' blocks, exactly the bytes of a kernels.QMatrix --
and two string entries in the file's `__metadata__` say how to read it:

    "mer_tui.format:<tensor name>": "q8_0"      its kernels block format (q8_0, q4_0, q4_k, q6_k, q4_0x8, ...)
    "mer_tui.cols:<tensor name>":   "4096"      its logical column count (weights per row)

TensorInfo then reports fmt "q8_0" and logical_shape (rows, 4096); the header's own shape stays the
storage shape.  Other tools see a plain U8 tensor; an older mer-tui refuses it (dtype U8).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.formats import BLOCK, FLOAT_FORMATS, FormatError, check_rows, row_bytes

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
#: kernels float format -> the safetensors dtype that holds it unchanged
FLOAT_DTYPES = {fmt: name for name, (_, fmt) in DTYPES.items() if fmt is not None}
MAX_HEADER = 100 * 1024 * 1024
#: metadata key prefixes of a block-quantized tensor (see the module docstring)
FORMAT_KEY = "mer_tui.format:"
COLS_KEY = "mer_tui.cols:"


def quantized_metadata(name: str, fmt: str, cols: int) -> dict[str, str]:
    """The `__metadata__` entries that mark tensor `name` as `fmt` blocks of `cols` weights per row."""
    return {FORMAT_KEY + name: fmt, COLS_KEY + name: str(cols)}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str          # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]
    start: int          # absolute offset of the first byte in the file
    end: int            # absolute offset one past the last byte
    quant: str | None = None    # block format from the metadata (dtype U8, shape (rows, row_bytes))
    cols: int | None = None     # logical columns of a block-quantized tensor

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def fmt(self) -> str | None:
        """The kernels format of the bytes: the metadata's block format, else the one that holds this
        dtype unchanged (f32, f16, bf16), else None."""
        return self.quant or DTYPES[self.dtype][1]

    @property
    def logical_shape(self) -> tuple[int, ...]:
        """(rows, cols) in weights: the storage shape, except for a block-quantized tensor."""
        return (self.shape[0], self.cols) if self.quant else self.shape  # type: ignore[return-value]


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
        if not isinstance(self.metadata, dict):
            raise EngineError(f"{self.path}: corrupt safetensors header: __metadata__ is not an object")
        self.data_start = 8 + hlen
        self.size = size
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            self.tensors[name] = self._check(name, entry)
        self._apply_quant_metadata()

    def _apply_quant_metadata(self) -> None:
        """Mark the tensors the metadata says are block-quantized, checking each against its bytes."""
        for key, fmt in self.metadata.items():
            if key.startswith(COLS_KEY) and FORMAT_KEY + key[len(COLS_KEY):] not in self.metadata:
                raise EngineError(f"{self.path}: metadata {key} without {FORMAT_KEY}{key[len(COLS_KEY):]}")
            if not key.startswith(FORMAT_KEY):
                continue
            name = key[len(FORMAT_KEY):]
            where = f"{self.path}: tensor {name}"
            info = self.tensors.get(name)
            if info is None:
                raise EngineError(f"{self.path}: metadata {key} names a tensor the file does not hold")
            if fmt not in BLOCK or fmt in FLOAT_FORMATS:
                raise EngineError(f"{where}: metadata {key}: unknown block format {fmt!r} "
                                  f"(known: {', '.join(f for f in BLOCK if f not in FLOAT_FORMATS)})")
            cols = self.metadata.get(COLS_KEY + name)
            if not isinstance(cols, str) or not (cols.isascii() and cols.isdigit()) or int(cols) < 1:
                raise EngineError(f"{where}: metadata {COLS_KEY}{name} should be a positive column count, "
                                  f"got {cols!r}")
            if info.dtype != "U8" or len(info.shape) != 2:
                raise EngineError(f"{where}: {fmt} in the metadata, but stored as {info.dtype} {list(info.shape)} "
                                  f"(expected U8 of shape (rows, row bytes))")
            try:
                rb = row_bytes(fmt, int(cols))
                check_rows(fmt, info.shape[0])
            except FormatError as e:
                raise EngineError(f"{where}: {e}") from None
            if rb != info.shape[1]:
                raise EngineError(f"{where}: {fmt} rows of {cols} weights take {rb} bytes, the tensor's rows "
                                  f"{info.shape[1]}")
            self.tensors[name] = TensorInfo(name, info.dtype, info.shape, info.start, info.end, fmt, int(cols))

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
        return read_tensor(self.path, self.tensors[name])


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """Tensor `info`'s bytes in file `path` as an owned numpy array of its storage dtype."""
    with open(path, "rb") as f:
        f.seek(info.start)
        buf = f.read(info.nbytes)
    if len(buf) != info.nbytes:
        raise EngineError(f"{path}: tensor {info.name}: short read, the file was truncated")
    return np.frombuffer(bytearray(buf), dtype=DTYPES[info.dtype][0]).reshape(info.shape)
