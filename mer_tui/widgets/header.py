"""The top line: which model, which reader, what budget, and what the engine is doing.

No clock: a screen that changes every second for no reason distracts (and breaks snapshot tests).
On narrow terminals the labels go first, then the less important fields, never the state.
"""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from engine import format_size

from ..session import ModelInfo

BADGES = {"demo-stress": ("random weights", "black on yellow"), "demo-chat": ("tiny demo", "black on cyan")}


def render_header(info: ModelInfo, snap: dict | None, state: str, width: int = 160,
                  tokens_per_s: float | None = None) -> Text:
    """`tokens_per_s`: the idle-aware rate from the time series (the snapshot's keeps its last value)."""
    fields: list[tuple[str, str, int]] = []     # (label, value, priority: lower is dropped last)
    if snap:
        ram = (snap.get("tiers") or {}).get("ram") or {}
        io = snap.get("io") or {}
        budget = ram.get("bytes_budget")
        tps = snap.get("tokens_per_s") if tokens_per_s is None else tokens_per_s
        fields = [
            ("reader ", str(io.get("backend", info.io)), 1),
            ("RAM ", f"{format_size(ram.get('bytes_used') or 0)}/{format_size(budget) if budget else 'no limit'}", 1),
            ("policy ", str(snap.get("policy", "?")), 2),
            ("prefetch ", "on" if (snap.get("prefetch") or {}).get("enabled") else "off", 2),
            ("quant ", info.quant, 3) if info.quant else None,
            ("", f"{tps or 0.0:.1f} tok/s", 3),
        ]
        fields = [f for f in fields if f]
    badge = BADGES.get(info.kind)
    state_style = {"generating": "bold green", "loading": "bold yellow", "failed": "bold red"}.get(state, "")

    def build(labels: bool, max_priority: int, brand: bool) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        if brand:
            t.append(" mer-tui ", style="bold reverse")
        t.append(f" {info.name} ", style="bold")
        if badge:
            t.append(f"{badge[0]} ", style=badge[1])
        for label, value, prio in fields:
            if prio <= max_priority:
                t.append(" │ ", style="dim")
                if labels:
                    t.append(label, style="dim")
                t.append(value)
        t.append(" │ ", style="dim")
        t.append(state, style=state_style)
        return t

    # The fullest line that fits.
    for labels, prio, brand in ((True, 3, True), (True, 2, False), (True, 1, False), (False, 1, False)):
        t = build(labels, prio, brand)
        if t.cell_len <= width:
            return t
    return t


class ModelHeader(Static):
    _last: tuple | None = None

    def update_from(self, info: ModelInfo, snap: dict | None, state: str, tokens_per_s: float | None = None) -> None:
        text = render_header(info, snap, state, self.size.width or 160, tokens_per_s)
        key = (text.plain, tuple(text.spans))
        if key != self._last:       # a repaint costs more than this comparison; most ticks change nothing
            self._last = key
            self.update(text)
