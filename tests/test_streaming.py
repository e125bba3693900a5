"""StreamingExperts: bit-identical results whatever the reader, budget, policy or prefetch; faults;
single-flight; settings changed while running; pins; prefetch counters; telemetry."""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np
import pytest

import engine
from engine import EngineError, ExpertReadError
from engine.store import EXPERT_FILE, INDEX
from engine.streaming import StreamingExperts
from tests import streaming_fixtures as fx
from tests.streaming_fixtures import IDS, FaultyReader
from tests.test_io import KINDS

# the shared fixtures, made visible to pytest in this module
mixtral_bf16, reference, tiny_store = fx.mixtral_bf16, fx.reference, fx.tiny_store

# One bundle of the tiny Mixtral is 3 x 48 x 32 bf16 = 9 KiB (12 KiB read, aligned); it has 6 experts
# per layer and picks 2 per token, so 16KiB holds one bundle: less than one layer's chosen experts.
BUDGETS = [None, "16KiB", "60KiB", 0]


def _run(m) -> tuple[np.ndarray, list[int]]:
    return m.forward(IDS), list(m.generate(IDS[:4], max_new_tokens=12))


def _same(got, ref) -> bool:
    return np.array_equal(got[0], ref[0]) and got[1] == ref[1]


@pytest.mark.parametrize("io", KINDS)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("policy", ["lru", "lfu", "lfu-decay", "router"])
def test_store_is_bit_identical(tiny_store, reference, io, budget, policy):
    for prefetch in (True, False):
        with engine.load(tiny_store, io=io, ram_cache=budget, policy=policy, prefetch=prefetch) as m:
            assert isinstance(m.experts, StreamingExperts) and m.experts.backend == io
            assert _same(_run(m), reference)
            snap = m.telemetry()
            ram = snap["tiers"]["ram"]
            if budget is not None:
                assert ram["bytes_used"] <= engine.parse_size(budget)
            assert ram["hits"] + ram["misses"] > 0
            if not prefetch:
                assert snap["prefetch"]["issued"] == 0


@pytest.mark.parametrize("io", ["auto", *KINDS])
@pytest.mark.parametrize("budget", [None, "16KiB"])
def test_checkpoint_folder_streams_without_converting(mixtral_bf16, reference, io, budget):
    if io == "auto" and budget is None:
        with engine.load(mixtral_bf16) as m:      # the rule: no budget, auto reader -> all in RAM
            assert not isinstance(m.experts, StreamingExperts)
        return
    with engine.load(mixtral_bf16, io=io, ram_cache=budget, policy="lfu-decay") as m:
        assert isinstance(m.experts, StreamingExperts)
        assert m.experts.layout.kind == "checkpoint"
        assert _same(_run(m), reference)


def test_settings_change_while_running(tiny_store, reference):
    with engine.load(tiny_store, ram_cache=None) as m:
        gen = m.generate(IDS[:4], max_new_tokens=12)
        out = [next(gen)]
        assert m.telemetry()["tiers"]["ram"]["bytes_used"] > 16 << 10
        m.configure(ram_cache="16KiB")             # shrinking evicts at once
        assert m.telemetry()["tiers"]["ram"]["bytes_used"] <= 16 << 10
        out.append(next(gen))
        m.configure(policy="lfu", ram_cache="40KiB")
        out.append(next(gen))
        m.set_prefetch(False)
        issued = m.telemetry()["prefetch"]["issued"]
        out.append(next(gen))
        assert m.telemetry()["prefetch"]["issued"] == issued and not m.telemetry()["prefetch"]["enabled"]
        m.configure(policy="lfu-decay", prefetch=True, hot_set=0.5)
        out += list(gen)
        snap = m.telemetry()
        assert snap["policy"] == "lfu-decay" and snap["prefetch"]["enabled"]
    assert out == reference[1]


