"""`engine.load`: a folder (or GGUF file) on disk -> a ready Model."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import kernels

from .cache import POLICIES
from .checkpoint import Checkpoint
from .errors import EngineError
from .experts import ExpertSource, InMemoryExperts
from .gguf_import import GgufCheckpoint, is_gguf
from .gguf_vocab import build_tokenizer
from .model import Model
from .sizes import parse_size
from .spec import ModelSpec, load_spec
from .store import checkpoint_layout, is_store, open_store

log = logging.getLogger("engine.loader")

QUANTS = ("q4_0", "q8_0", "q4_k", "bf16", "f16", "f32")
KV_CACHES = ("f16", "f32", "q8_0")
IO_BACKENDS = ("auto", "uring", "pread", "mmap")

Progress = Callable[[str, int, int], None]


def load(path: str | os.PathLike, *, ram_cache: int | str | None = None, io: str = "auto",
         policy: str = "lru", prefetch: bool = True, quant: str | None = None, dense_quant: str | None = None,
         quant_dense: bool = False, threads: int | None = None, kv_cache: str | None = None,
         progress: Progress | None = None) -> Model:
    """Open a Hugging Face checkpoint folder, an expert store (`mer-tui convert`) or a GGUF file and
    return a Model.

    Where experts come from:
      * an expert store always streams (StreamingExperts): bundles are read on demand into a RAM
        cache of `ram_cache` bytes (None: no limit, the cache grows to hold what was asked for);
      * a Hugging Face folder or a GGUF file streams too, straight from its shards without converting,
        when `ram_cache` is given or `io` is not "auto" (a GGUF's experts in their GGUF layouts, moving
        each read's bytes would cost milliseconds: a store converted from it holds them in the kernels'
        faster x8 layouts, which a GGUF's resident matrices take as they load);
      * otherwise (a Hugging Face folder, ram_cache=None, io="auto") every expert is read into RAM at
        load (InMemoryExperts), as before.
    `io` picks the reader: "uring" (io_uring, O_DIRECT), "pread" (thread pool, O_DIRECT), "mmap"
    (page cache), or "auto" (uring, else pread; buffered where O_DIRECT is refused; the reason is
    logged and shown in telemetry as io.backend_reason).  `policy` is lru, lfu, lfu-decay or router;
    `prefetch` reads the next layer's likely experts in the background.  Budget, policy, prefetch and
    pins can change while the model runs (Model.configure, Model.experts.pin).

    Formats: `quant` is the experts'; `dense_quant` the large dense matrices' (attention q/k/v/o, dense
    MLP layers, shared experts, lm_head -- q8_0 when dense_quant is 4-bit), independently: q8_0 dense
    with 4-bit experts is llama.cpp's usual layout.  Embedding, norms, biases and routers keep their
    own format.  None keeps what is on disk: a store converted with --dense-quant loads its matrices
    as stored, with no float copy; asking for the stored format is a no-op, and another format
    re-quantizes from the stored values.  `quant_dense=True` is the older spelling of
    dense_quant=quant.

    `kv_cache` is what a generation keeps keys and values in: "f16" (half the bytes a decoded token reads,
    as llama.cpp keeps them), "f32", or "q8_0" (53% of f16's bytes, llama.cpp's --cache-type-k/v q8_0; the
    head size a multiple of 32); None: f16 where the kernels attend over it (kernels.kv_format).

    `progress(stage, done, total)` is called while weights load, for a UI to show.
    """
    folder = Path(path)
    if not folder.exists():
        raise EngineError(f"{folder}: no such model folder")
    gguf = is_gguf(folder)
    if not gguf and not folder.is_dir():
        raise EngineError(f"{folder}: not a folder (expected a checkpoint folder with config.json, or a GGUF file)")
    for option, fmt in (("quant", quant), ("dense_quant", dense_quant)):
        if fmt is not None and fmt not in QUANTS:
            raise EngineError(f"{option}: unknown format {fmt!r} (choose from {', '.join(QUANTS)})")
    if quant_dense:
        if dense_quant is not None and dense_quant != quant:
            raise EngineError(f"quant_dense: means dense_quant={quant!r}, but dense_quant={dense_quant!r} "
                              f"is given too; give dense_quant alone")
        dense_quant = quant
    if io not in IO_BACKENDS:
        raise EngineError(f"io: unknown reader {io!r} (choose from {', '.join(IO_BACKENDS)})")
    if policy not in POLICIES:
        raise EngineError(f"policy: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    if kv_cache is not None and kv_cache not in KV_CACHES:
        raise EngineError(f"kv_cache: unknown format {kv_cache!r} (choose from {', '.join(KV_CACHES)})")
    budget = parse_size(ram_cache, "ram_cache")
    if threads is not None:
        if threads < 1:
            raise EngineError(f"threads: must be >= 1, got {threads}")
        kernels.set_threads(threads)

    if gguf:
        gg = GgufCheckpoint(folder)
        ckpt: Checkpoint = gg
        spec, store = gg.spec, False
    else:
        spec = load_spec(folder)
        store = is_store(folder)
        ckpt = Checkpoint(folder)
    if kv_cache == "q8_0" and spec.head_dim % 32:
        raise EngineError(f"kv_cache: q8_0 needs a head size that is a multiple of 32, and this model's is "
                          f"{spec.head_dim}")
    from .weights import load_resident

    # A GGUF's block formats are put in the kernels' faster layouts as they load (a store has them so).
    weights = load_resident(ckpt, spec, dense_quant, relayout=gguf)
    experts: ExpertSource | None = None
    if spec.is_moe:
        report = (lambda d, t: progress("experts", d, t)) if progress else None
        if store or budget is not None or io != "auto":
            experts = _streaming(folder, ckpt, spec, store, budget=budget, io=io, policy=policy,
                                 prefetch=prefetch, quant=quant)
        else:
            experts = InMemoryExperts(ckpt, spec, quant, progress=report)
    from .tokenizer import Tokenizer

    tokenizer = None
    if gguf:
        try:
            tokenizer = Tokenizer.from_built(*build_tokenizer(gg.gguf.metadata, str(gg.folder)))
        except EngineError as e:   # the weights still run from token ids (`mer-tui bench`)
            log.warning("no tokenizer: %s", e)
    elif (folder / "tokenizer.json").exists():
        tokenizer = Tokenizer(folder)
    return Model(spec, weights, experts, tokenizer=tokenizer, path=str(folder), prefetch=prefetch,
                 quant=quant, kv_cache=kv_cache)


def _streaming(folder: Path, ckpt: Checkpoint, spec: ModelSpec, store: bool, *, budget: int | None, io: str,
               policy: str, prefetch: bool, quant: str | None) -> ExpertSource:
    from .io import open_reader
    from .streaming import StreamingExperts

    layout = open_store(folder, spec) if store else checkpoint_layout(ckpt, spec)
    reader = open_reader(io, layout.files)
    try:
        return StreamingExperts(layout, reader, budget=budget, policy=policy, prefetch=prefetch, quant=quant)
    except BaseException:
        reader.close()
        raise
