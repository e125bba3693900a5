"""The RAM tier: expert bundles under a byte budget, evicted by policy, with pins and a hot set.

Policies rank resident bundles; the lowest rank is evicted first:
  lru        last access
  lfu        access count (kept for every bundle ever seen, so a re-read bundle keeps its history)
  lfu-decay  access count with exponential decay per forward step (half-life HALF_LIFE steps): the
             activation-aware frequency of the MoE expert-caching literature, which follows a change of
             topic that plain LFU would take thousands of tokens to notice
  router     the router's probability for the expert at each step of its layer (observe()), summed
             with a short decay (half-life ROUTER_HALF_LIFE steps): what the router thinks of an expert
             lately, near misses included, where LRU sees only the last pick.  Keys are (layer, expert)

Each rank only grows when its bundle is used, so a heap with lazy invalidation finds the victim in
O(log n): lfu-decay and router are kept as log(sum w d^-t) — the same order as the decayed sum at any
instant, because every bundle decays by the same factor — so ranks never need refreshing as time
passes (router re-ranks a layer's resident bundles when it observes that layer).

Not thread-safe by itself: StreamingExperts holds its lock around every call.
"""
from __future__ import annotations

import heapq
import importlib.util
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

import numpy as np

from .errors import EngineError

POLICIES = ("lru", "lfu", "lfu-decay", "router")
#: lfu-decay: an access counts half as much after this many forward steps (tokens in decode)
HALF_LIFE = 64.0
#: router: a step's router probability counts half as much this many steps later.  In ad-hoc replays
#: of two models' routing (the trained demo's chat replies, the OLMoE-sized random model on the
#: benchmarks' inputs), half-lives of 2.4-4.3 steps came within 0.012 of the best hit rate on the
#: OLMoE-sized model and within 0.02 on the demo, whose hot experts stay hot (longer ones win there,
#: and fall to LRU's level or below on the OLMoE-sized model).  The engine's own replays at 4 are in
#: docs/BENCHMARKS.md.
ROUTER_HALF_LIFE = 4.0


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b), -inf meaning nothing yet."""
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    return max(a, b) + math.log1p(math.exp(-abs(a - b)))


@dataclass
class _Entry:
    value: object
    nbytes: int
    pending: bool = False       # reserved for a read in flight; not evictable, not visible
    prefetched: bool = False    # brought in by prefetch and not yet asked for
    version: int = 0


@dataclass
class _History:
    seq: int = 0                # global access number of the last access
    count: int = 0
    log_score: float = -math.inf


class Tier(ABC):
    """One level of the memory hierarchy holding bundles under a byte budget.

    The RAM tier is the one implemented.  A VRAM tier (CuPy or torch CUDA, see detect_vram) would
    sit in front of it with the same interface and appear in telemetry as tiers.vram.
    """

    name: str

    @abstractmethod
    def lookup(self, key: Hashable) -> object | None:
        """The resident value, or None."""

    @abstractmethod
    def insert(self, key: Hashable, value: object, nbytes: int, prefetched: bool = False) -> bool:
        """Keep `value` if it fits (evicting by policy); False when it cannot fit."""

    @abstractmethod
    def stats(self) -> dict:
        """hits/misses are counted by the source; this gives bytes_used, bytes_budget, entries, pinned."""


def detect_vram() -> str | None:
    """The library a VRAM tier could use (CuPy, or torch with CUDA), or None.

    torch is looked at only when already imported: importing it costs seconds.
    """
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() > 0:
                return "cupy"
        except Exception:  # CuPy without a driver raises its own error types
            pass
    torch = sys.modules.get("torch")
    if torch is not None and getattr(torch, "cuda", None) is not None and torch.cuda.is_available():
        return "torch"
    return None


class RamCache(Tier):
    name = "ram"

    def __init__(self, budget: int | None = None, policy: str = "lru", half_life: float = HALF_LIFE,
                 hot_fraction: float = 0.0):
        self._check_policy(policy)
        self.budget = budget
        self.policy = policy
        self.half_life = half_life
        self.hot_fraction = hot_fraction
        self.entries: dict[Hashable, _Entry] = {}
        self.history: dict[Hashable, _History] = {}
        self.pins: dict[Hashable, None] = {}      # insertion-ordered set: newest pins dropped first
        self.hot: set[Hashable] = set()
        self.used = 0
        self._pending_bytes = 0   # of reservations whose reads are in flight: never evictable
        self.step_no = 0
        self._seq = 0
        self._heap: list[tuple[tuple[float, int], int, Hashable]] = []
        # router: per layer, log(sum of p * d^-t) for each expert (scaled as lfu-decay's score), and the
        # mean probability of the layer's last picks (a prefetched bundle's provisional weight)
        self._routing: dict[int, np.ndarray] = {}
        self._pick_weight: dict[int, float] = {}
        self.evictions = 0
        self.prefetch_wasted = 0
        #: called with the key of a prefetched bundle evicted before anyone asked for it
        self.on_wasted: Callable[[Hashable], None] | None = None
        #: called with the key of every bundle that leaves the cache (its memory may be reused)
        self.on_evict: Callable[[Hashable], None] | None = None

    # ------------------------------------------------------------------ ranking
    @staticmethod
    def _check_policy(policy: str) -> None:
        if policy not in POLICIES:
            raise EngineError(f"policy: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")

    def _rank(self, key: Hashable, provisional: bool = False) -> tuple[float, int]:
        h = self.history.get(key) or _History()
        if provisional:
            # A prefetched bundle ranks as if used once now until it really is (then touch() re-ranks
            # it): otherwise it would be the first victim of the very next reservation, often the
            # prefetch of its neighbour; unused, it ages out like any bundle last used now.
            h = _History(self._seq, h.count + 1, self._plus_now(h.log_score))
        if self.policy == "lru":
            return (float(h.seq), h.seq)
        if self.policy == "lfu":
            return (float(h.count), h.seq)
        if self.policy == "router":
            return (self._router_score(key, provisional), h.seq)
        return (h.log_score, h.seq)

    def _router_score(self, key: Hashable, provisional: bool) -> float:
        """The router policy's rank of `key`, a (layer, expert) pair: -inf for anything never observed."""
        layer, expert = key if isinstance(key, tuple) and len(key) == 2 else (None, None)
        scores = self._routing.get(layer) if isinstance(layer, int) else None
        log_score = -math.inf
        if scores is not None and isinstance(expert, int) and 0 <= expert < len(scores):
            log_score = float(scores[expert])
        if provisional:
            # A prefetched bundle ranks as if picked now with its layer's usual pick probability (see _rank).
            weight = self._pick_weight.get(layer, 1.0) if isinstance(layer, int) else 1.0
            log_score = _log_add(log_score, self._now(ROUTER_HALF_LIFE) + math.log(weight))
        return log_score

    def observe(self, layer: int, probs: np.ndarray, picked: Iterable[int]) -> None:
        """The router's probabilities over `layer`'s experts at this step (averaged over its tokens) and
        the experts it picked: the router policy's evidence.  Kept under every policy, so a switch to
        router starts informed."""
        probs = np.asarray(probs, dtype=np.float64)
        with np.errstate(divide="ignore"):
            term = np.log(probs) + self._now(ROUTER_HALF_LIFE)
        old = self._routing.get(layer)
        self._routing[layer] = term if old is None or len(old) != len(term) else np.logaddexp(old, term)
        picked = [int(e) for e in picked]
        weight = float(probs[picked].mean()) if picked else 0.0
        if weight > 0:
            self._pick_weight[layer] = weight
        if self.policy == "router":
            for e in range(len(probs)):
                entry = self.entries.get((layer, e))
                if entry is not None and not entry.pending:
                    self._push((layer, e), entry)

    def _push(self, key: Hashable, e: _Entry) -> None:
        e.version += 1
        heapq.heappush(self._heap, (self._rank(key, provisional=e.prefetched), e.version, key))
        if len(self._heap) > 2 * len(self.entries) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        self._heap = [(self._rank(k, e.prefetched), e.version, k)
                      for k, e in self.entries.items() if not e.pending]
        heapq.heapify(self._heap)

    def touch(self, key: Hashable) -> None:
        """Record a demand access to `key` (resident or not): the policies rank by these."""
        self._seq += 1
        h = self.history.setdefault(key, _History())
        h.seq = self._seq
        h.count += 1
        h.log_score = self._plus_now(h.log_score)
        e = self.entries.get(key)
        if e is not None and not e.pending:
            self._push(key, e)

    def _now(self, half_life: float) -> float:
        """log(d^-t) with d = 2^(-1/half_life) at this step: a weight of 1 now, in the scaled form."""
        return self.step_no * math.log(2.0) / half_life

    def _plus_now(self, log_score: float) -> float:
        """log(S + d^-t) with d = 2^(-1/half_life): one more use now, in the scaled form of the module doc."""
        return _log_add(log_score, self._now(self.half_life))

    def step(self) -> None:
        """A new forward step began (decay clock); refresh the automatic hot set."""
        self.step_no += 1
        if self.hot_fraction > 0 and self.budget:
            self._refresh_hot()

    def score(self, key: Hashable) -> float:
        """The decayed activation count of `key` now."""
        h = self.history.get(key)
        if h is None or h.log_score == -math.inf:
            return 0.0
        return math.exp(h.log_score - self.step_no * math.log(2.0) / self.half_life)

    def _refresh_hot(self) -> None:
        limit = self.hot_fraction * (self.budget or 0)
        def score(k: Hashable) -> float:
            return self.history[k].log_score if k in self.history else -math.inf

        ranked = sorted((k for k, e in self.entries.items() if not e.pending), key=score, reverse=True)
        hot, total = set(), 0
        for k in ranked:
            if total + self.entries[k].nbytes > limit:
                break
            hot.add(k)
            total += self.entries[k].nbytes
        self.hot = hot

    # ------------------------------------------------------------------ contents
    def lookup(self, key: Hashable) -> object | None:
        e = self.entries.get(key)
        return None if e is None or e.pending else e.value

    def take_prefetched(self, key: Hashable) -> bool:
        """Whether `key` came in by prefetch and this is its first use (clears the mark)."""
        e = self.entries.get(key)
        if e is None or not e.prefetched:
            return False
        e.prefetched = False
        return True

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def _protected(self, key: Hashable) -> bool:
        return key in self.pins or key in self.hot

    def _evictable_bytes(self) -> int:
        # Counted from the reservations and the (few) protected keys, not from every entry: this runs on
        # each reservation once the cache is full, and a model may have thousands of bundles (Qwen3-30B-A3B:
        # 48 layers x 128 experts = 6,144; at 6,000 entries the walk over them took ~0.9 ms, this 2 us).
        protected = [self.entries.get(k) for k in self.pins.keys() | self.hot]
        locked = sum(e.nbytes for e in protected if e is not None and not e.pending)
        return self.used - self._pending_bytes - locked

    def _make_room(self, need: int) -> bool:
        """Evict by policy until `need` more bytes fit under the budget; False (evicting nothing) if not."""
        if self.budget is None:
            return True
        over = self.used + need - self.budget
        if over <= 0:
            return True
        if need > self.budget or self._evictable_bytes() < over:
            return False
        aside = []
        while self.used + need > self.budget and self._heap:
            item = heapq.heappop(self._heap)
            _, version, key = item
            e = self.entries.get(key)
            if e is None or e.pending or e.version != version:
                continue   # a stale heap item
            if self._protected(key):
                aside.append(item)
                continue
            self._drop(key)
        for item in aside:
            heapq.heappush(self._heap, item)
        return self.used + need <= self.budget

    def _drop(self, key: Hashable) -> None:
        e = self.entries.pop(key)
        self.used -= e.nbytes
        self.evictions += 1
        if e.prefetched:
            self.prefetch_wasted += 1
            if self.on_wasted is not None:
                self.on_wasted(key)
        self.hot.discard(key)
        if self.on_evict is not None:
            self.on_evict(key)

    def reserve(self, key: Hashable, nbytes: int) -> bool:
        """Hold room for a read in flight, so buffers being filled count against the budget."""
        if key in self.entries or not self._make_room(nbytes):
            return False
        self.entries[key] = _Entry(None, nbytes, pending=True)
        self.used += nbytes
        self._pending_bytes += nbytes
        return True

    def fill(self, key: Hashable, value: object, nbytes: int, prefetched: bool = False) -> bool:
        """The read for a reservation finished: make it visible (its size may differ after conversion)."""
        e = self.entries.get(key)
        if e is None or not e.pending:
            return self.insert(key, value, nbytes, prefetched)
        delta = nbytes - e.nbytes
        if delta > 0 and not self._make_room(delta):
            self.cancel(key)
            return False
        self.used += delta
        self._pending_bytes -= e.nbytes
        e.value, e.nbytes, e.pending, e.prefetched = value, nbytes, False, prefetched
        self._push(key, e)
        if self.budget is not None and self.used > self.budget:   # the budget shrank while it was read
            self._make_room(0)
        return key in self.entries

    def cancel(self, key: Hashable) -> None:
        """The read for a reservation failed: forget it (nothing half-read stays)."""
        e = self.entries.get(key)
        if e is not None and e.pending:
            del self.entries[key]
            self.used -= e.nbytes
            self._pending_bytes -= e.nbytes

    def insert(self, key: Hashable, value: object, nbytes: int, prefetched: bool = False) -> bool:
        if key in self.entries:
            return False
        if not self._make_room(nbytes):
            return False
        self.entries[key] = e = _Entry(value, nbytes, prefetched=prefetched)
        self.used += nbytes
        self._push(key, e)
        return True

    # ------------------------------------------------------------------ settings
    def set_budget(self, budget: int | None) -> None:
        """Change the budget; shrinking evicts at once (pins that no longer fit are dropped, newest first)."""
        self.budget = budget
        if budget is None:
            return
        while self.used > budget and self._evictable_bytes() < self.used - budget and (self.pins or self.hot):
            if self.hot:
                self.hot.clear()
            else:
                self.pins.pop(next(reversed(self.pins)))
        self._make_room(0)

    def set_policy(self, policy: str) -> None:
        self._check_policy(policy)
        if policy != self.policy:
            self.policy = policy
            self._rebuild()

    def pin(self, keys: Iterable[Hashable]) -> None:
        for k in keys:
            self.pins[k] = None

    def unpin_all(self) -> None:
        self.pins.clear()

    def stats(self) -> dict:
        resident = [k for k, e in self.entries.items() if not e.pending]
        return {
            "bytes_used": self.used,
            "bytes_budget": self.budget,
            "entries": len(resident),
            "pinned": sum(1 for k in resident if self._protected(k)),
            "evictions": self.evictions,
        }
