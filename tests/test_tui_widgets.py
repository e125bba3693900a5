"""The panels render from plain snapshots: fed recorded or hand-made ones, they fit their box."""
from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from mer_tui.session import ModelInfo
from mer_tui.widgets.chat import printable
from mer_tui.widgets.header import render_header
from mer_tui.widgets.heatmap import RAMP, colour, render_heatmap
from mer_tui.widgets.seriesplot import changes, thin
from mer_tui.widgets.tiers import bar, render_tiers
from tests.tui_fixtures import load_recording

FIXTURES = Path(__file__).parent / "fixtures"


def lines(renderable, width: int) -> list[str]:
    console = Console(width=width, color_system=None, legacy_windows=False)
    with console.capture() as cap:
        console.print(renderable, crop=False)
    return cap.get().rstrip("\n").split("\n")


@pytest.mark.parametrize("layers,experts", [(8, 8), (16, 64), (48, 128), (2, 4), (60, 256)])
@pytest.mark.parametrize("width,height", [(30, 2), (30, 6), (60, 12), (90, 20), (150, 40)])
def test_heatmap_fits_its_box_and_never_wraps(layers, experts, width, height):
    counts = [[float((i * 7 + e * 13) % 11) for e in range(experts)] for i in range(layers)]
    text = render_heatmap(counts, width, height)
    rows = text.plain.split("\n")
    assert len(rows) <= height
    assert max(len(r) for r in rows) <= width


def test_heatmap_binning_keeps_a_single_hot_expert_visible():
    counts = [[0.0] * 128 for _ in range(48)]
    counts[31][77] = 9.0
    text = render_heatmap(counts, 50, 12)
    hottest = colour(1.0)
    styles = [str(span.style) for span in text.spans]
    assert any(hottest in s for s in styles)              # max-binning: never averaged away
    assert "48×128" in text.plain and "max of" in text.plain


def test_heatmap_small_models_get_big_cells_and_labels():
    counts = [[float(e) for e in range(8)] for _ in range(8)]
    text = render_heatmap(counts, 80, 20)
    rows = text.plain.split("\n")
    assert rows[0].startswith("exp 0")
    assert [r[:3].strip() for r in rows if r.startswith("L")] == [f"L{i}" for i in range(8)]
    assert "8×8" in rows[-1] and "max of" not in rows[-1]


def test_heatmap_without_counts():
    assert "no expert activity" in render_heatmap([], 60, 10).plain


@pytest.mark.parametrize("height", [1, 2])
def test_a_short_heatmap_keeps_the_map(height):
    # A short terminal leaves the panel a row or two: the map, without its axis and legend, not a note
    # that there is no activity.
    counts = [[0.0] * 32 for _ in range(8)]
    counts[7][31] = 5.0
    text = render_heatmap(counts, 60, height)
    rows = text.plain.split("\n")
    assert len(rows) == height and "no expert" not in text.plain
    assert rows[0].startswith("L0") and max(len(r) for r in rows) <= 60
    assert any(colour(1.0) in str(span.style) for span in text.spans)      # the hot expert is drawn


def test_colour_ramp_ends():
    assert colour(0.0) == "#{:02x}{:02x}{:02x}".format(*RAMP[0])
    assert colour(1.0) == "#{:02x}{:02x}{:02x}".format(*RAMP[-1])
    assert colour(2.0) == colour(1.0) and colour(-1.0) == colour(0.0)


def test_bar_widths():
    for f in (None, 0.0, 0.33, 0.5, 1.0, 1.5):
        assert bar(f, 20, "green").cell_len == 20


def test_tiers_show_what_the_engine_applies():
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    out = "\n".join(lines(render_tiers(snap, 54), 54))
    assert "RAM hit" in out and "6.0 GiB of 6.0 GiB" in out and "uring" in out and "lfu-decay" in out
    assert "VRAM" not in out
    # A requested budget the source did not apply is shown beside the real one.
    out = "\n".join(lines(render_tiers(snap, 54, requested_budget=1 << 30), 54))
    assert "asked 1.0 GiB" in out


