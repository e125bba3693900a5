"""The expert store: where each expert bundle's bytes live, and the writer and reader of its format.

A store is a folder:
  config.json, tokenizer files      copied from the source checkpoint
  model.safetensors                 every non-expert tensor, names and bytes unchanged (engine.load's
                                    resident-weights path reads it like any checkpoint); with
                                    `--dense-quant` the large dense matrices (weights.dense_formats) are
                                    stored block-quantized instead: dtype U8 (rows, row_bytes), their
                                    format and columns in the file's __metadata__ (safetensors_file)
  experts.bin                       one extent per (layer, expert) bundle: gate, up, down back to back,
                                    each extent starting on a 4096-byte boundary, so one bundle is one
                                    aligned O_DIRECT read
  index.json                        format version, formats, shapes, offsets, sizes, a crc32 per bundle

Versions: 1 is a store whose resident tensors are all float; 2 (VERSION_DENSE) one with block-quantized
dense matrices in model.safetensors, and the only difference.  A store is written as version 1 whenever
it can be, so it stays readable by older engines; one they would misread says so by its version.  This
engine reads both.

A Hugging Face folder is described the same way (ExpertLayout), its bundles' parts pointing into the
shards, so the streaming source reads either without caring which it is.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import kernels

from .checkpoint import Checkpoint
from .errors import EngineError
from .experts import expert_shapes
from .io.buffers import ALIGN, align_up
from .jsonfile import read_json_object
from .spec import ModelSpec

FORMAT = "mer-tui expert store"
VERSION = 1
VERSION_DENSE = 2       # model.safetensors holds block-quantized dense matrices
VERSIONS = (VERSION, VERSION_DENSE)
INDEX = "index.json"
EXPERT_FILE = "experts.bin"
RESIDENT_FILE = "model.safetensors"
MATRICES = ("gate", "up", "down")
#: files copied from the source next to the weights, when present
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "chat_template.jinja", "special_tokens_map.json")


@dataclass(frozen=True)
class PartLoc:
    """One matrix of a bundle: its format, shape and absolute byte range in a file of the layout."""

    fmt: str
    rows: int
    cols: int
    file: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class BundleLoc:
    layer: int
    expert: int
    parts: tuple[PartLoc, PartLoc, PartLoc]       # gate, up, down
    crc32: int | None = None                      # over [parts[0].offset, + size) when the store has one
    size: int = 0                                 # bytes the checksum covers

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


@dataclass
class ExpertLayout:
    """Where every bundle lives: the files, and a BundleLoc per (layer, expert)."""

    files: list[Path]
    bundles: dict[tuple[int, int], BundleLoc]
    kind: str = "store"            # "store" or "checkpoint"
    meta: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(b.nbytes for b in self.bundles.values())

    def where(self, layer: int, expert: int) -> BundleLoc:
        b = self.bundles.get((layer, expert))
        if b is None:
            where = self.files[0] if self.files else "?"
            raise EngineError(f"{where}: no bundle for layer {layer} expert {expert}")
        return b


# ----------------------------------------------------------------------------------------- reading
def is_store(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds an expert store (its index.json says so), whatever its version."""
    path = Path(folder) / INDEX
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        return False


def _int(entry: dict, key: str, where: str) -> int:
    v = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise EngineError(f"{where}: field {key} should be a non-negative integer, got {v!r}")
    return v


