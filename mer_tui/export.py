"""ctrl+s: the screen as SVG, the telemetry snapshot, the conversation and the recent time series as JSON
and CSV.

Every file is written to a temporary name in the target folder and renamed into place, so a
reader (or a crash half-way) never sees a partial file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import time
import uuid
from pathlib import Path

from .timeseries import FIELDS, TimeSeries


def write_atomic(path: Path, text: str) -> None:
    # A unique name opened with "x" (not mkstemp, whose files are 0600): the result gets the user's
    # usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def series_csv(series: TimeSeries) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
    w.writeheader()
    for row in series.rows():
        w.writerow({k: f"{v:.6g}" for k, v in row.items()})
    return buf.getvalue()


def export_bundle(folder: str | os.PathLike, svg: str | None, snapshot: dict | None, series: TimeSeries,
                  model: dict | None = None, stamp: str | None = None,
                  conversation: list[dict[str, str]] | None = None) -> list[Path]:
    """Write mer-tui-<stamp>.svg / .json / .csv into `folder` (created if needed); return the paths.  The JSON
    holds the conversation too (role/content messages, the system prompt first), so that what the
    figures were measured on can be replayed."""
    out = Path(folder).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base = out / f"mer-tui-{stamp}"
    paths: list[Path] = []
    if svg is not None:
        paths.append(base.with_suffix(".svg"))
        write_atomic(paths[-1], svg)
    doc = {"model": model or {}, "snapshot": snapshot, "conversation": conversation or [], "series": series.to_dict()}
    paths.append(base.with_suffix(".json"))
    write_atomic(paths[-1], json.dumps(doc, indent=1, default=str) + "\n")
    paths.append(base.with_suffix(".csv"))
    write_atomic(paths[-1], series_csv(series))
    return paths
