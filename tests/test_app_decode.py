"""bench/app_decode.py: decode speed inside the app against the session alone."""
from __future__ import annotations

import json

from bench.app_decode import main


def test_both_sides_decode_the_chat_demo(capsys):
    assert main(["--turns", "1", "--rounds", "1", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["launch"] == "--ram-cache 2MiB"
    assert len(out["runs"]["app"]) == len(out["runs"]["session"]) == 1
    assert out["median"]["app"] > 0 and out["median"]["session"] > 0


def test_bad_options_name_what_is_wrong(capsys):
    assert main(["--turns", "0"]) == 2
    assert capsys.readouterr().err.strip() == "app_decode: --turns, --rounds and --max-new-tokens must be >= 1"
