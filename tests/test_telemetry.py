"""engine.telemetry: the waits for experts, by layer, that the tiers panel and `mer-tui bench` show."""
from __future__ import annotations

import pytest

from engine.telemetry import DECAY_PER_TOKEN, Telemetry


def test_waits_count_steps_and_decay_as_the_activation_counts_do():
    t = Telemetry(layers=3, experts=4)
    assert t.snapshot()["waits"] == {"recent_ms_per_token": [0.0, 0.0, 0.0], "total_s": [0.0, 0.0, 0.0], "steps": 0,
                                     "recent_token_ms": 0.0}
    # three decode steps over MoE layers 1 and 2 (layer 0 dense: never reported)
    for w1, w2 in [(0.010, 0.002), (0.020, 0.0), (0.030, 0.004)]:
        t.waited(1, w1)
        t.waited(2, w2)
    w = t.snapshot()["waits"]
    assert w["steps"] == 3
    assert w["total_s"] == pytest.approx([0.0, 0.060, 0.006])
    d = DECAY_PER_TOKEN
    weight = d * d + d + 1
    assert w["recent_ms_per_token"] == pytest.approx(
        [0.0, 1e3 * (0.010 * d * d + 0.020 * d + 0.030) / weight, 1e3 * (0.002 * d * d + 0.004) / weight])
    t.reset()
    assert t.snapshot()["waits"]["steps"] == 0 and t.snapshot()["waits"]["total_s"] == [0.0, 0.0, 0.0]


def test_a_model_with_one_moe_layer_counts_each_step():
    t = Telemetry(layers=2, experts=4)
    for _ in range(4):
        t.waited(1, 0.001)
    assert t.snapshot()["waits"]["steps"] == 4
    assert t.snapshot()["waits"]["recent_ms_per_token"][1] == pytest.approx(1.0)


def test_a_tokens_time_decays_as_the_waits_do_and_skips_the_gap_between_replies(monkeypatch):
    # The tiers panel shows the waits as a share of a token's time: both over the same recent tokens.
    # The first token of a reply comes from its prompt, after however long the user took: not counted.
    import engine.telemetry as tm

    clock = iter([0.0, 0.010, 0.030, 5.0, 5.040])
    monkeypatch.setattr(tm.time, "perf_counter", lambda: next(clock))
    t = Telemetry(layers=1, experts=2)
    t.generation_started()
    for _ in range(3):          # tokens at 0, 10 and 30 ms: two decoded tokens of 10 and 20 ms
        t.token()
    t.generation_started()      # a new reply, five seconds later
    t.token()
    t.token()                   # 40 ms after that reply's first token
    d = DECAY_PER_TOKEN
    assert t.snapshot()["waits"]["recent_token_ms"] == pytest.approx(
        1e3 * (0.010 * d * d + 0.020 * d + 0.040) / (d * d + d + 1))