def test_tiers_show_how_busy_the_disk_was():
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    snap = {**snap, "tiers": {**snap["tiers"], "ssd": {**snap["tiers"]["ssd"], "busy": 0.734, "read_mb_s": 812.0}}}
    out = "\n".join(lines(render_tiers(snap, 54), 54))
    assert "73% busy, 812 MB/s" in out
    snap["tiers"]["ssd"].pop("busy")   # a recording from before the field: an idle gauge, not an error
    assert "0% busy" in "\n".join(lines(render_tiers(snap, 54), 54))


def test_tiers_show_how_well_the_prefetch_guessed():
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    assert "Guessed" not in "\n".join(lines(render_tiers(snap, 54), 54))   # a source that does not guess
    pf = {**snap["prefetch"], "enabled": True, "issued": 40, "useful": 30, "guess_recall": 0.924,
          "guess_precision": 0.913}
    out = "\n".join(lines(render_tiers({**snap, "prefetch": pf}, 54), 54))
    assert "Guessed" in out and "92% picks, 91% right" in out
    pf["enabled"] = False   # off: no guesses to show
    assert "Guessed" not in "\n".join(lines(render_tiers({**snap, "prefetch": pf}, 54), 54))


def test_tiers_show_where_decoding_waited_for_experts():
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    assert "Waits" not in "\n".join(lines(render_tiers(snap, 54), 54))   # a recording from before the field
    recent = [12.0, 4.8, 0.01, 5.1] + [0.0] * 12
    waits = {"recent_ms_per_token": recent, "total_s": [0.0] * 16, "steps": 40}
    out = "\n".join(lines(render_tiers({**snap, "waits": waits, "tokens_per_s": 10.0}, 60), 60))
    assert "Waits" in out and "22 ms: L0 12, L3 5.1" in out
    # 21.9 ms of a 100 ms token (10 tokens/s): the gauge a fifth full
    row = next(line for line in lines(render_tiers({**snap, "waits": waits, "tokens_per_s": 10.0}, 60), 60)
               if line.startswith("Waits"))
    assert row.count("█") == 5 and "░" in row   # 0.219 of a 24-cell gauge
    # With the engine's own token time of the same recent tokens (here 43.8 ms), that is the measure,
    # not the speed of the last 32 tokens: the gauge half full
    timed = {**waits, "recent_token_ms": 43.8}
    row = next(line for line in lines(render_tiers({**snap, "waits": timed, "tokens_per_s": 10.0}, 60), 60)
               if line.startswith("Waits"))
    assert row.count("█") == 12, row
    no_steps = {**waits, "steps": 0}   # nothing decoded since the reset yet
    assert "Waits" not in "\n".join(lines(render_tiers({**snap, "waits": no_steps}, 54), 54))


def test_tiers_show_the_keys_and_values_held():
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    assert "KV" not in "\n".join(lines(render_tiers(snap, 60), 60))   # a recording from before the field
    kv = {"tokens": 1024, "bytes": 1024 * 131072, "format": "f16", "context": 4096}
    row = next(line for line in lines(render_tiers({**snap, "kv": kv}, 54), 54) if line.startswith("KV"))
    assert row.startswith("KV f16") and row.rstrip().endswith("1024/4096 tok, 128 MiB"), row
    assert row.count("█") == 5 and "▎" in row   # a quarter of a 21-cell gauge: 5 cells and two eighths


def test_the_engine_reports_the_keys_and_values_it_holds(model):
    ctx = model.new_context()
    list(model.generate([1, 2, 3, 4, 5], max_new_tokens=4, ignore_eos=True, context=ctx))
    kv = model.telemetry()["kv"]
    per_token = 2 * model.spec.num_layers * model.spec.num_kv_heads * model.spec.head_dim * ctx.cache.dtype.itemsize
    assert kv["tokens"] == len(ctx) == 8 and kv["bytes"] == 8 * per_token
    assert kv["format"] == ctx.cache.fmt == {2: "f16", 4: "f32"}[ctx.cache.dtype.itemsize]
    assert kv["context"] == model.spec.max_position_embeddings
    ctx.clear()
    assert model.telemetry()["kv"]["tokens"] == 0
    del ctx          # a cache no generation holds any more is not shown
    list(model.generate([1, 2, 3], max_new_tokens=2))
    assert model.telemetry()["kv"]["tokens"] == 0


