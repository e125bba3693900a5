"""`mer-tui convert SRC DST [--quant Q] [--dense-quant Q] [--force]`: a Hugging Face checkpoint or a
GGUF file (engine.gguf_import) -> an expert store.

--quant is the experts' format, --dense-quant the large dense matrices' (attention, dense MLPs,
shared experts, lm_head: engine.weights.dense_formats), stored quantized in model.safetensors (U8
blocks, marked in its metadata: engine.safetensors_file) so that loading needs no option and makes no
float copy; the bytes are those engine.load(SRC, dense_quant=Q) would make.

Streams tensor by tensor, each in pieces of at most PIECE bytes (quantized a block of rows at a
time), so memory stays flat whatever the model's size; writes into DST.tmp-xxxx renamed when
complete (engine.store.staged_folder), so an interrupted convert leaves nothing that loads.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

import kernels
from engine.checkpoint import Checkpoint
from engine.errors import EngineError
from engine.experts import expert_shapes
from engine.gguf_import import GgufCheckpoint, gguf_side_files, is_gguf
from engine.loader import QUANTS
from engine.safetensors_file import FLOAT_DTYPES, FORMAT_KEY, TensorInfo, quantized_metadata
from engine.sizes import format_size
from engine.spec import load_spec
from engine.store import (
    EXPERT_FILE,
    RESIDENT_FILE,
    ExpertFileWriter,
    SafetensorsWriter,
    copy_side_files,
    is_store,
    pieces,
    staged_folder,
    write_index,
)
from engine.weights import dense_formats

# Bytes read, converted and written at a time: bounds the converter's memory (about 3x this with --quant).
PIECE = 8 << 20

Progress = Callable[[int, int], None]


def _check_quant(quant: str | None, cols: tuple[int, ...]) -> None:
    if quant is None:
        return
    if quant not in QUANTS:
        raise EngineError(f"--quant: unknown format {quant!r} (choose from {', '.join(QUANTS)})")
    for c in cols:
        try:
            kernels.row_bytes(quant, c)
        except ValueError as e:
            raise EngineError(f"--quant {quant}: {e}") from None


def _write_converted(info: TensorInfo, path: Path, fmt: str, cols: int, buf: bytearray,
                     write: Callable[[memoryview | np.ndarray], None], advance: Callable[[int], None],
                     row_order: np.ndarray | None = None) -> None:
    """Tensor `info` of file `path` written in `fmt`: its bytes as they are when the format is the
    same, else converted a block of whole rows at a time (quantization works on rows), so memory is
    bounded by `buf` whatever the tensor's size.  With `row_order` (a GGUF's q and k: GgufCheckpoint)
    the tensor is read whole and its rows taken in that order: attention matrices, tens of MB at most."""
    if row_order is not None:
        rows = np.fromfile(path, np.uint8, count=info.nbytes, offset=info.start).reshape(info.shape[0], -1)[row_order]
        write(np.ascontiguousarray(rows) if fmt == info.fmt else _in_format(rows, info.fmt, fmt, cols))  # type: ignore[arg-type]
        advance(info.nbytes)
        return
    if fmt == info.fmt:
        for piece in pieces(path, info.start, info.nbytes, buf):
            write(piece)
            advance(len(piece))
        return
    src_row = info.nbytes // info.shape[0]
    rows_per = max(1, len(buf) // src_row)
    if rows_per >= kernels.X8_ROWS:  # whole runs of eight rows, which the x8 layouts interleave
        rows_per -= rows_per % kernels.X8_ROWS
    for raw in pieces(path, info.start, info.nbytes, memoryview(buf)[:rows_per * src_row]):
        write(_in_format(np.frombuffer(raw, np.uint8).reshape(-1, src_row), info.fmt, fmt, cols))  # type: ignore[arg-type]
        advance(len(raw))


def _in_format(block: np.ndarray, src: str, fmt: str, cols: int) -> np.ndarray:
    """Whole rows of format `src` as rows of `fmt`."""
    return kernels.QMatrix(block, src, block.shape[0], cols).to_format(fmt).data


def convert_checkpoint(src: str | Path, dst: str | Path, quant: str | None = None, force: bool = False,
                       progress: Progress | None = None, dense_quant: str | None = None) -> dict:
    """Write the expert store of checkpoint `src` into `dst`; returns a summary (bytes, bundles, seconds).

    `quant`: the experts' format (None: the source's); `dense_quant`: the dense matrices' (None: copied
    as they are), lm_head q8_0 when it is 4-bit, as engine.load does."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    gguf = is_gguf(src)
    if not gguf and not src.is_dir():
        raise EngineError(f"{src}: no such checkpoint folder or GGUF file")
    if not gguf and is_store(src):
        raise EngineError(f"{src}: is already an expert store")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise EngineError(f"{dst}: the destination must not be the source folder or inside it")
    if dst.exists() and not force:
        raise EngineError(f"{dst}: already exists (use --force to replace it)")
    order: dict[str, np.ndarray] = {}   # rows to take in another order (a GGUF's q and k)
    if gguf:
        gg = GgufCheckpoint(src)
        spec, order = gg.spec, gg.row_order
        side, missing = gguf_side_files(gg)   # before anything is written
        ckpt: Checkpoint = gg
    else:
        spec = load_spec(src)
        if not spec.is_moe:
            raise EngineError(f"{src / 'config.json'}: model_type {spec.model_type} has no experts to stream")
        ckpt, missing = Checkpoint(src), None
    shapes = expert_shapes(spec)
    _check_quant(quant, tuple(s[1] for s in shapes))
    # the dense matrices to write in another format: name -> (target format, columns)
    dense: dict[str, tuple[str, int]] = {}
    if dense_quant is not None:
        if dense_quant not in QUANTS:
            raise EngineError(f"--dense-quant: unknown format {dense_quant!r} (choose from {', '.join(QUANTS)})")
        for name, (shape, fmt) in dense_formats(spec, dense_quant).items():
            info = ckpt.info(name + ".weight", shape)
            try:
                kernels.row_bytes(fmt, shape[1])  # type: ignore[arg-type]
            except ValueError as e:
                raise EngineError(f"--dense-quant {dense_quant}: tensor {name}.weight: {e}") from None
            if fmt != info.fmt:
                dense[name + ".weight"] = (fmt, shape[1])  # type: ignore[assignment]
    elif gguf:
        # GGUF's block formats, held in the layout the kernels run fastest (q4_k as q4_kx8 ...): the same
        # bytes rearranged, as `engine.load` arranges them when it quantizes.
        for name, (shape, _) in dense_formats(spec, None).items():
            info = ckpt.info(name + ".weight", shape)
            if kernels.layout(info.fmt, shape[0]) != info.fmt:  # type: ignore[arg-type]
                dense[name + ".weight"] = (kernels.layout(info.fmt, shape[0]), shape[1])  # type: ignore

    pairs = [(i, e) for i in range(spec.num_layers) if spec.moe_layers[i] for e in range(spec.num_experts)]
    expert_names: set[str] = set()
    for i, e in pairs:
        for name, shape in zip(spec.expert_names(i, e), shapes):
            ckpt.info(name + ".weight", shape)   # checks presence, shape and float dtype before writing
            expert_names.add(name + ".weight")
    resident = sorted(n for n in ckpt.where if n not in expert_names)
    total = sum(ckpt.where[n].tensors[n].nbytes for n in ckpt.where)
    done = 0
    source_formats: set[str] = set()
    written: set[str] = set()   # the experts' formats in the store

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    largest = max(ckpt.where[n].tensors[n].nbytes for n in ckpt.where)
    widest_row = max(ckpt.info(n).nbytes // max(1, ckpt.info(n).shape[0]) for n in expert_names | set(dense))
    # the one read buffer, reused for every piece: at least eight of the widest rows (an x8 run)
    buf = bytearray(max(1, min(PIECE, largest), kernels.X8_ROWS * widest_row))
    # model.safetensors: its header (every tensor's dtype, shape, size and, for block formats, the
    # metadata that marks them) is known before a byte is converted.
    infos = [ckpt.where[n].tensors[n] for n in resident]
    header: list[tuple[str, str, tuple[int, ...], int]] = []
    metadata: dict[str, str] = {"format": "pt"}
    for info in infos:
        if info.name not in dense:          # copied as it is (a block-quantized source stays marked)
            header.append((info.name, info.dtype, info.shape, info.nbytes))
            if info.quant:
                metadata.update(quantized_metadata(info.name, info.quant, info.cols))  # type: ignore[arg-type]
            continue
        fmt, cols = dense[info.name]
        rows = info.shape[0]
        if fmt in FLOAT_DTYPES:   # every block format is stored as U8
            header.append((info.name, FLOAT_DTYPES[fmt], (rows, cols), rows * kernels.row_bytes(fmt, cols)))
        else:
            rb = kernels.row_bytes(fmt, cols)
            header.append((info.name, "U8", (rows, rb), rows * rb))
            metadata.update(quantized_metadata(info.name, fmt, cols))
    dense_blocks = any(k.startswith(FORMAT_KEY) for k in metadata)
    with staged_folder(dst, force) as tmp:
        if gguf:
            for name, text in side.items():
                (tmp / name).write_text(text)
            copied = sorted(side)
        else:
            copied = copy_side_files(src, tmp)
        st = SafetensorsWriter(tmp / RESIDENT_FILE, header, metadata)
        for info in infos:
            st.begin(info.name)
            fmt, cols = dense.get(info.name, (info.fmt, 0))
            _write_converted(info, ckpt.path_of(info.name), fmt, cols, buf, st.write, advance,  # type: ignore[arg-type]
                             order.get(info.name))
        st.close()

        ef = ExpertFileWriter(tmp / EXPERT_FILE)
        for i, e in pairs:
            ef.begin_bundle(i, e)
            for name, shape in zip(spec.expert_names(i, e), shapes):
                info = ckpt.info(name + ".weight", shape)
                source_formats.add(info.fmt)  # type: ignore[arg-type]
                fmt = kernels.layout(quant or (info.fmt if gguf else None), shape[0]) or info.fmt  # type: ignore
                written.add(fmt)
                ef.begin_part(fmt, shape)  # type: ignore[arg-type]
                _write_converted(info, ckpt.path_of(name + ".weight"), fmt, shape[1], buf, ef.write,  # type: ignore[arg-type]
                                 advance)
            ef.end_bundle()
        ef.close()
        src_fmt = source_formats.pop() if len(source_formats) == 1 else None
        write_index(tmp, ef, spec, src_fmt, quant, {"copied": copied, "dense_quant": dense_quant},
                    dense_blocks=dense_blocks)
        expert_bytes = ef.pos
        resident_bytes = (tmp / RESIDENT_FILE).stat().st_size
    return {"src": str(src), "dst": str(dst), "bundles": len(pairs), "expert_bytes": expert_bytes,
            "resident_bytes": resident_bytes, "source_bytes": total, "seconds": time.perf_counter() - t0,
            "quant": quant or src_fmt, "expert_formats": sorted(written), "dense_quant": dense_quant,
            "note": missing}


def run_convert(args: argparse.Namespace) -> int:
    """The convert command: a rich progress bar (bytes, speed, ETA) on a terminal, then a summary line."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = Console(stderr=True)
    columns = (TextColumn("converting"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
        task = bar.add_task("convert", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        summary = convert_checkpoint(args.src, args.dst, quant=args.quant, force=args.force, progress=report,
                                     dense_quant=args.dense_quant)
    dense = f" ({summary['dense_quant']})" if summary["dense_quant"] else ""
    formats = summary["quant"] or " + ".join(summary["expert_formats"])   # a GGUF's mix, as q4_kx8 + q6_k
    note = f"; {summary['note']}" if summary["note"] else ""
    print(f"wrote {summary['dst']}: {summary['bundles']} expert bundles ({formats}), "
          f"{format_size(summary['expert_bytes'])} of experts, {format_size(summary['resident_bytes'])} of "
          f"resident weights{dense} in {summary['seconds']:.1f} s{note}")
    return 0
