"""The SSD side over the last minute: reader queue depth (left axis) and read MB/s (right axis)."""
from __future__ import annotations

from .seriesplot import SeriesPlot


class IOQueuePlot(SeriesPlot):
    LEFT = ("queue_depth", "NVMe queue", "#e65aa0")
    RIGHT = ("read_mb_s", "read MB/s", "#faaa3c")
