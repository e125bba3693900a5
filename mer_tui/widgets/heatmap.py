"""Expert-activation heatmap: layers (rows) x experts (columns), decayed counts, with a legend.

Counts come from snapshot["experts"]["counts"].  The map must stay readable from 8x8 to 48x128
on a panel of a few dozen cells, so it compresses, never wraps:
- columns: narrow models get wide cells; wide ones bin several experts into one column (the
  bin shows its hottest expert, so a hot expert never disappears into an average),
- rows: one layer per row while they fit, then two per row with half blocks (▀: top layer in
  the foreground colour, bottom layer in the background), then binned the same way.
Colour is sqrt-scaled against the current maximum, so the warm experts stand out as well as the
hottest one.
"""
from __future__ import annotations

import math

from rich.segment import Segment
from rich.text import Text
from textual.strip import Strip
from textual.widget import Widget

# A viridis-like ramp: dark and blue when cold, yellow when hot; readable on dark and light themes
# and by people with the common colour-vision deficiencies.
RAMP = [(38, 16, 62), (62, 38, 120), (56, 80, 156), (38, 118, 162), (30, 152, 150),
        (52, 182, 120), (120, 206, 80), (196, 222, 48), (253, 231, 37)]
LABEL_W = 4   # "L47 "


def colour(v: float) -> str:
    """RGB hex for a value in [0, 1] along RAMP."""
    v = min(1.0, max(0.0, v)) * (len(RAMP) - 1)
    i = min(int(v), len(RAMP) - 2)
    f = v - i
    r, g, b = (round(a + (c - a) * f) for a, c in zip(RAMP[i], RAMP[i + 1]))
    return f"#{r:02x}{g:02x}{b:02x}"


def _bins(n: int, slots: int) -> list[range]:
    """Split range(n) into min(n, slots) contiguous bins whose sizes differ by at most one, so the
    map uses all the room it has (48 layers in 38 rows: some rows hold 2 layers, most 1)."""
    k = max(1, min(n, slots))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def render_heatmap(counts: list[list[float]], width: int, height: int) -> Text:
    """The heatmap (axis row, map, legend) drawn into width x height cells."""
    layers = len(counts)
    experts = len(counts[0]) if layers else 0
    if layers == 0 or experts == 0:
        return Text("no expert activity yet" if width >= 22 else "", style="dim")
    if width < LABEL_W + 4 or height < 1:
        return Text("")
    # Under 3 rows (a short terminal) the map takes them all: no axis, no legend.
    chrome = height >= 3
    peak = max((max(row) for row in counts), default=0.0)
    scale = (1.0 / peak) if peak > 0 else 0.0

    cols_avail = width - LABEL_W
    col_bins = _bins(experts, cols_avail)
    cell_w = max(1, min(6, cols_avail // len(col_bins)))
    rows_avail = height - 2 if chrome else height      # axis row + legend
    per_row = 1 if layers <= rows_avail else 2
    row_bins = _bins(layers, rows_avail * per_row)
    # Small models get taller cells (up to 2 rows a layer), so an 8x8 map is not a speck.
    cell_h = max(1, min(2, rows_avail // layers)) if per_row == 1 else 1

    def level(rb: range, cb: range) -> float:
        return math.sqrt(max(counts[i][e] for i in rb for e in cb) * scale)

    out = Text(no_wrap=True, overflow="crop")
    # Axis: expert index every few columns, so a hot column can be named.
    axis = [" "] * (len(col_bins) * cell_w)
    step = max(1, math.ceil(6 / cell_w))
    for c in range(0, len(col_bins), step):
        label = str(col_bins[c].start)
        pos = c * cell_w
        if pos + len(label) <= len(axis) and all(ch == " " for ch in axis[max(0, pos - 1):pos + len(label)]):
            axis[pos:pos + len(label)] = label
    if chrome:
        out.append("exp " if LABEL_W == 4 else " " * LABEL_W, style="dim")
        out.append("".join(axis) + "\n", style="dim")

    for r in range(0, len(row_bins), per_row):
        top = row_bins[r]
        bottom = row_bins[r + 1] if per_row == 2 and r + 1 < len(row_bins) else None
        text_rows = -(-len(row_bins) // per_row)
        show = text_rows <= 12 or (r // per_row) % 2 == 0     # every row while few, else every other
        out.append(f"L{top.start:<{LABEL_W - 1}}" if show else " " * LABEL_W, style="dim")
        for line in range(cell_h):
            if line:
                out.append(" " * LABEL_W)
            for cb in col_bins:
                fg = colour(level(top, cb))
                if per_row == 1:
                    out.append(" " * cell_w, style=f"on {fg}")
                elif bottom is None:
                    out.append("▀" * cell_w, style=fg)
                else:
                    out.append("▀" * cell_w, style=f"{fg} on {colour(level(bottom, cb))}")
            out.append("\n")

    if not chrome:
        out.right_crop(1)   # the last map row's newline
        return out
    # Legend: the ramp from 0 to the current peak, and what one cell stands for.
    out.append(" " * LABEL_W)
    out.append("0 ", style="dim")
    for i in range(12):
        out.append(" ", style=f"on {colour(math.sqrt(i / 11))}")
    what = f" {peak:.3g}"
    per_col = max(len(b) for b in col_bins)
    per_cell = max(len(b) for b in row_bins)
    # What one cell stands for when the map is compressed, in the longest form that fits.
    room = width - LABEL_W - 14 - len(what)
    tails = [f"  {layers}×{experts}"]
    if per_col > 1 or per_cell > 1:
        tails.insert(0, f"  {layers}×{experts}, a cell is the max of ≤{per_col} experts × ≤{per_cell} layers")
        tails.insert(1, f"  {layers}×{experts}, cell = max of ≤{per_col}×≤{per_cell}")
    out.append(what)
    out.append(next((t for t in tails if len(t) <= room), ""), style="dim")
    return out


class ExpertHeatmap(Widget):
    """Draws the latest counts at whatever size the layout gives it.

    Line by line (render_line) from strips made once per change of counts or size: a map is a styled
    span per cell, and handing Textual the whole Text to convert span by span at every repaint took
    the interpreter from the decoding thread and the readers (redrawn at every tick, the stress demo
    decoded at 8.7 tok/s in the app this way, 13.3 line by line)."""

    DEFAULT_CSS = "ExpertHeatmap { height: 1fr; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._counts: list[list[float]] = []
        self._strips: list[Strip] | None = None
        self._strips_for: tuple = ()

    def update_from(self, snap: dict | None) -> None:
        counts = ((snap or {}).get("experts") or {}).get("counts") or []
        if counts != self._counts:
            self._counts = counts
            self._strips = None
            self.refresh()

    def render(self) -> Text:
        return render_heatmap(self._counts, self.content_size.width, self.content_size.height)

    def render_line(self, y: int) -> Strip:
        width, height = self.content_size.width, self.content_size.height
        base = self.rich_style
        if self._strips is None or self._strips_for != (width, height, base):
            lines = self.render().split("\n", allow_blank=True)
            console = self.app.console
            self._strips = [Strip(Segment.apply_style(line.render(console), base), line.cell_len)
                            .adjust_cell_length(width, base) for line in lines[:height]]
            self._strips_for = (width, height, base)
        return self._strips[y] if y < len(self._strips) else Strip.blank(width, base)