def open_store(folder: str | os.PathLike, spec: ModelSpec) -> ExpertLayout:
    """Read and check index.json against the expert file and the model's spec."""
    folder = Path(folder)
    path = folder / INDEX
    index = read_json_object(path, missing=f"{folder}: no {INDEX}; not an expert store")
    if index.get("format") != FORMAT:
        raise EngineError(f"{path}: not an expert store index (format {index.get('format')!r})")
    version = index.get("version")
    if version not in VERSIONS:
        raise EngineError(f"{path}: expert store format version {version!r}; this engine reads versions "
                          f"{', '.join(map(str, VERSIONS))}. Convert the model again with this mer-tui")
    expert_file = folder / str(index.get("expert_file", EXPERT_FILE))
    if not expert_file.is_file():
        raise EngineError(f"{expert_file}: missing; the store is incomplete")
    file_size = expert_file.stat().st_size
    checksum = index.get("checksum")
    if checksum not in ("crc32", None):
        raise EngineError(f"{path}: unknown checksum {checksum!r} (this engine knows crc32)")
    entries = index.get("bundles")
    if not isinstance(entries, list):
        raise EngineError(f"{path}: field bundles should be a list")
    shapes = expert_shapes(spec)
    bundles: dict[tuple[int, int], BundleLoc] = {}
    for entry in entries:
        where = f"{path}: bundle {entry.get('layer', '?')}/{entry.get('expert', '?')}" \
            if isinstance(entry, dict) else f"{path}: bundle"
        layer, expert = _int(entry, "layer", where), _int(entry, "expert", where)
        where = f"{path}: layer {layer} expert {expert}"
        offset, size = _int(entry, "offset", where), _int(entry, "size", where)
        if offset % ALIGN:
            raise EngineError(f"{where}: offset {offset} is not a multiple of {ALIGN}")
        if offset + size > file_size:
            raise EngineError(f"{expert_file}: truncated: layer {layer} expert {expert} ends at byte "
                              f"{offset + size}, the file has {file_size}")
        parts_in = entry.get("parts")
        if not isinstance(parts_in, list) or len(parts_in) != 3:
            raise EngineError(f"{where}: expected 3 parts (gate, up, down), got {parts_in!r}")
        parts = []
        for name, p, shape in zip(MATRICES, parts_in, shapes):
            pw = f"{where} {name}"
            fmt = p.get("fmt") if isinstance(p, dict) else None
            if fmt not in kernels.BLOCK:
                raise EngineError(f"{pw}: unknown format {fmt!r}")
            if not isinstance(p.get("shape"), list) or tuple(p["shape"]) != shape:
                raise EngineError(f"{pw}: shape {p.get('shape')} does not match the model's {list(shape)}")
            rel, nbytes = _int(p, "offset", pw), _int(p, "nbytes", pw)
            try:
                kernels.check_rows(fmt, shape[0])
                want = shape[0] * kernels.row_bytes(fmt, shape[1])
            except ValueError as e:
                raise EngineError(f"{pw}: {e}") from None
            if nbytes != want or rel + nbytes > size:
                raise EngineError(f"{pw}: {nbytes} bytes at +{rel} do not fit: {fmt} {list(shape)} needs "
                                  f"{want} within the bundle's {size}")
            parts.append(PartLoc(fmt, shape[0], shape[1], 0, offset + rel, nbytes))
        crc = entry.get("crc32") if checksum else None
        if checksum and not isinstance(crc, int):
            raise EngineError(f"{where}: missing crc32")
        bundles[layer, expert] = BundleLoc(layer, expert, tuple(parts), crc, size)  # type: ignore[arg-type]
    for i in range(spec.num_layers):
        if spec.moe_layers[i]:
            for e in range(spec.num_experts):
                if (i, e) not in bundles:
                    raise EngineError(f"{path}: missing bundle for layer {i} expert {e}")
    meta = {k: v for k, v in index.items() if k != "bundles"}
    return ExpertLayout([expert_file], bundles, "store", meta)


def checkpoint_layout(ckpt: Checkpoint, spec: ModelSpec) -> ExpertLayout:
    """The experts of a Hugging Face folder in place: each part's byte range in its shard."""
    files: list[Path] = []
    file_ids: dict[Path, int] = {}
    bundles: dict[tuple[int, int], BundleLoc] = {}
    shapes = expert_shapes(spec)
    for i in range(spec.num_layers):
        if not spec.moe_layers[i]:
            continue
        for e in range(spec.num_experts):
            parts = []
            for name, shape in zip(spec.expert_names(i, e), shapes):
                info = ckpt.info(name + ".weight", shape)
                p = ckpt.path_of(name + ".weight")
                if p not in file_ids:
                    file_ids[p] = len(files)
                    files.append(p)
                parts.append(PartLoc(info.fmt, shape[0], shape[1], file_ids[p], info.start, info.nbytes))  # type: ignore[arg-type]
            bundles[i, e] = BundleLoc(i, e, tuple(parts))  # type: ignore[arg-type]
    return ExpertLayout(files, bundles, "checkpoint")


# ----------------------------------------------------------------------------------------- writing


class SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header first (sizes are known up front), then
    each tensor's bytes in order, in pieces, so no tensor need be whole in memory."""

    def __init__(self, path: Path, tensors: list[tuple[str, str, tuple[int, ...], int]],
                 metadata: dict | None = None):
        """tensors: (name, safetensors dtype, shape, nbytes) in the order they will be written."""
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        pos = 0
        self._order = []
        for name, dtype, shape, nbytes in tensors:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            self._order.append((name, nbytes))
            pos += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)   # the data starts 8-aligned
        self.path = path
        self._f = open(path, "wb")
        self._f.write(len(raw).to_bytes(8, "little") + raw)
        self._next = 0
        self._left = 0

    def begin(self, name: str) -> None:
        want, nbytes = self._order[self._next]
        if name != want:
            raise EngineError(f"{self.path}: tensor {name} written out of order (expected {want})")
        if self._left:
            raise EngineError(f"{self.path}: previous tensor short by {self._left} bytes")
        self._left = nbytes
        self._next += 1

    def write(self, data) -> None:
        n = memoryview(data).nbytes
        if n > self._left:
            name = self._order[self._next - 1][0]
            raise EngineError(f"{self.path}: tensor {name} gets more bytes than its shape")
        self._f.write(data)
        self._left -= n

    def close(self) -> None:
        if self._next != len(self._order) or self._left:
            raise EngineError(f"{self.path}: closed before every tensor was written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class ExpertFileWriter:
    """experts.bin written bundle by bundle, each part in pieces; offsets, sizes and crc32s recorded."""

    # Dirty pages are flushed and dropped every this many bytes, so converting a model far larger
    # than RAM does not fill memory with page cache waiting for writeback.
    FLUSH_EVERY = 256 << 20

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "wb")
        self.pos = 0
        self.entries: list[dict] = []
        self._bundle: dict | None = None
        self._since_flush = 0

    def begin_bundle(self, layer: int, expert: int) -> None:
        self._bundle = {"layer": layer, "expert": expert, "offset": self.pos, "size": 0, "crc32": 0,
                        "parts": []}

    def begin_part(self, fmt: str, shape: tuple[int, int]) -> None:
        b = self._bundle
        assert b is not None
        b["parts"].append({"fmt": fmt, "shape": list(shape), "offset": b["size"],
                           "nbytes": shape[0] * kernels.row_bytes(fmt, shape[1])})

    def write(self, data) -> None:
        b = self._bundle
        assert b is not None
        mv = memoryview(data).cast("B")
        b["crc32"] = kernels.crc32(mv, b["crc32"])
        self._f.write(mv)
        b["size"] += mv.nbytes
        self.pos += mv.nbytes
        self._since_flush += mv.nbytes

    def end_bundle(self) -> None:
        b = self._bundle
        assert b is not None
        for p in b["parts"]:
            if p["offset"] + p["nbytes"] > b["size"]:
                raise EngineError(f"{self.path}: layer {b['layer']} expert {b['expert']}: a part is short")
        pad = align_up(self.pos) - self.pos   # the next bundle starts on an aligned boundary
        self._f.write(b"\0" * pad)
        self.pos += pad
        self.entries.append(b)
        self._bundle = None
        if self._since_flush >= self.FLUSH_EVERY:
            self._flush()

    def _flush(self) -> None:
        self._f.flush()
        os.fdatasync(self._f.fileno())
        os.posix_fadvise(self._f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._since_flush = 0

    def close(self) -> None:
        self._flush()
        self._f.close()


def write_index(folder: Path, expert_file: ExpertFileWriter, spec: ModelSpec, source_format: str | None,
                quant: str | None, extra: dict | None = None, dense_blocks: bool = False) -> None:
    """index.json; `dense_blocks`: model.safetensors holds block-quantized matrices (version 2)."""
    formats = sorted({p["fmt"] for b in expert_file.entries for p in b["parts"]})
    index = {
        "format": FORMAT,
        "version": VERSION_DENSE if dense_blocks else VERSION,
        "alignment": ALIGN,
        "checksum": "crc32",
        "expert_file": expert_file.path.name,
        "expert_file_bytes": expert_file.pos,
        "model_type": spec.model_type,
        "matrices": list(MATRICES),
        "formats": formats,
        "source_format": source_format,
        "quant": quant,
        "layers": [i for i in range(spec.num_layers) if spec.moe_layers[i]],
        "experts": spec.num_experts,
        "shapes": dict(zip(MATRICES, (list(s) for s in expert_shapes(spec)))),
        **(extra or {}),
        "bundles": expert_file.entries,
    }
    tmp = folder / (INDEX + ".part")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, folder / INDEX)


@contextmanager
def staged_folder(dst: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """A temporary folder next to `dst` (DST.tmp-xxxx) renamed to `dst` when the block completes;
    removed if it raises, so an interrupted write leaves nothing that loads."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise EngineError(f"{dst}: already exists (use --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dst.name + ".tmp-", dir=dst.parent))
    try:
        yield tmp
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=dst.name + ".old-", dir=dst.parent))
            os.replace(dst, old / "x")
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Config and tokenizer files copied next to the weights; the names copied."""
    done = []
    for name in COPIED:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            done.append(name)
    return done


def pieces(path: Path, start: int, nbytes: int, buf: bytearray | memoryview) -> Iterable[memoryview]:
    """The bytes [start, start+nbytes) of a file in pieces of at most len(buf) bytes, read into `buf`
    (one buffer reused across tensors bounds memory): each piece is valid until the next is read."""
    view = memoryview(buf)
    piece = len(buf)
    with open(path, "rb", buffering=0) as f:
        left, pos = nbytes, start
        while left:
            n = min(piece, left)
            got = os.preadv(f.fileno(), [view[:n]], pos)
            if got != n:
                raise EngineError(f"{path}: short read at byte {pos} (file truncated?)")
            yield view[:n]
            left -= n
            pos += n
