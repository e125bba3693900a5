"""mer_tui.textpace: the streaming reply is drawn at every tick while that is cheap, less often as it
grows costly, and never less often than every MAX_WAIT_S."""
from __future__ import annotations

import pytest

from mer_tui.textpace import MAX_WAIT_S, SHARE, TextPacer

TICK_S = 0.1
OTHER_S = 0.01          # what the main thread spends in a tick interval besides drawing the text


def draws(draw_s: float, ticks: int, waiting: bool = True) -> tuple[TextPacer, list[int]]:
    """Ticks of an app whose text, when drawn, costs `draw_s` of the interval after it; the ticks drawn at."""
    pacer, cpu, now, cost_next, at = TextPacer(), 0.0, 0.0, 0.0, []
    for k in range(ticks):
        cpu += OTHER_S + cost_next
        now = k * TICK_S
        pacer.tick(cpu)
        cost_next = 0.0
        if waiting and pacer.due(now):
            pacer.drew(now)
            at.append(k)
            cost_next = draw_s
    return pacer, at


def test_cheap_draws_come_at_every_tick():
    _, at = draws(0.003, 50)
    assert at == list(range(50))


def test_costly_draws_are_spaced_to_hold_their_share():
    pacer, at = draws(0.1, 80)          # 100 ms a draw: at most SHARE of the time, so one every 0.4 s
    assert pacer.cost_s == pytest.approx(0.1, abs=0.002)
    gaps = [j - i for i, j in zip(at, at[1:])]
    assert all(4 <= g <= 5 for g in gaps[2:]), at
    assert len(at) * 0.1 <= 80 * TICK_S * SHARE + 0.2


def test_never_less_often_than_the_longest_wait():
    _, at = draws(5.0, 100)             # absurdly costly: still drawn every MAX_WAIT_S
    assert len(at) >= 4 and all((j - i) * TICK_S <= MAX_WAIT_S + 1e-9 for i, j in zip(at, at[1:]))


def test_nothing_waiting_nothing_drawn():
    assert draws(0.003, 20, waiting=False)[1] == []


def test_a_new_reply_starts_cheap():
    pacer, _ = draws(1.0, 30)           # a reply that grew costly to draw
    assert not pacer.due(30 * TICK_S)
    pacer.new_reply()
    assert pacer.due(30 * TICK_S)
