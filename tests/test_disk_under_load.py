"""bench/disk_under_load.py: the disk's speed with idle cores and under the kernels' load."""
from __future__ import annotations

import json
import time

import numpy as np

from bench.disk_under_load import kernel_load, main, summary


def test_the_load_runs_products_until_it_is_stopped():
    with kernel_load(8 << 20) as done:
        time.sleep(0.2)
        during = done[0]
    assert during > 0
    after = done[0]
    time.sleep(0.05)
    assert done[0] == after   # stopped with the block


def test_summary_takes_medians_per_readers_and_cores():
    rows = [{"readers": n, "cores": c, "gb_s": v} for n, c, v in
            [(1, "idle", 2.0), (1, "idle", 1.0), (1, "idle", 3.0), (1, "load", 1.0), (1, "load", 0.5),
             (1, "load", 2.0), (4, "idle", 2.0), (4, "load", 1.5)]]
    got = summary(rows)
    assert got[1] == {"idle": 2.0, "load": 1.0, "ratio": 0.5}
    assert got[4] == {"idle": 2.0, "load": 1.5, "ratio": 0.75}


def test_command_reads_the_file_both_ways(tmp_path, capsys):
    f = tmp_path / "blob.bin"
    f.write_bytes(np.random.default_rng(0).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes())
    assert main([str(f), "--readers", "1,2", "--seconds", "0.05", "--rounds", "1", "--block-mib", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted((r["readers"], r["cores"]) for r in out["runs"]) == [(1, "idle"), (1, "load"), (2, "idle"),
                                                                       (2, "load")]
    assert all(r["gb_s"] > 0 for r in out["runs"])
    assert all(r["load_products_per_s"] > 0 for r in out["runs"] if r["cores"] == "load")
    assert set(out["median"]) == {"1", "2"}


def test_bad_options_name_what_is_wrong(tmp_path, capsys):
    assert main([str(tmp_path / "missing.bin")]) == 2
    assert "not a file of at least" in capsys.readouterr().err
    assert main([str(tmp_path), "--readers", "one"]) == 2
    assert capsys.readouterr().err.strip() == "disk_under_load: --readers takes comma-separated whole numbers"