def test_bad_settings_are_named(tiny_store):
    with engine.load(tiny_store) as m:
        with pytest.raises(EngineError, match="ram_cache"):
            m.configure(ram_cache="lots")
        with pytest.raises(EngineError, match="policy"):
            m.configure(policy="mru")
        with pytest.raises(EngineError, match="hot_set"):
            m.configure(hot_set=2)
        with pytest.raises(EngineError, match="queue_depth"):
            m.configure(queue_depth=0)
        m.configure(colour="blue")                  # unknown settings are ignored


def test_single_flight(tiny_store):
    """Threads asking at once for the same bundles read each bundle once."""
    with engine.load(tiny_store, ram_cache=None, prefetch=False) as m:
        src = m.experts
        gate = threading.Barrier(4)
        src.reader = FaultyReader(src.reader, delay=lambda: time.sleep(0.05))   # keep reads in flight
        got = []

        def ask():
            gate.wait()
            got.append(src.get(1, [0, 2, 4]))

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(v == 1 for v in src.reader.reads.values()) and len(src.reader.reads) == 3
        first = got[0]
        for g in got[1:]:
            assert all(g[e] is first[e] for e in (0, 2, 4))
        assert src.stats()["tiers"]["ssd"]["reads"] == 3


def test_prefetch_and_demand_share_one_read(tiny_store):
    with engine.load(tiny_store, ram_cache=None) as m:
        src = m.experts
        src.reader = FaultyReader(src.reader, delay=lambda: time.sleep(0.05))
        src.prefetch([(2, [1, 3])])
        deadline = time.time() + 5
        while not src._flights and time.time() < deadline:   # wait until the prefetch read is out
            time.sleep(0.001)
        src.get(2, [1, 3])
        assert src.reader.reads == {(2, 1): 1, (2, 3): 1}
        # Prefetch reads one bundle at a time: the model thread waited for (2, 1), which prefetch was
        # reading, and read (2, 3) itself rather than queue behind it.
        pf = src.stats()["prefetch"]
        assert pf["issued"] == pf["useful"] == pf["late"] == 1 and pf["precision"] == 1.0


def test_prefetch_reads_while_a_demand_read_is_in_flight(tiny_store):
    # The hint for the next layer comes just before this layer's demand read; waiting for that read to
    # end left the disk idle during the compute that follows (see StreamingExperts._work).
    with engine.load(tiny_store, ram_cache=None) as m:
        src = m.experts
        demand_reading, release = threading.Event(), threading.Event()

        def hold_demand() -> None:
            if threading.current_thread().name.startswith("mer-prefetch"):
                return
            demand_reading.set()
            release.wait(10)

        src.reader = FaultyReader(src.reader, delay=hold_demand)
        demand = threading.Thread(target=src.get, args=(0, [1]))
        demand.start()
        try:
            assert demand_reading.wait(10)
            src.prefetch([(1, [2])])
            deadline = time.time() + 10
            while (1, 2) not in src.reader.reads and time.time() < deadline:
                time.sleep(0.001)
            assert src.reader.reads.get((1, 2)) == 1 and demand.is_alive()   # read while demand still waits
        finally:
            release.set()
            demand.join(10)
        assert src.reader.reads == {(0, 1): 1, (1, 2): 1}
        assert src.get(1, [2])[2] is not None and src.reader.reads[(1, 2)] == 1   # and it is used


def test_request_hands_over_the_cached_bundles_while_the_misses_are_read(tiny_store):
    # Model._moe computes the cached experts while the disk reads the others.
    with engine.load(tiny_store, ram_cache=None, prefetch=False) as m:
        src = m.experts
        cached = src.get(0, [1])[1]
        reading, release = threading.Event(), threading.Event()
        readers = []

        def hold() -> None:
            readers.append(threading.current_thread().name)
            reading.set()
            release.wait(10)

        src.reader = FaultyReader(src.reader, delay=hold)
        p = src.request(0, [1, 4])
        try:
            assert reading.wait(10)                           # the miss is being read ...
            assert set(p.ready) == {1} and p.ready[1] is cached   # ... and the cached one is handed over
        finally:
            release.set()
        assert set(p.wait()) == {4} and src.reader.reads == {(0, 4): 1}
        assert len(readers) == 1 and readers[0].startswith("mer-demand")
        # Nothing cached, nothing to compute meanwhile: the caller reads, with no hand-over.
        p = src.request(1, [2, 3])
        assert p.ready == {} and readers[1:] == [threading.current_thread().name]
        assert set(p.wait()) == {2, 3}
        # Everything cached: nothing to wait for.
        p = src.request(1, [2])
        assert set(p.ready) == {2} and p.wait() == {}
        demand = src._demand
    assert not any(t.is_alive() for t in demand._threads)   # close() ended the demand thread


