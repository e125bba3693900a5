"""bench/attention.py: a decoded token's attention, C kernels on one and all threads against numpy."""
from __future__ import annotations

import json

import kernels
from bench.attention import main


def test_every_case_is_timed(capsys):
    if not kernels.backend().startswith("c-"):
        assert main(["--heads", "1"]) == 2
        return
    assert main(["--heads", "1,2", "--keys", "300", "--head-dim", "64", "--layers", "2", "--rounds", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n = out["threads"]
    assert [(r["kv_heads"], r["group"], r["keys"]) for r in out["rows"]] == [(1, 16, 300), (2, 8, 300)]
    for r in out["rows"]:
        assert all(r[k] > 0 for k in ("numpy_f32_ms", "f16_1t_ms", f"f16_{n}t_ms", "q8_0_1t_ms", f"q8_0_{n}t_ms"))


def test_bad_options_name_what_is_wrong(capsys):
    assert main(["--heads", "x"]) == 2
    assert capsys.readouterr().err.strip() == "attention: --heads and --keys take comma-separated numbers"
    assert main(["--head-dim", "72"]) == 2
    assert "a multiple of 32" in capsys.readouterr().err
