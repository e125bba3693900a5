"""`mer-tui bench` end to end on a tiny streaming model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mer_tui", "bench", *args], capture_output=True, text=True,
                          timeout=180)


def test_bench_json_reports_speed_cache_and_roofline(chat_model_dir):
    # no prefetch: then every byte read is a demand miss, at most the experts a token uses
    r = _bench("--model", str(chat_model_dir), "--ram-cache", "40KiB", "--io", "pread", "--no-prefetch",
               "--prompt-tokens", "8", "--decode-tokens", "6", "--repeats", "2", "--json", "--kv-cache", "f32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["kv_cache"] == "f32"
    # the prompt read experts: a 40 KiB cache holds almost none
    assert all(0 < run["prefill_read_bytes"] for run in out["runs"])
    assert len(out["runs"]) == 2 and out["decode_tokens_per_s"] > 0 and out["prefill_tokens_per_s"] > 0
    assert out["io"] == "pread" and out["ram_cache"] == 40 * 1024
    assert 0.0 <= out["hit_rate"]["ram"] < 1.0          # a 40 KiB budget cannot hold every expert
    roof = out["roofline"]
    assert roof["dram_read_bytes_per_s"] > 1e8 and roof["disk_read_bytes_per_s"] > 1e6
    # a miss reads its three matrices as 4 KiB-aligned spans: at most 8 KiB more each
    bundles_per_token = 2 * 3                               # top-2 in each of the 3 layers
    assert 0 < out["missed_bytes_per_token"] <= roof["expert_bytes_per_token"] + bundles_per_token * 3 * 8192
    assert 0 < roof["fraction_reached"] < 1.5, roof
    # overlapping reads with compute can only raise the bound: max(a, b) <= a + b
    assert roof["best_decode_tokens_per_s_overlapped"] >= roof["best_decode_tokens_per_s"]
    top = roof["best_decode_tokens_per_s_overlapped"]
    assert roof["fraction_reached_overlapped"] == pytest.approx(out["decode_tokens_per_s"] / top, rel=1e-3)
    assert out["peak_rss_bytes"] > 10 * 1024**2
    # every decode step misses (40 KiB holds no token's experts), so the disk had work part of the time
    assert 0 < out["disk_busy_fraction"] <= 1.0
    for run in out["runs"]:   # one run at a time, so that a failure shows the run's figures
        assert 0 < run["disk_busy_fraction"] <= 1.0, run
    # requests in flight while busy: some wherever the busy time was long enough to count, never more
    # than the reader keeps (16); demand reads alone, a batch at a time
    for run in out["runs"]:
        assert 0.0 <= run["requests_in_flight_while_busy"] <= 16.0, run
        assert (run["requests_in_flight_while_busy"] > 0) == (run["read_bytes_per_s_while_busy"] > 0), run
    # every token misses at every layer and nothing is read ahead: each MoE layer waited, each run
    by_layer = out["wait_ms_per_token_by_layer"]
    assert len(by_layer) == 3 and min(by_layer) > 0, by_layer
    # a run's waits lie inside its decoding, on the decoding thread: less than a token's time
    for run in out["runs"]:
        assert 0 < run["wait_ms_per_token"] < 1e3 / run["decode_tokens_per_s"], run
    # the device's own count of the same time (/proc/diskstats), where the model sits on a block device and
    # the decoding lasted long enough for its whole ticks (device_share): these runs last milliseconds
    for run in out["runs"]:
        assert "device_busy_fraction" not in run, run


def test_device_share_needs_a_long_enough_decode():
    from mer_tui.bench import MIN_BUSY_S, device_share

    # io_ticks in whole ticks: 8 ms busy in a 6 ms decode (seen on this project's machine) says nothing
    assert device_share((0, 0.0), (1 << 20, 0.008), 0.006) == {}
    half = device_share((0, 10.0), (400_000_000, 10.5), 1.0)
    assert half == {"device_busy_fraction": 0.5, "device_read_bytes_per_s_while_busy": 800_000_000}
    # a tick's rounding past the interval is capped; too little busy time to time the reads gives 0
    assert device_share((0, 0.0), (1 << 20, 1.004), 1.0)["device_busy_fraction"] == 1.0
    little = device_share((0, 0.0), (1 << 20, MIN_BUSY_S / 2), 1.0)
    assert little["device_read_bytes_per_s_while_busy"] == 0.0 and little["device_busy_fraction"] > 0


def test_the_waits_line_names_the_layers_that_waited_most():
    from mer_tui.bench import waits_line

    assert waits_line([12.04, 0.5, 0.01, 5.1]) == ("17.6 ms a token for experts; "
                                                   "most at layers 0 (12.0), 3 (5.1), 1 (0.5)")
    assert waits_line([0.0, 2.0, 0.0]) == "2.0 ms a token for experts; most at layer 1 (2.0)"
    assert waits_line([0.0, 0.01]) == "0.0 ms a token for experts"


def test_disk_counters_read_the_devices_line(tmp_path):
    from mer_tui.machine import block_device, disk_counters

    stats = tmp_path / "diskstats"
    stats.write_text(" 253       0 vda 1000 5 8192 300 40 2 64 9 0 1234 5678 0 0 0 0\n"
                     " 253       1 vda1 10 0 80 3 0 0 0 0 0 7 9 0 0 0 0\n")
    assert disk_counters("vda", stats) == (8192 * 512, 1.234)
    assert disk_counters("vda1", stats) == (80 * 512, 0.007)
    assert disk_counters("sdz", stats) is None and disk_counters("vda", tmp_path / "none") is None
    # this file's own device, where it has one, is a line of the real file
    dev = block_device(tmp_path / "diskstats")
    if dev is not None:
        assert disk_counters(dev) is not None
    assert block_device(tmp_path / "missing") is None


def test_bench_takes_bandwidths_from_the_caller(chat_model_dir):
    r = _bench("--model", str(chat_model_dir), "--prompt-tokens", "4", "--decode-tokens", "3", "--repeats", "1",
               "--dram-bw", "1e10", "--disk-bw", "5e8", "--json")
    assert r.returncode == 0, r.stderr
    roof = json.loads(r.stdout)["roofline"]
    assert roof["dram_read_bytes_per_s"] == 1e10 and roof["disk_read_bytes_per_s"] == 5e8


def test_bench_preload_runs_from_ram(chat_model_dir):
    # No budget: every expert is read before timing, so decoding reads nothing and always hits.
    common = ("--model", str(chat_model_dir), "--io", "pread", "--no-prefetch", "--prompt-tokens", "4",
              "--decode-tokens", "4", "--repeats", "1", "--dram-bw", "1e10", "--disk-bw", "5e8", "--json")
    r = _bench(*common, "--preload")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg = json.loads((chat_model_dir / "config.json").read_text())
    assert out["preloaded_experts"] == cfg["num_hidden_layers"] * cfg["num_local_experts"]
    assert out["hit_rate"]["ram"] == 1.0 and out["missed_bytes_per_token"] == 0
    # A budget stops the preload when it is full: some experts, not all.
    r = _bench(*common, "--preload", "--ram-cache", "40KiB")
    assert r.returncode == 0, r.stderr
    part = json.loads(r.stdout)
    assert 0 < part["preloaded_experts"] < out["preloaded_experts"]
    r = _bench(*common)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["preloaded_experts"] == 0


def test_bench_bad_options_exit_2(chat_model_dir):
    r = _bench("--model", str(chat_model_dir), "--decode-tokens", "0")
    assert r.returncode == 2 and "--decode-tokens" in r.stderr and "Traceback" not in r.stderr
    r = _bench("--decode-tokens", "3")
    assert r.returncode == 2 and "--model" in r.stderr


def test_roofline_never_takes_a_disk_slower_than_the_engines_reads(chat_model_dir, monkeypatch, capsys):
    # Given a disk figure far below what the reads achieve, the roofline takes the reads' own speed
    # while the disk was busy (the tiny model reads for milliseconds: count any busy time here).
    from mer_tui import bench
    from mer_tui.cli import main

    monkeypatch.setattr(bench, "MIN_BUSY_S", 0.0)
    rc = main(["bench", "--model", str(chat_model_dir), "--ram-cache", "40KiB", "--io", "pread", "--no-prefetch",
               "--prompt-tokens", "4", "--decode-tokens", "4", "--repeats", "1", "--dram-bw", "1e10",
               "--disk-bw", "1000", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    roof = out["roofline"]
    assert roof["disk_read_bytes_per_s"] == pytest.approx(out["read_bytes_per_s_while_busy"], rel=1e-3)
    assert roof["disk_read_bytes_per_s"] > 1000 and "engine's own reads" in roof["disk_read_mode"]


def test_profile_splits_the_disks_idle_time_by_stage():
    from bench.profile_decode import Timers, disk_idle

    t = Timers()
    t.spans = [("io_wait", 0.0, 2.0), ("expert_compute", 2.0, 5.0), ("attention", 5.0, 8.0)]
    t.reads = [(0.0, 1.5), (0.5, 3.0), (6.0, 7.0), (9.5, 12.0)]   # overlapping reads count once
    d = disk_idle(t, 0.0, 10.0, tokens=2)
    assert d["busy_share"] == pytest.approx(0.45)               # [0, 3), [6, 7), [9.5, 10)
    idle = d["idle_ms_per_token"]
    assert idle["expert_compute"] == pytest.approx(1000.0)      # [3, 5) over two tokens
    assert idle["attention"] == pytest.approx(1000.0)           # [5, 6) and [7, 8)
    assert idle["io_wait"] == pytest.approx(0.0)
    assert idle["other"] == pytest.approx(750.0)                # [8, 9.5)
    assert disk_idle(Timers(), 0.0, 1.0, 1) is None             # no reads timed: experts in RAM


def test_profile_decode_reports_the_disk_on_a_streaming_model(chat_model_dir):
    r = subprocess.run([sys.executable, "-m", "bench.profile_decode", "--model", str(chat_model_dir),
                        "--ram-cache", "40KiB", "--io", "pread", "--prompt-tokens", "4", "--decode-tokens", "5",
                        "--json"], capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    d = out["disk"]
    assert 0 < d["busy_share"] <= 1.0                           # every token misses at 40 KiB
    idle_s = sum(d["idle_ms_per_token"].values()) * out["decode_tokens"] / 1e3
    assert idle_s == pytest.approx((1 - d["busy_share"]) * out["decode_s"], rel=1e-6, abs=1e-6)
    reads, asked = out["reads"], out["ready_at_request"]
    assert out["seconds"]["prefetch"] > 0                            # 40 KiB: the model guesses ahead
    assert sum(reads["share"].values()) == pytest.approx(1.0)
    assert reads["share"]["none"] == pytest.approx(1 - d["busy_share"])   # the same reads, the same window
    assert reads["demand"]["bundles_per_token"] > 0               # 40 KiB holds few bundles: misses
    assert 0 <= asked["ready"] < asked["asked"]
    pf = out["telemetry"]["prefetch"]        # counted over the timed decode (the warm-up's reset)
    assert pf["issued"] > 0 and 0 <= pf["guess_recall"] <= 1 and 0 <= pf["guess_precision"] <= 1
    # The same waits and requests, split by layer: one request a layer a decoded token.
    layers = out["by_layer"]
    assert len(layers) >= 2 and all(v["wait_ms_per_token"] >= 0 for v in layers.values())
    wait_s = sum(v["wait_ms_per_token"] for v in layers.values()) * out["decode_tokens"] / 1e3
    assert wait_s == pytest.approx(out["seconds"]["io_wait"], rel=0.05, abs=1e-4)
    assert sum(v["not_ready_per_token"] for v in layers.values()) == pytest.approx(
        (asked["asked"] - asked["ready"]) * len(layers))


def test_each_repeat_decodes_inputs_of_its_own(chat_model_dir, monkeypatch, capsys):
    # One prompt repeated would hand the second run the first one's routing (a cache that remembers
    # would make the median measure the repetition); the continuation is forced, the same for
    # bench.run_llama, so both engines decode the same tokens.
    from mer_tui import bench
    from mer_tui.cli import main

    seen, vocab = [], []
    real_load = bench.load_from_args

    def load(args):
        model = real_load(args)
        vocab.append(model.spec.vocab_size)
        real_generate = model.generate

        def generate(ids, *a, **k):
            out = list(real_generate(ids, *a, **k))
            seen.append((list(ids), out))
            return iter(out)
        model.generate = generate
        return model

    monkeypatch.setattr(bench, "load_from_args", load)
    rc = main(["bench", "--model", str(chat_model_dir), "--io", "pread", "--prompt-tokens", "5",
               "--decode-tokens", "3", "--repeats", "3", "--json"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["decode_tokens_per_s"] > 0
    assert len({tuple(p) for p, _ in seen}) == 3
    assert seen == [tuple(x) for x in bench.bench_inputs(vocab[0], 5, 3, 3)]


def test_profile_splits_the_reads_into_demand_and_prefetch():
    from bench.profile_decode import Timers, disk_idle, reads_by_kind

    t = Timers()
    t.reads = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0), (9.0, 11.0), (11.0, 12.0)]   # clipped to [0, 10)
    t.read_kinds = [("demand", 2), ("prefetch", 1), ("prefetch", 1), ("demand", 1), ("prefetch", 4)]
    r = reads_by_kind(t, 0.0, 10.0, tokens=2)
    assert r["demand"] == {"bundles_per_token": 1.5, "ms_per_bundle": pytest.approx(1000.0)}
    assert r["prefetch"] == {"bundles_per_token": 1.0, "ms_per_bundle": pytest.approx(1500.0)}
    assert r["share"] == pytest.approx({"both": 0.1, "demand_only": 0.2, "prefetch_only": 0.2, "none": 0.5})
    assert r["share"]["none"] == pytest.approx(1 - disk_idle(t, 0.0, 10.0, tokens=2)["busy_share"])
    assert reads_by_kind(Timers(), 0.0, 1.0, 1) is None


def test_profile_splits_the_waits_by_layer():
    from bench.profile_decode import Timers, waits_by_layer

    t = Timers()
    t.asked = [(0, 1, 2), (3, 2, 2), (0, 0, 2), (3, 1, 2)]   # (layer, ready, asked) over two tokens
    waits = {"total_s": [0.004, 0.0, 0.0, 0.001], "steps": 2}  # the engine's telemetry, dense layers 0 s
    got = waits_by_layer(t, waits, tokens=2)
    assert list(got) == [0, 3]
    assert got[0] == {"wait_ms_per_token": pytest.approx(2.0), "not_ready_per_token": 1.5}
    assert got[3] == {"wait_ms_per_token": pytest.approx(0.5), "not_ready_per_token": 0.5}
    assert waits_by_layer(Timers(), waits, 1) is None


def test_profile_decode_preloads_the_in_ram_case(chat_model_dir):
    r = subprocess.run([sys.executable, "-m", "bench.profile_decode", "--model", str(chat_model_dir),
                        "--io", "pread", "--preload", "--prompt-tokens", "4", "--decode-tokens", "5", "--json"],
                       capture_output=True, text=True, timeout=180, cwd=REPO)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reads"] is None and out["disk"] is None           # every expert read before decoding
    assert "prefetch" not in out["seconds"]                       # nothing left to read: no guesses


def test_the_report_says_how_many_requests_the_busy_disk_had(chat_model_dir, capsys):
    from mer_tui.bench import _print_report

    r = _bench("--model", str(chat_model_dir), "--ram-cache", "40KiB", "--prompt-tokens", "4",
               "--decode-tokens", "3", "--repeats", "1", "--dram-bw", "1e10", "--disk-bw", "5e8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    out.update(read_bytes_per_s_while_busy=1.5e9, requests_in_flight_while_busy=2.34)
    _print_report(out)
    assert "1500 MB/s while busy with 2.3 requests in flight on average" in capsys.readouterr().out
    out.update(read_bytes_per_s_while_busy=0.0, requests_in_flight_while_busy=0.0)
    _print_report(out)
    assert "too little (under 0.25 s a run) to time the disk" in capsys.readouterr().out