def test_a_failed_read_behind_request_raises_from_wait(tiny_store, reference):
    class Broken(FaultyReader):
        def read(self, jobs):
            raise RuntimeError("reader bug")

    with engine.load(tiny_store, ram_cache="60KiB", prefetch=False) as m:
        src = m.experts
        src.get(1, [0])
        real = src.reader
        _faulty(m, {(1, 5)}, times=None)
        p = src.request(1, [0, 5])
        assert set(p.ready) == {0}
        with pytest.raises(ExpertReadError, match="layer 1 expert 5"):
            p.wait()
        src.reader = Broken(real)
        p = src.request(1, [0, 4])
        with pytest.raises(RuntimeError, match="reader bug"):
            p.wait()
        assert not src._flights and (1, 5) not in src.cache.entries and (1, 4) not in src.cache.entries
        src.reader = real
        assert _same(_run(m), reference)


def test_the_model_guesses_only_while_a_hint_can_lead_to_a_read(tiny_store, mixtral_bf16, reference):
    # Guessing the next layer's experts costs a router product a layer: not once every bundle is
    # cached (a budget that holds the model), and never for experts held in RAM.
    def watch(m) -> list:
        guesses, guess = [], m._prefetch
        m._prefetch = lambda layer, *rest: (guesses.append(layer), guess(layer, *rest))
        return guesses

    with engine.load(tiny_store, ram_cache=None) as m:
        assert m.experts.wants_hints()
        for layer in m.moe_layer_ids:
            m.experts.get(layer, list(range(m.spec.num_experts)))
        assert not m.experts.wants_hints()
        guesses = watch(m)
        assert _same(_run(m), reference) and guesses == []
    with engine.load(tiny_store, ram_cache="16KiB") as m:
        guesses = watch(m)
        assert _same(_run(m), reference) and guesses
        m.set_prefetch(False)
        assert not m.experts.wants_hints()
    with engine.load(mixtral_bf16) as m:
        assert not isinstance(m.experts, StreamingExperts) and not m.experts.wants_hints()


def test_decode_guesses_two_layers_ahead_with_the_previous_tokens_attention(tiny_store, reference):
    # Decoding, a later layer's router input is estimated as the residual plus the attention outputs of
    # the token before at the layers up to it (the prompt's last token for the first decoded one); a
    # prompt's rows are guessed from the residual alone, one layer ahead.
    from engine.model import PREFETCH_AHEAD, rms_norm

    with engine.load(tiny_store, ram_cache="16KiB") as m:
        events: list[tuple] = []
        attention, moe, prefetch = m._attention, m._moe, m.experts.prefetch
        m._attention = lambda i, x, *rest: events.append(("attn", i, attention(i, x, *rest))) or events[-1][2]
        m._moe = lambda i, h, residual, cache, **kw: (events.append(("res", i, residual.copy()))
                                                      or moe(i, h, residual, cache, **kw))
        m.experts.prefetch = lambda hints: (events.append(("hints", None, hints)), prefetch(hints))
        assert list(m.generate(IDS[:4], max_new_tokens=12)) == reference[1]
    layers = m.moe_layer_ids
    assert PREFETCH_AHEAD == 2 and layers == [0, 1, 2]

    def top(layer: int, x: np.ndarray) -> list[int]:
        lw = m.weights.layers[layer]
        logits = lw.router.matmul(rms_norm(x, lw.mlp_norm, m.spec.rms_norm_eps))
        return list(dict.fromkeys(np.argsort(-logits, axis=-1)[:, : m.spec.top_k].T.ravel().tolist()))

    last_attention: dict[int, np.ndarray] = {}
    at = residual = None
    decoded = differs = 0
    for kind, layer, value in events:
        if kind == "res":
            at, residual = layer, value
        elif kind == "attn":   # a layer's attention runs after the layers before it guessed for it
            last_attention[layer] = value[-1:]
        elif residual.shape[0] > 1:    # the prompt
            assert value == [(at + 1, top(at + 1, residual))]
        else:
            ahead = [n for n in layers if n > at][:2]
            want = [(n, top(n, residual + sum(last_attention[j] for j in range(at + 1, n + 1)))) for n in ahead]
            assert value == want
            decoded += 1
            differs += value[0][1] != top(at + 1, residual)
    assert decoded == 11 * (len(layers) - 1)
    assert differs > 0   # the estimate changed some guesses on this model: the assertion above has teeth


