"""A strict reader of a GGUF file's header: its metadata and where each tensor's bytes lie.

Only the header is parsed (a few MB even for a large vocabulary); tensor data stays on disk and is
read by offset, as the converter and the streaming readers read safetensors.  Every defect surfaces
as an EngineError naming the file.  Layout (GGUF v2/v3, little-endian): magic "GGUF", version, tensor
count, metadata count; the metadata (key, type, value); per tensor its name, dimensions (innermost
first), ggml type and offset from the data section, which starts at the next multiple of
`general.alignment` (default 32) after the header.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.formats import row_bytes

from .errors import EngineError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# ggml type id -> kernels format name, for the formats the kernels compute
GGML_FORMATS = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 7: "q5_1", 8: "q8_0", 10: "q2_k", 11: "q3_k",
                12: "q4_k", 13: "q5_k", 14: "q6_k", 20: "iq4_nl", 23: "iq4_xs", 30: "bf16"}
# names of the others, for errors
GGML_NAMES = {9: "Q8_1", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 21: "IQ3_S", 22: "IQ2_S",
              24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}

# metadata value types: id -> numpy dtype of a number (8: string, 9: array, handled apart)
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GgufTensor:
    name: str
    dims: tuple[int, ...]   # ggml order: dims[0] is the innermost (columns of a matrix)
    ggml_type: int
    start: int              # absolute offset of its first byte in the file
    nbytes: int

    @property
    def fmt(self) -> str | None:
        """The kernels format of its bytes, or None where mer-tui cannot compute the type."""
        return GGML_FORMATS.get(self.ggml_type)

    @property
    def type_name(self) -> str:
        fmt = self.fmt
        return fmt.upper() if fmt else GGML_NAMES.get(self.ggml_type, f"type {self.ggml_type}")

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (outermost first): (experts, rows, cols) of a merged expert tensor."""
        return tuple(reversed(self.dims))


class _Cursor:
    def __init__(self, data: memoryview, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise EngineError(f"{self.path}: GGUF header ends early (truncated file?)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise EngineError(f"{self.path}: GGUF string at byte {self.pos - n} is not UTF-8") from None

    def value(self, vtype: int):
        if vtype in _NUMPY:
            dt = np.dtype(_NUMPY[vtype])
            return np.frombuffer(self.take(dt.itemsize), dt)[0].item()
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.unpack("<I"), self.unpack("<Q")
            if itype in _NUMPY:   # numbers: one array, not n Python objects (scores of a 150k vocabulary)
                dt = np.dtype(_NUMPY[itype])
                return np.frombuffer(self.take(n * dt.itemsize), dt).tolist()
            return [self.value(itype) for _ in range(n)]
        raise EngineError(f"{self.path}: unknown GGUF metadata type {vtype}")


class GgufFile:
    """The metadata and tensor table of one GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < 24:
                    raise EngineError(f"{self.path}: not a GGUF file (only {size} bytes)")
                # Mapped, not read: the header's size is known only once parsed, and only its pages are
                # touched (a large vocabulary's tokens and merges are a few MB of a file of many GB).
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                    view = memoryview(mm)
                    try:
                        self._parse(view, size)
                    finally:
                        view.release()
        except OSError as e:
            raise EngineError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def _parse(self, data: memoryview, file_size: int) -> None:
        cur = _Cursor(data, self.path)
        if bytes(data[:4]) != MAGIC:
            raise EngineError(f"{self.path}: not a GGUF file (no GGUF magic)")
        cur.take(4)
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise EngineError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.version = version
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        raw: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.unpack("<I")
            if not 1 <= n_dims <= 4:
                raise EngineError(f"{self.path}: tensor {name} has {n_dims} dimensions")
            dims = tuple(cur.unpack("<Q") for _ in range(n_dims))
            ggml_type, offset = cur.unpack("<I"), cur.unpack("<Q")
            raw.append((name, dims, ggml_type, offset))
        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0:
            raise EngineError(f"{self.path}: general.alignment {align!r} is not a positive integer")
        data_start = -(-cur.pos // align) * align
        self.tensors: dict[str, GgufTensor] = {}
        for name, dims, ggml_type, offset in raw:
            t = GgufTensor(name, dims, ggml_type, data_start + offset, _nbytes(name, dims, ggml_type, self.path))
            if t.start + t.nbytes > file_size:
                raise EngineError(f"{self.path}: tensor {name} runs past the end of the file (truncated?)")
            self.tensors[name] = t

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


def _nbytes(name: str, dims: tuple[int, ...], ggml_type: int, path: Path) -> int:
    """Bytes of a tensor: its rows times a row's bytes.  For the types the kernels cannot read the size is
    not needed (such a tensor is refused by name before any read), so 0."""
    rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
    try:
        if ggml_type in GGML_FORMATS:
            return rows * row_bytes(GGML_FORMATS[ggml_type], dims[0])
        return 0
    except ValueError as e:
        raise EngineError(f"{path}: tensor {name}: {e}") from None
