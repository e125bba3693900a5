"""The base of the time plots: two series of a TimeSeries over the last minute, left and right axes.

Plots redraw from the series only when asked (`update_from`), and thin the samples to what the
plot can show (braille gives two points per cell), which keeps a redraw to a few milliseconds.
The series' names go in the panel's title, in their colours, instead of a plotext legend: a legend
sits on top of the data and needs rows a short terminal does not have.
"""
from __future__ import annotations

from textual_plotext import PlotextPlot

from ..timeseries import TimeSeries

# The x axis shows the last minute once there is a minute of data; before that the shortest of
# these spans that holds it, so the ticks stay round numbers.
SPANS = (10.0, 15.0, 20.0, 30.0, 45.0, 60.0)


def thin(xs: list[float], ys: list[float], points: int) -> tuple[list[float], list[float]]:
    """Every k-th sample so at most `points` remain; the newest sample is always kept."""
    if len(xs) <= points or points < 2:
        return xs, ys
    k = -(-len(xs) // points)
    idx = list(range(len(xs) - 1, -1, -k))[::-1]
    return [xs[i] for i in idx], [ys[i] for i in idx]


def changes(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    """The samples whose value differs from the sample before, zeros left out: where a column that
    holds the latest event's figure until the next (a prefill's speed) got a new event."""
    idx = [i for i in range(1, len(ys)) if ys[i] != ys[i - 1] and ys[i]]
    return [xs[i] for i in idx], [ys[i] for i in idx]


def hex_rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


class SeriesPlot(PlotextPlot):
    # (column in the TimeSeries, name for the title, fallback colour as #rrggbb); subclasses set these.
    # The colours in use come from the stylesheet: component classes plot--left and plot--right.
    LEFT: tuple[str, str, str] = ("", "", "#ffffff")
    RIGHT: tuple[str, str, str] | None = None
    UNIT = ""
    # The right series as events: a stroke from 0 at each change of its column, not a line, for a
    # column that keeps the last event's figure (a line would show a prefill under way all the time).
    RIGHT_EVENTS = False
    COMPONENT_CLASSES = {"plot--left", "plot--right"}

    def _colour(self, side: str, fallback: str) -> str:
        c = self.get_component_rich_style(f"plot--{side}", partial=True).color
        if c is None or c.triplet is None:
            return fallback
        return c.triplet.hex

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._series: TimeSeries | None = None
        self._drawn_still: tuple | None = None

    def on_mount(self) -> None:
        super().on_mount()
        self._retitle()
        # The series' colours follow the theme (light themes have their own): title and lines redrawn.
        self.app.theme_changed_signal.subscribe(self, lambda _theme: self.call_after_refresh(self._recolour))

    def _recolour(self) -> None:
        self._retitle()
        self.replot()

    def _retitle(self) -> None:
        # Arrows point at each series' axis: "◂ decode  prefill ▸ tok/s".
        title = f"◂ [{self._colour('left', self.LEFT[2])}]{self.LEFT[1]}[/]"
        if self.RIGHT:
            title += f"  [{self._colour('right', self.RIGHT[2])}]{self.RIGHT[1]}[/] ▸"
        self.border_title = title + (f" {self.UNIT}" if self.UNIT else "")
        self.border_subtitle = "seconds ago"

    def update_from(self, series: TimeSeries) -> None:
        self._series = series
        self.replot()

    def on_resize(self) -> None:
        self.replot()

    def _still(self, s: TimeSeries, start: float, span: float) -> tuple | None:
        """The picture, when passing time leaves it as it is: every series the same value in every
        sample held, from a start that no longer moves (the ring is full).  None otherwise."""
        values = []
        for spec, side in ((self.LEFT, "left"), (self.RIGHT, "right")):
            if spec is not None:
                col = s.cols[spec[0]]
                if any(v != col[0] for v in col):
                    return None
                values.append((col[0], self._colour(side, spec[2])))   # a new theme redraws it
        return span, round(start, 1), tuple(self.size), tuple(values)

    def replot(self) -> None:
        plt = self.plt
        s = self._series
        if s is None or len(s) == 0:
            plt.clear_data()
            self.refresh()
            return
        t = s.column("t")
        now = t[-1]
        x = [v - now for v in t]
        span = next((sp for sp in SPANS if sp >= -x[0]), SPANS[-1])
        # An idle engine's minute of samples ends up all the same: drawn once, not again every
        # second (plotext's build was most of what the app cost the CPU while idle).
        still = self._still(s, x[0], span)
        if still is not None and still == self._drawn_still:
            return
        self._drawn_still = still
        plt.clear_data()
        for spec, side in ((self.LEFT, "left"), (self.RIGHT, "right")):
            if spec is None:
                continue
            col, _name, fallback = spec
            colour = self._colour(side, fallback)
            events = side == "right" and self.RIGHT_EVENTS
            xs, ys = changes(x, s.column(col)) if events else thin(x, s.column(col), 2 * max(10, self.size.width))
            if side == "right" and not any(ys):
                continue   # nothing on the right axis: leave the room to the left series
            if events:
                for ex, ey in zip(xs, ys):
                    plt.plot([ex, ex], [0.0, ey], color=hex_rgb(colour), marker="braille", yside=side)
            else:
                plt.plot(xs, ys, color=hex_rgb(colour), marker="braille", yside=side)
            top = max(ys)
            plt.ylim(0, top * 1.15 if top > 0 else 1.0, yside=side)
        plt.xlim(-span, 0)
        self.refresh()