def test_decode_counts_its_waits_for_experts_by_layer(tiny_store, reference):
    # Every read is slowed to 10 ms and nothing fits the cache or is read ahead, so a decoded token waits
    # at each layer for about as long as that layer's reads took; the prompt's reads are not counted.
    with engine.load(tiny_store, ram_cache="1KiB", prefetch=False) as m:
        decoding = threading.Event()
        reads: dict[int, int] = {}
        read = m.experts.reader.read

        def slow(jobs):
            time.sleep(0.010)
            if decoding.is_set():
                for layer in {job.tag[0] for job in jobs}:
                    reads[layer] = reads.get(layer, 0) + 1
            return read(jobs)
        m.experts.reader.read = slow
        out = []
        for tok in m.generate(IDS[:4], max_new_tokens=6):
            out.append(tok)
            decoding.set()
        assert out == reference[1][:6]
        waits = m.telemetry()["waits"]
    assert waits["steps"] == 5                          # six tokens: the prompt's step and five decode steps
    assert sorted(reads) == m.moe_layer_ids == [0, 1, 2]
    for layer, n in reads.items():
        assert n >= 5                                   # a read a step at least: nothing is cached
        assert waits["total_s"][layer] >= 0.9 * 0.010 * n
    assert sum(waits["recent_ms_per_token"]) >= 0.9 * 10.0 * 3


def test_buffers_are_reused_but_never_under_a_bundle_in_use(tiny_store):
    with engine.load(tiny_store, ram_cache=0, prefetch=False) as m:   # nothing cached: every ask reads
        src = m.experts
        held = src.get(0, [1])[1]
        copy = [np.array(q.data) for q in (held.gate, held.up, held.down)]
        for i in range(20):
            src.get(i % 3, [i % 6, (i + 3) % 6])
        assert src.pool.reused > 0
        assert all(np.array_equal(q.data, c) for q, c in zip((held.gate, held.up, held.down), copy))
        assert src.stats()["tiers"]["ssd"]["reads"] == 41


def test_pins_stay_resident(tiny_store):
    with engine.load(tiny_store, ram_cache="40KiB", prefetch=False) as m:
        src = m.experts
        src.pin([(0, 5), (2, 4)])
        deadline = time.time() + 5
        while ((0, 5) not in src.cache.entries or (2, 4) not in src.cache.entries) and time.time() < deadline:
            time.sleep(0.005)
        m.forward(IDS)
        assert src.cache.lookup((0, 5)) is not None and src.cache.lookup((2, 4)) is not None
        assert src.stats()["tiers"]["ram"]["pinned"] == 2
        src.unpin_all()
        assert src.stats()["tiers"]["ram"]["pinned"] == 0
        hot = m.hottest_experts(3)
        assert len(hot) == 3 and all(0 <= e < 6 for _, e in hot)


# ------------------------------------------------------------------------------------------ faults
def _faulty(m, fail: set, times: int | None) -> FaultyReader:
    m.experts.reader = FaultyReader(m.experts.reader, fail=fail, times=times)
    return m.experts.reader


