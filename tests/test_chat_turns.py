"""bench/chat_turns.py: a chat's turns with the conversation's keys and values kept, and afresh."""
from __future__ import annotations

import json

from bench.chat_turns import main


def test_each_turn_keeps_what_the_turn_before_computed(model_dir, capsys):
    assert main(["--model", str(model_dir), "--turns", "3", "--message-tokens", "5", "--reply-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert [r["prompt_tokens"] for r in rows] == [5, 14, 23]
    # all of the turn before but its reply's last token, which was chosen and never run
    assert [r["kept_tokens"] for r in rows] == [0, 8, 17]
    assert all(r["fresh_first_s"] > 0 and r["kept_first_s"] > 0 for r in rows) and out["median_first_token_ratio"] > 0


def test_bad_options_name_what_is_wrong(capsys, tmp_path):
    assert main(["--turns", "0"]) == 2
    assert capsys.readouterr().err.strip() == \
        "chat_turns: --turns, --message-tokens and --reply-tokens must be at least 1"
    assert main(["--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chat_turns: ") and "\n" not in err
