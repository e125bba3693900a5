"""`mer-tui convert SRC DST [--quant Q] [--force]`: a Hugging Face checkpoint -> an expert store.

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
from engine.loader import QUANTS
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


def convert_checkpoint(src: str | Path, dst: str | Path, quant: str | None = None, force: bool = False,
                       progress: Progress | None = None) -> dict:
    """Write the expert store of checkpoint `src` into `dst`; returns a summary (bytes, bundles, seconds)."""
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise EngineError(f"{src}: no such checkpoint folder")
    if is_store(src):
        raise EngineError(f"{src}: is already an expert store")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise EngineError(f"{dst}: the destination must not be the source folder or inside it")
    if dst.exists() and not force:
        raise EngineError(f"{dst}: already exists (use --force to replace it)")
    spec = load_spec(src)
    if not spec.is_moe:
        raise EngineError(f"{src / 'config.json'}: model_type {spec.model_type} has no experts to stream")
    ckpt = Checkpoint(src)
    shapes = expert_shapes(spec)
    _check_quant(quant, tuple(s[1] for s in shapes))

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

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    largest = max(ckpt.where[n].tensors[n].nbytes for n in ckpt.where)
    widest_row = max(ckpt.info(n).nbytes // max(1, ckpt.info(n).shape[0]) for n in expert_names)
    buf = bytearray(max(1, min(PIECE, largest), widest_row))   # the one read buffer, reused for every piece
    with staged_folder(dst, force) as tmp:
        copied = copy_side_files(src, tmp)
        infos = [ckpt.where[n].tensors[n] for n in resident]
        st = SafetensorsWriter(tmp / RESIDENT_FILE, [(i.name, i.dtype, i.shape, i.nbytes) for i in infos])
        for info in infos:
            st.begin(info.name)
            for piece in pieces(ckpt.path_of(info.name), info.start, info.nbytes, buf):
                st.write(piece)
                advance(len(piece))
        st.close()

        ef = ExpertFileWriter(tmp / EXPERT_FILE)
        for i, e in pairs:
            ef.begin_bundle(i, e)
            for name, shape in zip(spec.expert_names(i, e), shapes):
                info = ckpt.info(name + ".weight", shape)
                source_formats.add(info.fmt)  # type: ignore[arg-type]
                fmt = quant or info.fmt
                ef.begin_part(fmt, shape)  # type: ignore[arg-type]
                path = ckpt.path_of(name + ".weight")
                if fmt == info.fmt:
                    for piece in pieces(path, info.start, info.nbytes, buf):
                        ef.write(piece)
                        advance(len(piece))
                    continue
                # Quantization works on whole rows: convert a block of rows at a time.
                src_row = info.nbytes // shape[0]
                rows_per = max(1, len(buf) // src_row)
                rows = pieces(path, info.start, info.nbytes, memoryview(buf)[:rows_per * src_row])
                for raw in rows:
                    block = np.frombuffer(raw, np.uint8).reshape(-1, src_row)
                    x = kernels.dequantize(block, info.fmt, shape[1])
                    ef.write(kernels.quantize(x, fmt))
                    advance(len(raw))
            ef.end_bundle()
        ef.close()
        src_fmt = source_formats.pop() if len(source_formats) == 1 else None
        write_index(tmp, ef, spec, src_fmt, quant, {"copied": copied})
        expert_bytes = ef.pos
    return {"src": str(src), "dst": str(dst), "bundles": len(pairs), "expert_bytes": expert_bytes,
            "source_bytes": total, "seconds": time.perf_counter() - t0, "quant": quant or src_fmt}


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

        summary = convert_checkpoint(args.src, args.dst, quant=args.quant, force=args.force, progress=report)
    print(f"wrote {summary['dst']}: {summary['bundles']} expert bundles ({summary['quant']}), "
          f"{format_size(summary['expert_bytes'])} of experts in {summary['seconds']:.1f} s")
    return 0