def test_a_transient_error_is_retried(tiny_store, reference):
    with engine.load(tiny_store, ram_cache="60KiB", prefetch=False) as m:
        r = _faulty(m, {(0, e) for e in range(6)}, times=1)   # every layer-0 bundle fails once
        assert _same(_run(m), reference)
        assert r.failed and m.telemetry()["tiers"]["ssd"]["retries"] >= len(r.failed)


def test_a_persistent_error_ends_the_generation_and_the_model_recovers(tiny_store, reference):
    with engine.load(tiny_store, ram_cache="60KiB", prefetch=False) as m:
        r = _faulty(m, {(1, e) for e in range(6)}, times=None)   # layer 1 cannot be read
        with pytest.raises(ExpertReadError) as info:
            list(m.generate(IDS[:4], max_new_tokens=12))
        msg = str(info.value)
        assert "layer 1 expert" in msg and str(tiny_store / EXPERT_FILE) in msg and "after 3 attempts" in msg
        assert all(n == 3 for n in r.failed.values())
        # Nothing half-read was kept ...
        assert not [k for k in m.experts.cache.entries if k[0] == 1]
        assert m.telemetry()["tiers"]["ssd"]["errors"] >= 1
        # ... so once the storage is healthy, the next request reads again and is exact.
        r.fail.clear()
        assert _same(_run(m), reference)


def test_an_interrupted_read_gives_its_buffers_back(tiny_store):
    # Read buffers are slots of the pool's slabs: one not given back would hold its memory for good.
    class Interrupted:
        def __init__(self, inner):
            self.inner, self.stats, self.name = inner, inner.stats, inner.name

        def read(self, jobs):
            raise KeyboardInterrupt

        def close(self):
            self.inner.close()

    with engine.load(tiny_store, ram_cache="60KiB", prefetch=False) as m:
        src = m.experts
        src.get(0, [0])
        src.reader = Interrupted(src.reader)
        with pytest.raises(KeyboardInterrupt):
            src.get(1, [1, 2])
        cached = sum(src._plans[k].size for k in src._buf_of)
        assert cached and src.pool.nbytes == 2 * src._plans[(1, 1)].size
        assert src.pool.mapped_bytes == cached + src.pool.nbytes   # every slot handed out is accounted for


