"""The top line: which model, which reader, what budget, and what the engine is doing.

No clock: a screen that changes every second for no reason distracts (and breaks snapshot tests).
On narrow terminals the labels go first, then the less important fields, never the state.
"""
from __future__ import annotations

from collections.abc import Mapping

from rich.style import StyleType
from rich.text import Text
from textual.widgets import Static

from engine import format_size

from ..session import ModelInfo

BADGES = {"demo-stress": "random weights", "demo-chat": "tiny demo"}
# Colours come from the stylesheet (component classes header--brand etc. in app.tcss); these are the
# fallbacks for rendering without an app.
DEFAULT_STYLES: dict[str, StyleType] = {
    "brand": "bold reverse", "model": "bold", "demo-stress": "black on yellow", "demo-chat": "black on cyan",
    "label": "dim", "generating": "bold green", "loading": "bold yellow", "failed": "bold red", "idle": ""}


def render_header(info: ModelInfo, snap: dict | None, state: str, width: int = 160,
                  tokens_per_s: float | None = None, styles: Mapping[str, StyleType] = DEFAULT_STYLES) -> Text:
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
    prompt = (snap or {}).get("prompt")
    # a long prompt takes seconds before its first token: how far it is
    shown = f"prompt {prompt['done']:.0%} of {prompt['tokens']} tokens" if state == "generating" and prompt else state

    def build(labels: bool, max_priority: int, brand: bool) -> Text:
        t = Text(no_wrap=True, overflow="ellipsis")
        if brand:
            t.append(" mer-tui ", style=styles["brand"])
        t.append(f" {info.name} ", style=styles["model"])
        if badge:
            t.append(f" {badge} ", style=styles[info.kind])
        for label, value, prio in fields:
            if prio <= max_priority:
                t.append(" │ ", style=styles["label"])
                if labels:
                    t.append(label, style=styles["label"])
                t.append(value)
        t.append(" │ ", style=styles["label"])
        t.append(shown, style=styles.get(state, ""))
        return t

    # The fullest line that fits.
    for labels, prio, brand in ((True, 3, True), (True, 2, False), (True, 1, False), (False, 1, False)):
        t = build(labels, prio, brand)
        if t.cell_len <= width:
            return t
    return t


class ModelHeader(Static):
    COMPONENT_CLASSES = {f"header--{k}" for k in DEFAULT_STYLES}
    _last: tuple | None = None

    def update_from(self, info: ModelInfo, snap: dict | None, state: str, tokens_per_s: float | None = None) -> None:
        styles = {k: self.get_component_rich_style(f"header--{k}") for k in DEFAULT_STYLES}
        text = render_header(info, snap, state, self.size.width or 160, tokens_per_s, styles)
        key = (text.plain, tuple(text.spans))
        if key != self._last:       # a repaint costs more than this comparison; most ticks change nothing
            self._last = key
            self.update(text, layout=False)     # one line, its size set by the layout, not by the text
