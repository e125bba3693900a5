"""The UI's bridge to the engine, without textual: threads, the token buffer, stop, settings, export."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

import engine
from mer_tui.export import export_bundle
from mer_tui.session import (
    Failure,
    ModelInfo,
    Notice,
    Session,
    Text,
    TurnDone,
    next_budget,
)
from mer_tui.timeseries import TimeSeries
from tests.tui_fixtures import ReplaySession, greedy_and_long, load_recording

FIXTURES = Path(__file__).parent / "fixtures"


def wait_turn(session: Session, timeout: float = 20.0) -> list:
    """Drain events until the reply ends."""
    events, end = [], time.monotonic() + timeout
    while time.monotonic() < end:
        events += session.drain()
        if any(isinstance(e, TurnDone) for e in events):
            return events
        time.sleep(0.01)
    raise AssertionError(f"no TurnDone within {timeout} s: {events}")


def wait_event(session: Session, kind, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for e in session.drain():
            if isinstance(e, kind):
                return e
        time.sleep(0.01)
    raise AssertionError(f"no {kind.__name__} within {timeout} s")


def test_reply_streams_text_that_matches_the_engine(model):
    s = Session(model=model)
    s.settings.temperature, s.settings.repetition_penalty = 0.0, None   # greedy: equal to a direct generate()
    s.settings.max_new_tokens = 24
    assert s.send("hello")
    events = wait_turn(s)
    text = "".join(e.text for e in events if isinstance(e, Text))
    ids = model.tokenizer.encode_chat([{"role": "user", "content": "hello"}])
    want = list(model.generate(ids, max_new_tokens=24))
    if model.tokenizer.eos_id in want:
        want = want[:want.index(model.tokenizer.eos_id)]
    assert text == model.tokenizer.decode(want)
    done = events[-1]
    assert isinstance(done, TurnDone) and not done.stopped and done.tokens == len(want)
    assert 0 < done.first_s <= done.seconds and done.decode_tokens_per_s > 0
    # The turn is in the conversation, so the next prompt is multi-turn.
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    assert s.messages[1]["content"] == text
    s.close()


def test_second_turn_sees_the_first(model):
    s = Session(model=model)
    s.settings.max_new_tokens = 4
    s.send("one")
    wait_turn(s)
    s.send("two")
    wait_turn(s)
    assert [m["content"] for m in s.messages if m["role"] == "user"] == ["one", "two"]
    prompt = model.tokenizer.decode(s._prompt_ids()[0], skip_special_tokens=False)
    assert "one" in prompt and "two" in prompt
    s.close()


def test_later_turns_compute_only_what_is_new(model):
    """Each turn resends the conversation; the keys and values of what earlier turns computed are kept
    (engine.Context), and the reply is the one the whole prompt computed afresh gives."""
    s = Session(model=model)
    s.settings.temperature, s.settings.repetition_penalty = 0.0, None
    s.settings.max_new_tokens = 6
    s.send("one")
    first = [e for e in wait_turn(s) if isinstance(e, TurnDone)][0]
    assert first.kept_tokens == 0 and first.prompt_tokens == len(model.tokenizer.encode_chat(s.messages[:1]))
    s.send("two")
    events = wait_turn(s)
    second = [e for e in events if isinstance(e, TurnDone)][0]
    ids = model.tokenizer.encode_chat(s.messages[:3])   # turn two's prompt: the conversation before its reply
    assert second.prompt_tokens == len(ids)
    # at least turn one's prompt is kept; the new message is computed
    assert first.prompt_tokens <= second.kept_tokens < second.prompt_tokens
    want = list(model.generate(ids, max_new_tokens=6))
    if model.tokenizer.eos_id in want:
        want = want[:want.index(model.tokenizer.eos_id)]
    assert "".join(e.text for e in events if isinstance(e, Text)) == model.tokenizer.decode(want)
    # a new chat forgets both the messages and their keys and values
    assert s.new_chat() and s.messages == []
    s.send("one")
    again = [e for e in wait_turn(s) if isinstance(e, TurnDone)][0]
    assert again.kept_tokens == 0 and again.prompt_tokens == first.prompt_tokens
    s.close()


@pytest.mark.parametrize("shift", [False, True])
def test_a_conversation_past_the_context_leaves_out_its_oldest_turns_and_says_so(model, shift):
    """Past the context, whole turns are left out until the rest fills half of it, with a notice; the turns
    after that keep the same beginning, and so what was computed for it, until the context fills again.
    With context shift the turns left in keep their keys and values too: only the new message is computed."""
    s = Session(model=model)
    s.settings.temperature, s.settings.repetition_penalty = 0.0, None
    s.settings.context_shift = shift
    s.settings.max_new_tokens = 4
    one = len(model.tokenizer.encode_chat([{"role": "user", "content": "message 0"}]))
    s.settings.context = 7 * one + 4 * 4 + 4   # room for a few short turns and a reply; two fit in half of it

    def turn(k):
        s.send(f"message {k}")
        events = wait_turn(s)
        return ([e.message for e in events if isinstance(e, Notice)],
                [e for e in events if isinstance(e, TurnDone)][0])

    budget = s.settings.context - s.settings.max_new_tokens
    notes, done = turn(0)
    k = 1
    while not notes:
        before = done
        notes, done = turn(k)
        k += 1
        assert k < 20, "the context never filled"
    assert len(notes) == 1 and f"past the {s.settings.context}-token context" in notes[0]
    assert done.prompt_tokens <= budget // 2 < before.prompt_tokens + 8   # half of it, whole turns left out
    if shift:   # the turns left in were moved up, not computed again (the last reply's tail may be: its text
        # encodes to other tokens than the ones generated where they were not whole characters)
        assert "moved up" in notes[0] and s._context.shifted > 0
        assert 2 * one < done.kept_tokens < done.prompt_tokens
    else:
        assert "computed again" in notes[0]
        assert done.kept_tokens < one              # what was kept began with a message no longer sent
    # the next turn begins as this one did: no notice, and this turn's prompt is kept
    notes2, after = turn(k)
    assert not notes2 and after.kept_tokens >= done.prompt_tokens
    assert s.telemetry()["kv"]["context"] == s.settings.context    # the KV gauge shows the chat's context
    # the model's trained context bounds what is asked for
    s.settings.context = 10 * model.spec.max_position_embeddings
    assert s._context_limit() == model.spec.max_position_embeddings
    # a new chat sends everything again
    assert s.new_chat() and s._first_kept == 0
    s.close()


def test_regenerate_answers_the_last_message_again_from_its_kept_prompt(model):
    s = Session(model=model)
    s.settings.temperature, s.settings.repetition_penalty = 0.0, None   # greedy: the same reply again
    s.settings.max_new_tokens = 6
    assert not s.regenerate()                 # nothing to answer again yet
    s.send("hello")
    first = wait_turn(s)
    reply = s.messages[-1]["content"]
    assert s.regenerate() and [m["role"] for m in s.messages] == ["user"]
    again = wait_turn(s)
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and s.messages[-1]["content"] == reply
    def text(events):
        return "".join(e.text for e in events if isinstance(e, Text))

    assert text(again) == text(first)
    done = [e for e in again if isinstance(e, TurnDone)][0]
    assert done.kept_tokens == done.prompt_tokens - 1   # all of the prompt but the token the logits come from
    greedy_and_long(s, 2000)
    s.regenerate()
    assert not s.regenerate() and not s.new_chat()      # busy
    s.stop()
    wait_turn(s)
    s.close()


def test_new_chat_waits_for_the_reply(model):
    s = Session(model=model)
    greedy_and_long(s, 2000)
    assert s.send("a long one")
    assert not s.new_chat() and s.messages
    s.stop()
    wait_turn(s)
    assert s.new_chat() and s.messages == []
    s.close()


def test_send_while_busy_is_refused(model):
    s = Session(model=model)
    greedy_and_long(s, 2000)
    assert s.send("a long one")
    assert not s.send("another")
    s.stop()
    done = [e for e in wait_turn(s) if isinstance(e, TurnDone)][0]
    assert done.stopped and done.tokens < 2000
    s.close()


def test_stop_ends_the_reply_between_tokens_and_releases_the_model(model):
    s = Session(model=model)
    greedy_and_long(s, 100_000)
    s.send("go on forever")
    while not model._telemetry.tokens:
        time.sleep(0.005)
    s.stop()
    events = wait_turn(s, timeout=5)
    assert events[-1].stopped
    assert not s.busy
    # The generator was closed: the model's run lock is free for the next call.
    assert model._run_lock.acquire(timeout=1)
    model._run_lock.release()
    s.close()


def test_engine_error_is_an_event_and_the_session_stays_usable(model):
    s = Session(model=model)
    s.settings.max_new_tokens = 4
    model.experts.fail = True
    s.send("this read fails")
    events = wait_turn(s)
    failures = [e for e in events if isinstance(e, Failure)]
    assert failures and "EIO" in failures[0].message
    assert s.messages == []            # the unanswered question is dropped; roles keep alternating
    model.experts.fail = False
    s.send("and this one works")
    events = wait_turn(s)
    assert not any(isinstance(e, Failure) for e in events)
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    s.close()


def test_settings_actions_reach_the_engine(model):
    s = Session(model=model, policy="lru")
    calls = model.experts.calls
    msg = s.budget_down()
    assert calls[-1][0] == "configure" and "ram_cache" in calls[-1][1]
    first = calls[-1][1]["ram_cache"]
    assert "ignores it" in msg       # the in-memory source does not apply budgets, and the message says so
    s.budget_up()
    assert calls[-1][1]["ram_cache"] > first
    assert s.cycle_policy().startswith("Eviction policy → lfu")
    assert calls[-1] == ("configure", {"policy": "lfu"})
    s.cycle_policy()
    assert calls[-1] == ("configure", {"policy": "lfu-decay"})
    s.cycle_policy()
    assert calls[-1] == ("configure", {"policy": "router"})
    s.cycle_policy()
    assert calls[-1] == ("configure", {"policy": "lru"})
    assert s.toggle_prefetch() == "Prefetch off" and model.prefetch_enabled is False
    assert calls[-1] == ("configure", {"prefetch": False})
    assert model.telemetry()["prefetch"]["enabled"] is False
    s.toggle_prefetch()
    assert model.prefetch_enabled is True
    assert "Nothing to pin" in s.pin_hottest()          # no expert has run yet
    s.settings.max_new_tokens = 4
    s.send("warm up")
    wait_turn(s)
    assert "Pinned" in s.pin_hottest()
    pinned = calls[-1][1]
    assert calls[-1][0] == "pin" and len(pinned) == s.pin_count()
    assert pinned == model.hottest_experts(s.pin_count())
    s.unpin_all()
    assert calls[-1] == ("unpin_all",)
    s.reset_counters()
    assert calls[-1] == ("reset_stats",) and model.telemetry()["tokens"] == 0
    s.close()


def test_request_runs_off_the_calling_thread_and_reports_back(model):
    s = Session(model=model)
    s.request("toggle_prefetch")
    assert wait_event(s, Notice).message == "Prefetch off"
    s.close()


def test_loader_thread_reports_progress_and_failure(model_dir):
    stages = []

    def load(progress):
        m = engine.load(model_dir, progress=lambda *a: (stages.append(a), progress(*a)))
        return m

    s = Session(load, info=ModelInfo(name="tiny"))
    assert s.status == "new" and s.telemetry() is None
    s.start()
    end = time.monotonic() + 10
    while s.status == "loading" and time.monotonic() < end:
        time.sleep(0.01)
    assert s.status == "ready" and s.telemetry()["tokens"] == 0
    assert stages and s.progress == stages[-1]
    s.close()

    bad = Session(lambda progress: engine.load(model_dir / "missing"), info=ModelInfo(name="missing"))
    bad.start()
    while bad.status == "loading":
        time.sleep(0.01)
    assert bad.status == "failed" and "no such model folder" in bad.load_error
    bad.close()


def test_close_joins_a_running_generation(model):
    s = Session(model=model)
    greedy_and_long(s, 100_000)
    s.send("run")
    t0 = time.monotonic()
    s.close()
    assert time.monotonic() - t0 < 2.5 and not s.busy


def test_next_budget_steps_and_rounds():
    mib = 1 << 20
    assert next_budget(100 * mib, up=True) == 128 * mib
    assert next_budget(100 * mib, up=False) == 80 * mib
    small = 144 << 10
    assert small < next_budget(small, up=True) < 2 * small
    assert next_budget(64 << 10, up=False) == 64 << 10        # never below the floor
    b = 4 << 30
    for _ in range(20):
        nb = next_budget(b, up=True)
        assert nb > b
        b = nb


def test_timeseries_ring_and_idle_decay():
    ts = TimeSeries(capacity=5)
    for i in range(8):
        ts.push({"time": 100 + i * 0.1, "tokens": i, "tokens_per_s": 10.0})
    assert len(ts) == 5 and ts.column("t")[-1] == pytest.approx(0.7)
    # No new token for longer than the idle limit: the plotted rate drops to 0.
    ts.push({"time": 103.0, "tokens": 7, "tokens_per_s": 10.0})
    assert ts.column("tokens_per_s")[-1] == 0.0
    assert ts.column("wait_ms_per_token")[-1] == 0.0           # a recording from before the field
    ts.push({"time": 103.1, "tokens": 8, "waits": {"recent_ms_per_token": [1.5, 0.0, 2.25], "steps": 3}})
    assert ts.column("wait_ms_per_token")[-1] == 3.75           # all layers together
    ts.clear()
    assert len(ts) == 0


def test_export_bundle_writes_three_files(tmp_path):
    snaps = load_recording(FIXTURES / "telemetry_chat.json")
    ts = TimeSeries()
    for s in snaps:
        ts.push(s)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    paths = export_bundle(tmp_path / "out", "<svg/>", snaps[-1], ts, model={"name": "x"}, stamp="T", conversation=chat)
    assert [p.name for p in paths] == ["mer-tui-T.svg", "mer-tui-T.json", "mer-tui-T.csv"]
    doc = json.loads(paths[1].read_text())
    assert doc["conversation"] == chat
    assert doc["snapshot"]["tokens"] == snaps[-1]["tokens"] and len(doc["series"]["t"]) == len(snaps)
    rows = list(csv.DictReader(paths[2].open()))
    assert len(rows) == len(snaps) and float(rows[-1]["tokens"]) == snaps[-1]["tokens"]
    assert not list((tmp_path / "out").glob("*.tmp"))       # temp files were renamed, none left behind


def test_replay_session_serves_recorded_snapshots():
    snaps = load_recording(FIXTURES / "telemetry_stream.json")
    r = ReplaySession(snaps, ModelInfo(name="replay"))
    assert r.telemetry() is r.history()[-1]
    before = r.telemetry()["prefetch"]["enabled"]
    r.request("toggle_prefetch")
    assert r.telemetry()["prefetch"]["enabled"] is (not before)
