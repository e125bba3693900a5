"""mer_tui.bench_kernels: runs end to end on tiny shapes, reports bad options as usage errors."""
from __future__ import annotations

import json

import pytest

from mer_tui.bench_kernels import main


def test_bench_kernels_json(capsys):
    import kernels

    before = kernels.backend()
    kernels.set_backend("numpy")
    own = kernels.blas_threads()   # BLAS's own count: the baseline runs on it, not on the engine's one
    kernels.set_backend(before)
    rc = main(["--shapes", "64x256", "--formats", "q4_0,f16", "--repeats", "1", "--hot", "--json",
               "--batch", "1,3", "--threads", "1", "--dram-mib", "16"])
    kernels.set_backend(before)
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["blas_threads"] == own
    assert [r["format"] for r in res["results"]] == ["q4_0", "f16"]
    for r in res["results"]:
        assert r["bytes_per_s"] > 0 and r["numpy_f32_bytes_per_s"] > 0 and r["ratio"] > 0
        assert [b["n"] for b in r["batch"]] == [1, 3]
    assert res["dram_read_bytes_per_s"]["all_threads"] > 0
    assert res["threads"] == 1


def test_bench_kernels_table(capsys):
    assert main(["--shapes", "32x256", "--formats", "q8_0", "--repeats", "1", "--hot", "--stat", "min",
                 "--dram-mib", "16"]) == 0
    out = capsys.readouterr().out
    assert "q8_0" in out and "DRAM read" in out and "ratio" in out


def test_bench_kernels_bad_options(capsys):
    assert main(["--formats", "q9_9"]) == 2
    assert main(["--shapes", "12x"]) == 2
    assert main(["--shapes", "16x100", "--formats", "q4_0"]) == 2  # 100 columns: not whole blocks
    assert main(["--repeats", "0"]) == 2
    assert main(["--settle-ms", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("mer-tui bench kernels: ") for line in err)


def test_layout_ab_builds_and_compares(capsys):
    # bench/layout_ab.c must keep building against qkernels.c; a tiny hot run prints one row per pair
    from bench.layout_ab import main as layout_ab
    from kernels import cpu_c

    if not cpu_c.runs_here("avx2"):
        pytest.skip("the layout comparison times the AVX2 kernels")
    assert layout_ab(["--pairs", "q4_0:q4_0x8,q8_0:q8_0x8", "--shapes", "64x256", "--ring-mib", "0",
                      "--threads", "1", "--samples", "3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[1:3] for r in rows] == [["q4_0", "q4_0x8"], ["q8_0", "q8_0x8"]]
    assert all(float(r[3]) > 0 and float(r[4]) > 0 and float(r[5]) > 0 for r in rows)
    assert layout_ab(["--pairs", "q4_0:q9_9"]) == 2

def test_settling_calls_the_kernel_instead_of_sleeping():
    # The settle before each kernel sample is spent in untimed calls of the kernel (walking its
    # ring on), not idle: numpy's samples follow the kernel's with no pause, so both run warm.
    from mer_tui.bench_kernels import _paired, _Timer

    calls = {"a": [], "b": []}
    a = _Timer(lambda item: calls["a"].append(item), list(range(5)), sample_s=1e-4)
    b = _Timer(lambda item: calls["b"].append(item), [None], sample_s=1e-4)
    calls["a"].clear()
    calls["b"].clear()
    _paired(a, b, repeats=2, settle_s=0.02)
    timed = 2 * a.per_sample
    assert len(calls["a"]) > timed + 10          # 20 ms of settling, twice, made calls
    assert calls["a"][:5] == [0, 1, 2, 3, 4]     # the ring walked round from where the timer was
    assert len(calls["b"]) == 2 * b.per_sample   # the baseline is only timed


def test_batch_timing_settles_before_its_samples():
    # The first batch size of a shape is timed right after numpy's matvec: its samples follow untimed
    # calls of the product (settle_s), as the kernel's own samples in _paired do; before, the first
    # size of each shape read up to half the speed of the same size timed later.
    from mer_tui.bench_kernels import _time

    calls = []
    _time(lambda item: calls.append(item), [None], repeats=2, sample_s=1e-4, settle_s=0.0)
    unsettled = len(calls)
    calls.clear()
    _time(lambda item: calls.append(item), [None], repeats=2, sample_s=1e-4, settle_s=0.02)
    assert len(calls) > unsettled + 10