def test_tiers_show_a_vram_tier_when_present():
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    snap = {**snap, "tiers": {**snap["tiers"], "vram": {"hits": 5, "misses": 5, "hit_rate": 0.5,
                                                          "bytes_used": 1 << 30, "bytes_budget": 2 << 30,
                                                          "entries": 10, "pinned": 0}}}
    out = "\n".join(lines(render_tiers(snap, 54), 54))
    assert "VRAM hit" in out and "50.0%" in out and "1.0 GiB of 2.0 GiB" in out


@pytest.mark.parametrize("width", [60, 100, 160])
def test_header_fits_and_keeps_model_reader_budget(width):
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    info = ModelInfo(name="stress demo", kind="demo-stress", io="uring", quant="q4_0")
    text = render_header(info, snap, "generating", width, tokens_per_s=4.2)
    assert text.cell_len <= width or width < 80
    assert "stress demo" in text.plain and "random weights" in text.plain and "generating" in text.plain
    if width >= 100:
        assert "reader uring" in text.plain and "RAM 6.0 GiB/6.0 GiB" in text.plain
    if width >= 160:
        assert "policy lfu-decay" in text.plain and "4.2 tok/s" in text.plain


def test_header_shows_how_far_a_prompt_is():
    snap = load_recording(FIXTURES / "telemetry_stream.json")[-1]
    info = ModelInfo(name="m", io="uring")
    busy = {**snap, "prompt": {"tokens": 2048, "done": 0.4219}}
    assert render_header(info, busy, "generating", 160).plain.endswith("│ prompt 42% of 2048 tokens")
    assert render_header(info, {**snap, "prompt": None}, "generating", 160).plain.endswith("│ generating")
    assert render_header(info, busy, "idle", 160).plain.endswith("│ idle")   # a stale figure is not shown


def test_the_engine_reports_a_prompts_progress(model, monkeypatch):
    """A prompt's share of (chunk, layer) steps done, while it runs; None before and after."""
    from engine import model as model_mod

    monkeypatch.setattr(model_mod, "PREFILL_CHUNK", 4)
    assert model.telemetry()["prompt"] is None
    seen = []
    real = model._attention

    def attention(*args):
        seen.append(model.telemetry()["prompt"])
        return real(*args)

    monkeypatch.setattr(model, "_attention", attention)
    list(model.generate(list(range(1, 11)), max_new_tokens=2, ignore_eos=True))
    parts = model.spec.num_layers * 3          # 10 tokens: chunks of 4, 4 and 2 through every layer
    prompt_steps = seen[:parts]
    assert [p["done"] for p in prompt_steps] == [k / parts for k in range(parts)]
    assert all(p["tokens"] == 10 for p in prompt_steps)
    assert seen[parts:] == [None] * model.spec.num_layers    # the decoded token's step is no prompt
    assert model.telemetry()["prompt"] is None


def test_printable_replaces_control_characters():
    assert printable("a\x00b\x1bc\nd\te\x7f") == "a\ufffdb\ufffdc\nd\te\ufffd"
    # C1 controls, a bidi override and an isolate, a line separator, an unassigned code point
    assert printable("x\x85\x9b1m\u202eab\u2066c\u2028\u0378") == "x\ufffd\ufffd1m\ufffdab\ufffdc\ufffd\ufffd"


def test_printable_keeps_real_text():
    text = "naïve café — 東京, हिन्दी, עברית, 👍🏽, 🫨, e\u0301"
    assert printable(text) == text


def test_thin_keeps_the_newest_sample():
    xs = list(range(1000))
    tx, ty = thin(xs, xs, 100)
    assert len(tx) <= 100 and tx[-1] == 999 and ty == tx


def test_a_held_figure_plots_as_its_changes():
    # The prefill column keeps the last prompt's speed: two prompts are two events, not a line, and a
    # figure already there when the window begins is no event inside it.
    xs = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    ys = [50.0, 50.0, 80.0, 80.0, 80.0, 0.0, 30.0]
    assert changes(xs, ys) == ([2.0, 6.0], [80.0, 30.0])
    assert changes(xs, [0.0] * 7) == ([], [])