def test_a_file_truncated_after_opening(tiny_store, reference, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    path = store / EXPERT_FILE
    whole = path.read_bytes()
    for io in KINDS:
        with engine.load(store, io=io, ram_cache="16KiB", prefetch=False) as m:
            os.truncate(path, len(whole) // 3)
            with pytest.raises(ExpertReadError) as info:
                m.forward(IDS)
            msg = str(info.value)
            assert str(path) in msg and "layer" in msg and "expert" in msg
            path.write_bytes(whole)      # the file is back: the same model reads it again, exactly
            assert _same(_run(m), reference)


def test_a_checksum_mismatch_names_the_layer_and_expert(tiny_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(tiny_store, store)
    index = json.loads((store / INDEX).read_text())
    b = next(b for b in index["bundles"] if (b["layer"], b["expert"]) == (1, 3))
    with open(store / EXPERT_FILE, "r+b") as f:
        f.seek(b["offset"] + 100)
        byte = f.read(1)
        f.seek(b["offset"] + 100)
        f.write(bytes([byte[0] ^ 0x10]))
    with engine.load(store, prefetch=False) as m:
        m.experts.get(1, [2])                       # its neighbours are fine
        with pytest.raises(ExpertReadError, match=r"layer 1 expert 3: checksum mismatch"):
            m.experts.get(1, [3])
        assert (1, 3) not in m.experts.cache.entries


def test_an_unknown_expert_is_named_and_leaves_nothing_behind(tiny_store):
    with engine.load(tiny_store, prefetch=False) as m:
        with pytest.raises(EngineError, match="layer 0 has no expert 9"):
            m.experts.get(0, [1, 9])
        assert not m.experts._flights
        assert set(m.experts.get(0, [1])) == {1}


def test_a_reader_that_raises_leaves_no_flight_behind(tiny_store, reference):
    class Broken(FaultyReader):
        def read(self, jobs):
            raise RuntimeError("reader bug")

    with engine.load(tiny_store, ram_cache="40KiB", prefetch=False) as m:
        real = m.experts.reader
        m.experts.reader = Broken(real)
        with pytest.raises(RuntimeError, match="reader bug"):
            m.experts.get(0, [1, 2])
        assert not m.experts._flights and not m.experts.cache.entries and m.experts.cache.used == 0
        m.experts.reader = real
        assert _same(_run(m), reference)


def test_a_quant_the_shapes_cannot_take_is_refused_at_load(tiny_store):
    with pytest.raises(EngineError, match="quant"):
        engine.load(tiny_store, quant="q4_k")     # rows of 32 and 48 weights; q4_k needs 256


# --------------------------------------------------------------------------------------- telemetry
def test_telemetry_schema_and_counters(tiny_store):
    with engine.load(tiny_store, ram_cache="40KiB", policy="lfu-decay") as m:
        snaps = []
        stop = threading.Event()

        def poll():
            while not stop.is_set():
                snaps.append(m.telemetry())
                time.sleep(0.002)

        t = threading.Thread(target=poll)
        t.start()
        list(m.generate(IDS[:4], max_new_tokens=12))
        stop.set()
        t.join()
        s = m.telemetry()
    assert snaps
    ram, ssd, io, pf = s["tiers"]["ram"], s["tiers"]["ssd"], s["io"], s["prefetch"]
    assert set(ram) >= {"hits", "misses", "hit_rate", "bytes_used", "bytes_budget", "entries", "pinned"}
    assert set(ssd) >= {"reads", "bytes_read", "read_mb_s"}
    assert set(io) >= {"backend", "backend_reason", "queue_depth", "queue_depth_avg", "queue_depth_max",
                       "queue_depth_mean", "read_ms_p50", "read_ms_p99"}
    assert set(pf) >= {"enabled", "issued", "useful", "precision", "recall"}
    assert "vram" not in s["tiers"]        # no GPU here: no tier pretends to be one
    assert ram["hit_rate"] == pytest.approx(ram["hits"] / (ram["hits"] + ram["misses"]))
    assert ssd["reads"] >= ram["misses"] and ssd["bytes_read"] >= ssd["reads"] * 9216
    assert 0 <= pf["useful"] <= pf["issued"] and 0.0 <= pf["precision"] <= 1.0 and 0.0 <= pf["recall"] <= 1.0
    assert 0.0 <= pf["guess_precision"] <= 1.0 and pf["guess_recall"] > 0
    assert io["queue_depth_max"] >= 1 and io["read_ms_p99"] >= io["read_ms_p50"] > 0
    assert io["queue_depth_avg"] > 0.0        # reads of the last 2 s, the run's own
    assert s["policy"] == "lfu-decay" and ram["bytes_budget"] == 40 << 10
    m.reset_telemetry()


def test_routing_trace(tiny_store, tmp_path):
    trace = tmp_path / "trace.jsonl"
    with engine.load(tiny_store) as m:
        m.configure(trace=str(trace))
        list(m.generate(IDS[:4], max_new_tokens=3))
        m.configure(trace=None)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    layers = m.spec.num_layers
    assert len(rows) == 3 * layers                   # the prompt step and two decode steps
    assert [r["layer"] for r in rows[:layers]] == list(range(layers))
    assert all(len(r["experts"]) == 2 for r in rows[layers:])
    # the router's probabilities reach the source with each step (the router policy's evidence);
    # a decode step's picks are its most probable experts
    for r in rows:
        assert len(r["probs"]) == m.spec.num_experts and sum(r["probs"]) == pytest.approx(1.0, abs=1e-3)
    for r in rows[layers:]:
        others = [p for e, p in enumerate(r["probs"]) if e not in r["experts"]]
        assert min(r["probs"][e] for e in r["experts"]) >= max(others)
