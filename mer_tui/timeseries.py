"""Telemetry over time: fixed-size ring buffers of the few numbers the plots draw.

A snapshot (DESIGN.md, "Telemetry snapshot") is a point in time; the plots need a window of them.
`TimeSeries.push(snapshot)` keeps the last `capacity` samples of each field, so memory stays
bounded however long the app runs, and `rows()` gives them back for the CSV/JSON export.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator

# 10 Hz polling x 600 samples = the last minute.
DEFAULT_CAPACITY = 600

# Decode speed in a snapshot is measured over the last generated tokens, so it keeps its last value
# when generation ends.  A plot of it would show a busy engine while idle; after this long without a
# new token (or 3 token intervals, when tokens are slower) the series reads 0.
IDLE_AFTER_S = 1.0

FIELDS = ("t", "tokens_per_s", "prefill_tokens_per_s", "tokens", "ram_hit_rate", "ram_bytes_used",
          "queue_depth", "queue_depth_avg", "read_mb_s", "prefetch_useful", "wait_ms_per_token")


def _get(d: dict, *keys, default=0.0):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return default
        d = d[k]
    return d


class TimeSeries:
    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self.clear()

    def clear(self) -> None:
        self.cols: dict[str, deque[float]] = {f: deque(maxlen=self.capacity) for f in FIELDS}
        self._t0: float | None = None
        self._last_tokens: int | None = None
        self._last_token_t = 0.0

    def __len__(self) -> int:
        return len(self.cols["t"])

    def push(self, snap: dict) -> None:
        """Append one snapshot; its "time" (epoch seconds) becomes seconds since the first sample."""
        now = float(snap.get("time") or 0.0)
        if self._t0 is None:
            self._t0 = now
        tokens = int(snap.get("tokens") or 0)
        if tokens != self._last_tokens:
            self._last_tokens, self._last_token_t = tokens, now
        tps = float(snap.get("tokens_per_s") or 0.0)
        idle_after = max(IDLE_AFTER_S, 3.0 / tps) if tps > 0 else IDLE_AFTER_S
        if now - self._last_token_t > idle_after:
            tps = 0.0
        row = {
            "t": now - self._t0,
            "tokens_per_s": tps,
            "prefill_tokens_per_s": float(snap.get("prefill_tokens_per_s") or 0.0),
            "tokens": tokens,
            "ram_hit_rate": float(_get(snap, "tiers", "ram", "hit_rate")),
            "ram_bytes_used": float(_get(snap, "tiers", "ram", "bytes_used")),
            "queue_depth": float(_get(snap, "io", "queue_depth")),
            # requests in flight on average over the reader's last 2 s (a recording from before the
            # field has only the depth at the instant)
            "queue_depth_avg": float(_get(snap, "io", "queue_depth_avg", default=_get(snap, "io", "queue_depth"))),
            "read_mb_s": float(_get(snap, "tiers", "ssd", "read_mb_s")),
            "prefetch_useful": float(_get(snap, "prefetch", "useful")),
            # what a decoded token lately waited for experts, all layers together (engine telemetry)
            "wait_ms_per_token": float(sum(_get(snap, "waits", "recent_ms_per_token", default=[]))),
        }
        for k, v in row.items():
            self.cols[k].append(v)

    def column(self, name: str) -> list[float]:
        return list(self.cols[name])

    def rows(self) -> Iterator[dict[str, float]]:
        for values in zip(*(self.cols[f] for f in FIELDS)):
            yield dict(zip(FIELDS, values))

    def to_dict(self) -> dict[str, list[float]]:
        return {f: list(c) for f, c in self.cols.items()}
