"""Whole-screen snapshots (pytest-textual-snapshot) from recorded telemetry, so every run draws the
same screen: a ReplaySession serves tests/fixtures/telemetry_*.json instead of a live model, the
plots' time axis is relative to the last recorded sample, and nothing on screen shows a clock.

Regenerate after an intended change of the screen:  pytest tests/test_tui_snapshots.py --snapshot-update
"""
from __future__ import annotations

from pathlib import Path

import pytest
from textual.widgets import Input

from mer_tui.app import MerApp
from mer_tui.launch import CHAT_NOTE, STRESS_NOTE
from mer_tui.session import ModelInfo
from tests.tui_fixtures import ReplaySession, load_recording

FIXTURES = Path(__file__).parent / "fixtures"

CONVERSATION = [
    {"role": "user", "content": "What is a mixture of experts?"},
    {"role": "assistant", "content": "A **mixture of experts** splits a layer's MLP into many small experts.\n\n"
                                     "- a *router* picks the top-k experts for each token\n"
                                     "- only those experts run, so most weights sit idle\n\n"
                                     "That is why the idle ones can live on the SSD."},
    {"role": "user", "content": "And the cache?"},
    {"role": "assistant", "content": "Hot experts stay in RAM; misses are read from the SSD, "
                                     "one contiguous extent per expert."},
]


def replay_app(fixture: str, kind: str) -> MerApp:
    snaps = load_recording(FIXTURES / f"telemetry_{fixture}.json")
    if kind == "demo-stress":
        info = ModelInfo(name="stress demo", kind=kind, note=STRESS_NOTE, io="uring", quant="q4_0")
    else:
        info = ModelInfo(name="chat demo", kind=kind, note=CHAT_NOTE)
    return MerApp(ReplaySession(snaps, info, CONVERSATION))


async def settle(pilot) -> None:
    await pilot.pause(0.3)
    for inp in pilot.app.screen.query(Input):
        inp.cursor_blink = False          # a blinking cursor would make the screenshot depend on timing
    await pilot.pause(0.3)
    await pilot.wait_for_scheduled_animations()


@pytest.mark.parametrize("size", [(160, 50), (100, 30)], ids=["160x50", "100x30"])
def test_chat_demo_screen(snap_compare, size):
    assert snap_compare(replay_app("chat", "demo-chat"), terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", [(160, 50), (100, 30)], ids=["160x50", "100x30"])
def test_streaming_48x128_screen(snap_compare, size):
    assert snap_compare(replay_app("stream", "demo-stress"), terminal_size=size, run_before=settle)


def test_loading_screen(snap_compare):
    snaps = load_recording(FIXTURES / "telemetry_chat.json")
    session = ReplaySession(snaps, ModelInfo(name="stress demo", path="~/.cache/mer-tui/stress",
                                             kind="demo-stress", note=STRESS_NOTE))
    session.status, session.progress = "loading", ("experts", 120, 384)
    assert snap_compare(MerApp(session), terminal_size=(100, 30), run_before=settle)
