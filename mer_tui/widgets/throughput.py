"""Tokens per second over the last minute: decode (left axis), and each prompt's prefill (right axis)
as a stroke at the time it ended."""
from __future__ import annotations

from .seriesplot import SeriesPlot


class ThroughputPlot(SeriesPlot):
    LEFT = ("tokens_per_s", "decode", "#78dc50")
    RIGHT = ("prefill_tokens_per_s", "prefill", "#50c8e6")
    UNIT = "tok/s"
    RIGHT_EVENTS = True
