"""bench/context_shift.py: the turn after a chat's oldest turns are left out, shifted and not."""
from __future__ import annotations

import json

from bench.context_shift import main


def test_the_turns_after_a_trim_keep_the_later_turns_only_when_shifted(model_dir, capsys):
    assert main(["--model", str(model_dir), "--context", "60", "--system-tokens", "3", "--message-tokens", "5",
                 "--reply-tokens", "4", "--trims", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    trims = [r for r in rows if r["trimmed"]]
    assert len(trims) == 2 and rows[-1] is trims[-1]
    for r in rows:
        assert r["prompt_tokens"] + 4 <= 60
        if r["trimmed"]:   # a prompt of half the context at most; the plain context keeps the system prompt
            assert r["prompt_tokens"] <= 30 and r["plain_kept"] == 3
            # shifted: all but the new message and the last reply's last token (chosen, never run)
            assert r["shift_kept"] == r["prompt_tokens"] - 5 - 1
        elif r["turn"] > 1:
            assert r["shift_kept"] == r["plain_kept"] == r["prompt_tokens"] - 5 - 1
    assert set(out["after_trim_median"]) == {"shift_first_s", "plain_first_s"}


def test_bad_options_name_what_is_wrong(capsys, tmp_path):
    assert main(["--model", "x", "--context", "40", "--message-tokens", "16"]) == 2
    assert capsys.readouterr().err.strip().startswith("context_shift: the system prompt and two turns must fit")
    assert main(["--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("context_shift: ") and "\n" not in err
