"""The one narrow interface through which the model gets expert weights.

The forward pass asks a source for the bundles of the experts the router chose at a layer;
whether they come from RAM, a cache in front of an SSD, or anything else is the source's
business.  Sources also carry the cache settings the UI tunes while the model runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kernels import FormatError, QMatrix, layout, row_bytes

from .checkpoint import Checkpoint
from .errors import EngineError
from .spec import ModelSpec


@dataclass(frozen=True)
class ExpertBundle:
    """One expert's three matrices: gate and up are (width, hidden), down is (hidden, width)."""

    gate: QMatrix
    up: QMatrix
    down: QMatrix

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


class Pending:
    """One layer's bundles as a source hands them over: `ready` at once, the rest from wait()."""

    __slots__ = ("ready", "_rest")

    def __init__(self, ready: dict[int, ExpertBundle],
                 rest: Callable[[], dict[int, ExpertBundle]] | None = None):
        self.ready = ready
        self._rest = rest

    def wait(self) -> dict[int, ExpertBundle]:
        """The bundles not in `ready`; blocks until they are read and raises as get() would."""
        return self._rest() if self._rest is not None else {}


class ExpertSource(ABC):
    """Where expert bundles come from.  Implementations must be thread-safe."""

    #: name shown in telemetry (io.backend)
    backend: str = "ram"

    @abstractmethod
    def get(self, layer: int, experts: Sequence[int]) -> dict[int, ExpertBundle]:
        """The bundles of `experts` at `layer`; blocks until all are available."""

    def request(self, layer: int, experts: Sequence[int]) -> Pending:
        """The bundles of `experts` at `layer` without waiting for all of them: those available now in
        `ready`, the others (read meanwhile) from the result's wait(), which must be called.  The caller
        computes with the first while the rest are read."""
        return Pending(self.get(layer, experts))

    def prefetch(self, hints: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Hints that these (layer, experts) will be asked for soon, the most urgent first (the next
        layer's before the one after it); they replace earlier hints.  Must not block."""

    def wants_hints(self) -> bool:
        """Whether prefetch() hints would lead to any read now.  The model guesses the experts of the
        layers ahead (their routers on an estimate of their input, every layer) only when they would."""
        return False

    def observe_routing(self, layer: int, probs: np.ndarray, picked: Sequence[int]) -> None:
        """The router's probabilities over `layer`'s experts for each of this step's tokens (n, experts)
        and the experts it picked, just before get() or request() asks for them: evidence for an
        eviction policy (a source that has none ignores them, at no cost on the decoding thread)."""

    def stats(self) -> dict:
        """Telemetry of this source: the tiers, io and prefetch parts of the snapshot."""
        return {}

    def configure(self, **settings) -> None:
        """Change cache settings while running (ram_cache, policy, prefetch); unknown ones are ignored."""

    def pin(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Keep these (layer, expert) bundles resident."""

    def unpin_all(self) -> None:
        """Undo every pin."""

    def reset_stats(self) -> None:
        """Zero the counters."""

    def close(self) -> None:
        """Release files, threads and buffers."""


def load_matrix(ckpt: Checkpoint, name: str, shape: tuple[int, int], quant: str | None,
                relayout: bool = False) -> QMatrix:
    """A checkpoint matrix as a QMatrix, in its own format or quantized to `quant`, in the layout the
    kernels run fastest (kernels.layout: q4_0 as q4_0x8 and so on, where the rows allow).  `relayout`
    puts a matrix kept in its own block format in that layout too (a GGUF's: the same bytes, moved)."""
    raw, fmt = ckpt.read(name + ".weight", shape)
    q = QMatrix(raw.view("uint8").reshape(shape[0], -1), fmt, shape[0], shape[1])
    target = layout(quant or (fmt if relayout else None), shape[0])
    if target is None or target == fmt:
        return q
    try:
        row_bytes(target, shape[1])
    except FormatError as e:
        raise EngineError(f"{ckpt.path_of(name + '.weight')}: tensor {name}.weight: {e}") from None
    return q.to_format(target)


def expert_shapes(spec: ModelSpec) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    w, h = spec.moe_intermediate_size, spec.hidden_size
    return (w, h), (w, h), (h, w)


class InMemoryExperts(ExpertSource):
    """Every expert read into RAM at load time: the simple source, and the reference for the others."""

    backend = "ram"

    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, quant: str | None = None,
                 progress: Callable[[int, int], None] | None = None):
        self.bundles: dict[tuple[int, int], ExpertBundle] = {}
        shapes = expert_shapes(spec)
        pairs = [(i, e) for i in range(spec.num_layers) if spec.moe_layers[i] for e in range(spec.num_experts)]
        for done, (i, e) in enumerate(pairs):
            names = spec.expert_names(i, e)
            self.bundles[i, e] = ExpertBundle(*(load_matrix(ckpt, n, s, quant) for n, s in zip(names, shapes)))
            if progress:
                progress(done + 1, len(pairs))
        self.hits = 0
        self.bytes_used = sum(b.nbytes for b in self.bundles.values())

    def get(self, layer: int, experts: Sequence[int]) -> dict[int, ExpertBundle]:
        self.hits += len(experts)
        return {e: self.bundles[layer, e] for e in experts}

    def stats(self) -> dict:
        n = len(self.bundles)
        return {
            "tiers": {"ram": {"hits": self.hits, "misses": 0, "hit_rate": 1.0 if self.hits else 0.0,
                              "bytes_used": self.bytes_used, "bytes_budget": None, "entries": n, "pinned": n},
                      "ssd": {"reads": 0, "bytes_read": 0, "read_mb_s": 0.0, "busy_s": 0.0, "busy": 0.0}},
            "io": {"backend": "ram", "queue_depth": 0, "queue_depth_max": 0, "queue_depth_mean": 0.0,
                   "read_ms_p50": 0.0, "read_ms_p99": 0.0},
            "prefetch": {"enabled": False, "issued": 0, "useful": 0},
        }

    def reset_stats(self) -> None:
        self.hits = 0
