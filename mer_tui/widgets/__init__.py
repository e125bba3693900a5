"""The app's widgets, one per file; each renders from plain data (snapshots, a TimeSeries)."""
from .chat import ChatPane
from .header import ModelHeader
from .heatmap import ExpertHeatmap
from .ioqueue import IOQueuePlot
from .loading import LoadingScreen
from .throughput import ThroughputPlot
from .tiers import TierGauges

__all__ = ["ChatPane", "ExpertHeatmap", "IOQueuePlot", "LoadingScreen", "ModelHeader", "ThroughputPlot",
           "TierGauges"]
