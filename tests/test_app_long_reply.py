"""bench/app_long_reply.py: the main thread while a long code reply streams, paced and every tick."""
from __future__ import annotations

import json

from bench.app_long_reply import main


def test_both_sides_show_the_whole_reply(capsys):
    assert main(["--lines", "40", "--chunks-per-s", "100", "--rounds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["whole"] is True
    assert len(out["runs"]["paced"]) == len(out["runs"]["every tick"]) == 1
    assert all(0 < share < 2 for share in out["median_main_thread_share"].values())


def test_bad_options_name_what_is_wrong(capsys):
    assert main(["--lines", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("app_long_reply: --lines must be >= 2, --rounds >= 1 and "
                                               "--chunks-per-s > 0")
