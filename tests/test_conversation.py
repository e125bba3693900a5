"""`launch --resume FILE`: a saved conversation read back (mer_tui.conversation)."""
from __future__ import annotations

import json

import pytest

from mer_tui.conversation import ConversationError, read_conversation
from mer_tui.export import export_bundle
from mer_tui.timeseries import TimeSeries

TALK = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "a story?"}, {"role": "assistant", "content": "Once upon a time."}]


def test_what_ctrl_s_exports_reads_back(tmp_path):
    system = {"role": "system", "content": "be kind"}
    paths = export_bundle(tmp_path, None, {}, TimeSeries(), conversation=[system, *TALK])
    conv = read_conversation(next(p for p in paths if p.suffix == ".json"))
    assert conv.system == "be kind" and conv.messages == TALK and conv.unanswered is None


def test_a_plain_list_of_messages_and_an_unanswered_last_one(tmp_path):
    f = tmp_path / "chat.json"
    f.write_text(json.dumps([*TALK, {"role": "user", "content": "and then?", "name": "ignored"}]))
    conv = read_conversation(f)
    assert conv.system is None and conv.messages == TALK and conv.unanswered == "and then?"
    f.write_text("[]")
    assert read_conversation(f).messages == []


@pytest.mark.parametrize("text,message", [
    (None, "no such file: {f}"),
    ("{oops", "{f} is not JSON (line 1, column 2: Expecting property name enclosed in double quotes)"),
    ('{"model": {}}', '{f}: expected a list of messages, or an export\'s "conversation"'),
    ('[{"role": "user"}]', '{f}: message 0 is not a {{"role": system|user|assistant, "content": text}} object'),
    ('[{"role": "robot", "content": "x"}]', '{f}: message 0 is not a'),
    ('[{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]',
     "{f}: message 1 is a system message; only the first may be"),
    ('[{"role": "assistant", "content": "a"}]',
     "{f}: message 0 is from the assistant, where the user speaks (a conversation alternates, the user first)"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]',
     "{f}: message 1 is from the user, where the assistant speaks"),
])
def test_a_bad_file_is_named_in_one_line(tmp_path, text, message):
    f = tmp_path / "chat.json"
    if text is not None:
        f.write_text(text)
    with pytest.raises(ConversationError) as e:
        read_conversation(f)
    assert str(e.value).startswith(message.format(f=f)) and "\n" not in str(e.value)
    (tmp_path / "latin1.json").write_bytes(b'["caf\xe9"]')
    with pytest.raises(ConversationError, match="is not UTF-8 text"):
        read_conversation(tmp_path / "latin1.json")
