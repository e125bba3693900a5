"""Tokens per second over the last minute: decode (left axis) and prefill (right axis)."""
from __future__ import annotations

from .seriesplot import SeriesPlot


class ThroughputPlot(SeriesPlot):
    LEFT = ("tokens_per_s", "decode", "#78dc50")
    RIGHT = ("prefill_tokens_per_s", "prefill", "#50c8e6")
    UNIT = "tok/s"
