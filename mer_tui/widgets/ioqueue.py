"""The SSD side over the last minute: the reader's requests in flight (left axis; the mean over the
last 2 s, as iostat's aqu-sz) and read MB/s (right axis)."""
from __future__ import annotations

from .seriesplot import SeriesPlot


class IOQueuePlot(SeriesPlot):
    LEFT = ("queue_depth_avg", "NVMe queue", "#e65aa0")
    RIGHT = ("read_mb_s", "read MB/s", "#faaa3c")
