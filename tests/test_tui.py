"""Pilot tests of the app with a real (tiny, random) engine model: keys reach the engine, prompts
stream, errors leave the app usable, export writes files, quitting joins the threads."""
from __future__ import annotations

import asyncio
import functools
import json
import re
import threading
import time
from collections.abc import Callable

from textual.app import App
from textual.widget import Widget
from textual.widgets import Markdown

import engine
from mer_tui.app import BUSY_CADENCE, TUNING, MerApp
from mer_tui.session import ModelInfo, Session
from mer_tui.widgets import ChatPane, LoadingScreen, ModelHeader, ThroughputPlot
from mer_tui.widgets.chat import printable
from tests.tui_fixtures import greedy_and_long

SIZE = (160, 50)


def aio(fn):
    """Run an async test (no pytest-asyncio here); functools.wraps keeps the fixtures visible to pytest."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        asyncio.run(fn(*args, **kwargs))
    return run


def make_app(model, tmp_path=None, **session_kw) -> MerApp:
    session = Session(model=model, info=ModelInfo(name="tiny", path=str(model.path)), **session_kw)
    return MerApp(session, export_dir=tmp_path or ".")


async def until(pilot, cond, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


def hosting(widget: Callable[[], Widget]) -> App:
    """An app of one widget, to drive that widget alone."""
    class Host(App):
        def compose(self):
            yield widget()
    return Host()


def notes(app) -> list[str]:
    return [str(n.message) for n in app._notifications]


async def send(pilot, text: str) -> None:
    app = pilot.app
    chat = app.main.query_one(ChatPane)
    chat.input.focus()
    chat.input.value = text
    # Let the focus land before the key: an Enter that reaches another widget sends nothing.
    await until(pilot, lambda: chat.input.has_focus, timeout=5, what="input focus")
    await pilot.press("enter")
    # the app clears the input once the session took the message
    await until(pilot, lambda: chat.input.value == "", timeout=5, what="message sent")


@aio
async def test_prompt_streams_tokens_into_the_chat(model):
    app = make_app(model)
    model.experts.delay = 0.025                # ~50 ms a token: many ticks see a partial reply
    app.session.settings.max_new_tokens = 40
    seen: list[str] = []
    async with app.run_test(size=SIZE) as pilot:
        chat = app.main.query_one(ChatPane)
        await send(pilot, "hello there")
        assert chat.input.value == ""
        end = time.monotonic() + 20
        while len(app.session.messages) < 2 and time.monotonic() < end:
            seen.append(chat.reply_text)
            await pilot.pause(0.03)
        # the app ends the reply a tick or more after the session (later on a busy machine); then the
        # Markdown settles
        await until(pilot, lambda: app.chat._reply is None, timeout=10, what="the reply's end")
        await pilot.pause(0.3)
        reply = app.session.messages[-1]["content"]
        assert reply and model.telemetry()["tokens"] > 0
        # Streamed: the chat showed growing partial replies before the whole one.
        partial = [s for s in dict.fromkeys(seen) if s and s != chat.reply_text]
        assert len(partial) >= 2, (seen, reply, model.telemetry()["tokens"])
        mds = [w for w in chat.query(Markdown) if "assistant" in w.classes]
        # the reply as the chat shows it: what printable() cannot show (controls, unassigned code points
        # a random model emits now and then) is U+FFFD there
        assert mds and mds[-1].source == printable(reply)
        assert "tokens in" in str(chat.query(".meta").last().render())


@aio
async def test_costly_panels_are_drawn_less_often_while_generating(model):
    # The panels take the interpreter from the decoding thread and its readers while they draw: while a
    # reply streams the header is drawn at every tick, the gauges every other one, the plots and the
    # heatmap every tenth, and never two of those three on the same tick.
    app = make_app(model)
    model.experts.delay = 0.025                # ~50 ms a token: a reply of 40 takes a couple of seconds
    greedy_and_long(app.session, 40)           # sampling may end the reply after a few tokens
    names = ("header", "tiers", "heatmap", "throughput", "ioqueue")
    drawn = {name: [] for name in names}
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.panels, what="the panels")

        def counted(name, fn):
            def call(*a, **k):
                if app.session.busy:
                    drawn[name].append(app._ticks)
                return fn(*a, **k)
            return call
        for name, panel in zip(names, app.panels):
            panel.update_from = counted(name, panel.update_from)
        await send(pilot, "hello there")
        await until(pilot, lambda: len(app.session.messages) >= 2, timeout=20, what="the reply")
    ticks = len(drawn["header"])
    assert ticks >= 10, drawn
    for name in names[1:]:
        every = BUSY_CADENCE[name][0]
        assert 1 <= len(drawn[name]) <= ticks // every + 1, (name, drawn)
    costly = [t for name in ("heatmap", "throughput", "ioqueue") for t in drawn[name]]
    assert len(costly) == len(set(costly)), drawn


@aio
async def test_keys_change_the_engines_settings(model, tmp_path):
    app = make_app(model, tmp_path, policy="lru")
    calls = model.experts.calls
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app._loaded, what="ready")
        keys = {action: key for action, key, *_ in TUNING}

        def budgets() -> list[int]:
            return [c[1]["ram_cache"] for c in calls if c[0] == "configure" and "ram_cache" in c[1]]

        await pilot.press(keys["budget_down"])
        await until(pilot, lambda: budgets(), what="budget")
        await pilot.press(keys["budget_up"])
        await until(pilot, lambda: len(budgets()) == 2 and budgets()[1] > budgets()[0], what="budget up")

        await pilot.press(keys["cycle_policy"])
        await until(pilot, lambda: ("configure", {"policy": "lfu"}) in calls, what="policy")

        await pilot.press(keys["toggle_prefetch"])
        await until(pilot, lambda: model.prefetch_enabled is False, what="prefetch off")
        # The screen shows what the engine reports, not what was asked.
        await until(pilot, lambda: "prefetch off" in app.main.query_one(ModelHeader).render().plain,
                    what="header shows prefetch off")

        await send(pilot, "warm the experts up")
        await until(pilot, lambda: len(app.session.messages) == 2, what="reply")
        await pilot.press(keys["pin_hottest"])
        await until(pilot, lambda: any(c[0] == "pin" for c in calls), what="pin")
        assert [c for c in calls if c[0] == "pin"][-1][1] == model.hottest_experts(app.session.pin_count())
        await pilot.press(keys["unpin_all"])
        await until(pilot, lambda: ("unpin_all",) in calls, what="unpin")
        await pilot.press(keys["reset_counters"])
        await until(pilot, lambda: ("reset_stats",) in calls and model.telemetry()["tokens"] == 0, what="reset")
        await until(pilot, lambda: any("Counters reset" in n for n in notes(app)), what="toast")
        # Budget requests the in-memory source ignores are labelled as such.
        assert any("ignores it" in n for n in notes(app))
        assert app.session.requested_budget == budgets()[-1]


@aio
async def test_command_palette_runs_the_tuning_actions(model):
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app._loaded, what="ready")
        names = [c.title for c in app.get_system_commands(app.screen)]
        for *_, name, _help in TUNING:
            assert name in names
        assert "Export telemetry" in names and "Stop reply" in names
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"prefetch")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: model.prefetch_enabled is False, what="prefetch off from the palette")
        # context shift: the setting, and the chat's context once it has one
        assert "Toggle context shift" in names and app.session.settings.context_shift is False
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"context shift")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.session.settings.context_shift, what="context shift on from the palette")
        await until(pilot, lambda: any("Context shift on" in n for n in notes(app)), what="its notice")
        app.session.settings.max_new_tokens = 2
        await send(pilot, "hi")
        await until(pilot, lambda: len(app.session.messages) == 2, what="a reply")
        assert app.session._context.shift is True
        app.session.request("toggle_context_shift")
        await until(pilot, lambda: not app.session._context.shift, what="context shift off")
        assert app.session.settings.context_shift is False


@aio
async def test_escape_stops_generation_without_quitting(model):
    app = make_app(model)
    model.experts.delay = 0.02
    greedy_and_long(app.session, 10_000)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "talk for a long time")
        await until(pilot, lambda: model.telemetry()["tokens"] > 3, what="tokens")
        await pilot.press("escape")
        await until(pilot, lambda: not app.session.busy, timeout=3, what="stop")
        await pilot.pause(0.3)
        assert app.is_running
        assert "stopped" in str(app.main.query_one(ChatPane).query(".meta").last().render())
        assert model.telemetry()["tokens"] < 10_000
        # ... and the chat carries on.
        model.experts.delay = 0.0
        app.session.settings.max_new_tokens = 4
        await send(pilot, "again")
        await until(pilot, lambda: len(app.session.messages) == 4, what="second reply")


@aio
async def test_ctrl_r_retries_ctrl_n_starts_a_new_chat_and_turns_say_what_they_kept(model):
    app = make_app(model)
    app.session.settings.max_new_tokens = 4
    async with app.run_test(size=SIZE) as pilot:
        chat = app.main.query_one(ChatPane)
        for n, text in enumerate(["one", "two"], start=1):
            await send(pilot, text)
            await until(pilot, lambda n=n: len(app.session.messages) == 2 * n and app.chat._reply is None,
                        what=f"reply {n}")
        # the second turn's line says how much of its prompt the first had computed
        meta = [str(m.render()) for m in chat.query(".meta")]
        assert re.search(r"prompt \d+ tokens$", meta[0]) and re.search(r"prompt \d+ tokens, \d+ kept$", meta[1])
        # ctrl+r answers the last message again: its reply and the line under it are replaced
        await pilot.press("ctrl+r")
        await until(pilot, lambda: len(app.session.messages) == 4 and app.chat._reply is None and not app.session.busy,
                    what="the reply again")
        await pilot.pause(0.2)
        assert len(chat.query(".assistant")) == 2 and len(chat.query(".meta")) == 2
        assert re.search(r"prompt (\d+) tokens, (\d+) kept$", str(chat.query(".meta").last().render()))
        await pilot.press("ctrl+n")
        await pilot.pause(0.2)
        assert app.session.messages == [] and not chat.query(".msg")
        await send(pilot, "three")
        await until(pilot, lambda: len(app.session.messages) == 2 and app.chat._reply is None, what="reply 3")
        assert not str(chat.query(".meta").last().render()).endswith("kept")


@aio
async def test_engine_error_is_shown_and_the_app_stays_usable(model):
    app = make_app(model)
    app.session.settings.max_new_tokens = 4
    async with app.run_test(size=SIZE) as pilot:
        model.experts.fail = True
        await send(pilot, "this read fails")
        await until(pilot, lambda: any("EIO" in n for n in notes(app)), what="error toast")
        assert [n.severity for n in app._notifications if "EIO" in str(n.message)] == ["error"]
        chat = app.main.query_one(ChatPane)
        assert chat.query(".error")
        assert app.session.messages == []
        model.experts.fail = False
        await send(pilot, "now it works")
        await until(pilot, lambda: len(app.session.messages) == 2, what="reply after the error")
        assert app.is_running


@aio
async def test_ctrl_s_exports_svg_json_csv(model, tmp_path):
    app = make_app(model, tmp_path / "exports", system_prompt="be brief")
    app.session.settings.max_new_tokens = 3
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "hi")
        await until(pilot, lambda: len(app.session.messages) == 2 and len(app.series) > 2, what="a reply")
        await pilot.press("ctrl+s")
        await pilot.pause(0.1)
        files = sorted(p.suffix for p in (tmp_path / "exports").iterdir())
        assert files == [".csv", ".json", ".svg"]
        doc = json.loads(next((tmp_path / "exports").glob("*.json")).read_text())
        assert doc["conversation"] == [{"role": "system", "content": "be brief"}, *app.session.messages]
        assert doc["snapshot"]["kv"]["tokens"] > 0   # the chat's kept keys and values
        svg = next((tmp_path / "exports").glob("*.svg")).read_text()
        assert svg.startswith("<svg") and "Expert" in svg
        assert any(".svg" in n and ".csv" in n for n in notes(app))


@aio
async def test_a_resumed_conversation_is_shown_and_goes_on(model):
    # launch --resume: the saved turns in the chat, an unanswered last message in the input box; sending it
    # answers it with the saved turns in the prompt
    app = make_app(model)
    app.session.settings.max_new_tokens = 3
    app.session.messages = [{"role": "user", "content": "first question"},
                            {"role": "assistant", "content": "an answer"}]
    app.session.draft = "and then?"
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app._loaded, what="the chat")
        chat = app.main.query_one(ChatPane)
        assert chat.input.value == "and then?"
        # the saved turns and the note are mounted after the chat is ready: wait for them
        await until(pilot, lambda: [str(w.render()) for w in chat.query(".msg.user")] == ["first question"],
                    what="the saved user message")
        await until(pilot, lambda: any("no reply" in str(w.source) for w in chat.query(".msg.note")
                                       if isinstance(w, Markdown)), what="the note on the unanswered message")
        chat.input.focus()
        await until(pilot, lambda: chat.input.has_focus, timeout=5, what="input focus")
        await pilot.press("enter")
        await until(pilot, lambda: len(app.session.messages) == 4, what="the reply")
        assert [m["content"] for m in app.session.messages[:3]] == ["first question", "an answer", "and then?"]
        prompt = model.tokenizer.decode(app.session._prompt_ids()[0], skip_special_tokens=False)
        assert "first question" in prompt and "an answer" in prompt


@aio
async def test_loading_screen_shows_progress_then_the_chat(model_dir):
    gate = threading.Event()

    def load(progress):
        progress("experts", 3, 8)
        gate.wait(10)
        return engine.load(model_dir, progress=progress)

    info = ModelInfo(name="tiny", path=str(model_dir), kind="demo-chat", note="**Tiny demo model.** trained here")
    app = MerApp(Session(load, info=info))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: isinstance(app.screen, LoadingScreen), what="loading screen")
        await until(pilot, lambda: "3/8" in str(app.screen.query_one("#loading-stage").render()), what="progress")
        gate.set()
        await until(pilot, lambda: app._loaded and not isinstance(app.screen, LoadingScreen), what="main screen")
        await pilot.pause(0.2)
        chat = app.main.query_one(ChatPane)
        assert "Tiny demo model" in chat.query(".demo").first().source
        app.session.settings.max_new_tokens = 3
        await send(pilot, "hi")
        await until(pilot, lambda: len(app.session.messages) == 2, what="reply")
        app.session.close()


@aio
async def test_a_model_that_fails_to_load_is_reported_and_quit_works(tmp_path):
    app = MerApp(Session(lambda progress: engine.load(tmp_path / "nope"), info=ModelInfo(name="nope")))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.session.status == "failed", what="failure")
        await until(pilot, lambda: any("no such model folder" in n for n in notes(app)), what="toast")
        assert "no such model folder" in str(app.screen.query_one("#loading-stage").render())
        await pilot.press("f5")                 # keys do not crash while there is no model
        await pilot.press("ctrl+q")
        await pilot.pause(0.1)
    assert not app.is_running


@aio
async def test_ctrl_q_quits_promptly_while_generating(model):
    app = make_app(model)
    model.experts.delay = 0.02
    greedy_and_long(app.session, 100_000)
    async with app.run_test(size=SIZE) as pilot:
        await send(pilot, "never stop")
        await until(pilot, lambda: model.telemetry()["tokens"] > 2, what="tokens")
        t0 = time.monotonic()
        await pilot.press("ctrl+q")
        await asyncio.sleep(0)
    assert time.monotonic() - t0 < 3
    assert not app.session.busy
    assert not any(t.name == "mer-generate" and t.is_alive() for t in threading.enumerate())


@aio
async def test_text_sent_as_a_reply_begins_is_shown():
    # The app begins a reply and may feed it within the same tick, before its widget is mounted; a
    # Markdown's mount replaces its source with the initial text, which lost that first text.
    app = hosting(ChatPane)
    async with app.run_test(size=(80, 24)) as pilot:
        chat = app.query_one(ChatPane)
        chat.begin_reply()
        chat.append_reply("Once upon a time")
        chat.append_reply(" there")
        await pilot.pause(0.1)
        chat.append_reply(" was a cat.")
        await pilot.pause(0.1)
        assert chat._reply.source == "Once upon a time there was a cat."
        chat.end_reply()
        chat.begin_reply()          # a reply that ends with no text, in the same tick
        empty = chat._reply
        chat.end_reply()
        await pilot.pause(0.1)
        assert empty.source == "*(no text)*"


@aio
async def test_an_idle_plot_is_not_drawn_again_each_second():
    # Once the minute of samples is all the same (an idle engine), the picture no longer changes as
    # time passes: plotext does not build it again until a value, the size or the theme changes.
    from mer_tui.timeseries import TimeSeries

    series = TimeSeries()
    now, tokens = 1000.0, 0

    def advance(seconds: float, tps: float = 0.0) -> None:
        nonlocal now, tokens
        for _ in range(round(seconds * 10)):
            now += 0.1
            tokens += round(tps / 10)
            series.push({"time": now, "tokens": tokens, "tokens_per_s": tps, "prefill_tokens_per_s": 500.0})

    app = hosting(ThroughputPlot)
    async with app.run_test(size=(100, 20)) as pilot:
        plot = app.query_one(ThroughputPlot)
        builds = []
        build = plot.plt.build
        plot.plt.build = lambda: builds.append(1) or build()
        advance(60.0)
        plot.update_from(series)
        await pilot.pause(0.1)
        drawn = len(builds)
        assert drawn >= 1
        for _ in range(3):                      # idle seconds go by
            advance(1.0)
            plot.update_from(series)
            await pilot.pause(0.05)
        assert len(builds) == drawn
        advance(1.0, tps=20.0)                  # a token: drawn again
        plot.update_from(series)
        await pilot.pause(0.1)
        assert len(builds) > drawn


@aio
async def test_a_costly_reply_is_drawn_less_often_and_whole(model, monkeypatch):
    # A reply whose drawing costs the main thread 250 ms a time (as a long code block does) is drawn
    # less often, so that drawing it takes about a quarter of the time it streams, and ends with all
    # its text.
    from mer_tui.widgets import chat as chat_module

    appends: list[float] = []
    append = chat_module._StreamedMarkdown.append

    def costly(self, markdown):
        t = time.thread_time()
        while time.thread_time() - t < 0.25:
            pass
        appends.append(time.monotonic())
        return append(self, markdown)
    monkeypatch.setattr(chat_module._StreamedMarkdown, "append", costly)
    app = make_app(model)
    model.experts.delay = 0.02
    greedy_and_long(app.session, 80)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.panels, what="the panels")
        await send(pilot, "hello there")
        began = time.monotonic()
        await until(pilot, lambda: len(app.session.messages) >= 2, timeout=30, what="the reply")
        streamed = time.monotonic() - began
        await until(pilot, lambda: app.chat._reply is None, timeout=10, what="the reply's end")
        await pilot.pause(0.3)
        shown = app.main.query(Markdown)[-1].source
    # From the first draw to the last (at the reply's end, which the app reaches after the session
    # does when drawing lags): the draws before the last took about SHARE of that time, the first
    # ones (before any cost was measured) included.
    assert len(appends) >= 3, (streamed, appends)
    ratio = (len(appends) - 1) * 0.25 / (appends[-1] - appends[0])
    assert ratio <= 0.45, (appends, streamed)     # 0.25-0.27 here; 0.61-0.63 drawing at every tick
    assert shown == printable(app.session.messages[-1]["content"])


@aio
async def test_plot_colours_follow_the_theme(model):
    """On a light theme the plots' series (lines and title) take the stylesheet's darker colours, at
    once when the theme changes (the dark themes' ones have a contrast of 1.1-2.5:1 on a light panel)."""
    app = make_app(model)
    async with app.run_test(size=SIZE) as pilot:
        plot = app.main.query_one(ThroughputPlot)
        assert plot._colour("left", "") == "#78dc50" and "#78dc50" in str(plot.border_title)
        app.theme = "textual-light"
        await until(pilot, lambda: "#2a7a14" in str(plot.border_title), timeout=5, what="title recoloured")
        assert plot._colour("left", "") == "#2a7a14" and plot._colour("right", "") == "#106f94"
        app.theme = "textual-dark"
        await until(pilot, lambda: "#78dc50" in str(plot.border_title), timeout=5, what="title back")
