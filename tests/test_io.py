"""The readers: identical bytes from every backend, chunking, fallbacks and their reasons, short reads."""
from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import engine.io as eio
from engine import EngineError
from engine.io import ALIGN, ReadJob, ShortRead, Span, align_down, align_up, aligned_buffer, open_reader
from engine.io.mmap_reader import MmapReader
from engine.io.pread import PreadReader
from tests.streaming_fixtures import resident_pages


def _uring_ok() -> bool:
    try:
        from engine.io.uring_build import load_uring

        load_uring()
        return True
    except OSError:
        return False


KINDS = ["pread", "mmap"] + (["uring"] if _uring_ok() else [])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[list[Path], list[np.ndarray]]:
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("io")
    sizes = [3 * (1 << 20) + 12345, 40000]   # neither a multiple of the alignment
    paths, datas = [], []
    for i, n in enumerate(sizes):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        p = d / f"f{i}.bin"
        data.tofile(p)
        paths.append(p)
        datas.append(data)
    return paths, datas


# (file, start, nbytes): aligned and not, inside one page, crossing many chunks, running to EOF
RANGES = [(0, 0, ALIGN), (0, 5000, 2 * (1 << 20) + 77), (0, 3 * (1 << 20) + 12000, 345), (1, 1, 39999),
          (1, 8192, 100), (0, 123, 1)]


def _jobs(ranges, datas):
    jobs, expect = [], []
    for f, start, n in ranges:
        a, e = align_down(start), align_up(start + n)
        buf = aligned_buffer(e - a)
        jobs.append(ReadJob([Span(f, a, e - a, start + n - a, memoryview(buf))], tag=(f, start)))
        expect.append((buf, start - a, n, datas[f][start:start + n].tobytes()))
    return jobs, expect


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk", [8192, 1 << 20])
def test_every_reader_returns_the_same_bytes(files, kind, chunk):
    paths, datas = files
    r = open_reader(kind, paths, queue_depth=4)
    if hasattr(r, "chunk"):
        r.chunk = chunk   # small chunks: one span becomes many requests in flight together
    jobs, expect = _jobs(RANGES, datas)
    r.read(jobs)
    for job, (buf, rel, n, want) in zip(jobs, expect):
        assert job.error is None, job.error
        assert bytes(buf[rel:rel + n]) == want
    snap = r.stats.snapshot()
    assert snap["bytes"] >= sum(n for _, _, n in RANGES)
    assert snap["requests"] >= len(RANGES)
    r.close()


def test_direct_readers_bypass_the_page_cache(files):
    paths, _ = files
    for kind in set(KINDS) - {"mmap"}:
        r = open_reader(kind, paths)
        assert r.direct, r.reason
        r.close()
    r = open_reader("mmap", paths)
    assert not r.direct
    r.close()


@pytest.mark.skipif("uring" not in KINDS, reason="io_uring unavailable here")
def test_uring_keeps_the_queue_full(files):
    paths, datas = files
    r = open_reader("uring", paths, queue_depth=4)
    r.chunk = 64 << 10
    jobs, _ = _jobs([(0, 0, 2 << 20)], datas)   # 32 requests of 64 KiB
    r.read(jobs)
    snap = r.stats.snapshot()
    # Four requests go out before the first wait: the depth seen by the fourth is 4, never more.
    assert snap["queue_depth_max"] == 4
    assert 1.0 < snap["queue_depth_mean"] <= 4.0
    assert snap["requests"] == 32
    r.close()


@pytest.mark.skipif("uring" not in KINDS, reason="io_uring unavailable here")
def test_uring_shows_a_lone_request_in_flight(files):
    # The telemetry polls the depth from another thread while a reader waits; a read of one request
    # (an expert bundle under 4 MiB) must show in flight, as it was not when the count rose only once
    # the call that submitted it had returned, with its completion.
    paths, datas = files
    r = open_reader("uring", paths, queue_depth=4)
    if not r.direct:
        pytest.skip(f"no O_DIRECT here ({r.reason}): reads from the page cache end too soon to be seen")
    seen, stop = [], threading.Event()

    def read_again():
        while not stop.is_set():
            jobs, _ = _jobs([(0, 0, 3 << 20)], datas)   # one request of 3 MiB
            r.read(jobs)
    t = threading.Thread(target=read_again)
    t.start()
    try:
        end = time.monotonic() + 2.0
        while time.monotonic() < end and max(seen, default=0) < 1:
            seen.append(r.stats.snapshot()["queue_depth"])
    finally:
        stop.set()
        t.join()
        r.close()
    assert max(seen) == 1, f"never seen in flight in {len(seen)} polls"


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "mmap"])
def test_readers_report_the_mean_depth_in_flight(files, kind):
    # The NVMe plot draws requests in flight averaged over the last seconds (their summed latencies
    # over the window): kept busy at a depth of 4, the mean is near 4 and never above it.
    paths, datas = files
    r = open_reader(kind, paths, queue_depth=4)
    if not r.direct:
        r.close()
        pytest.skip(f"no O_DIRECT here ({r.reason}): reads from the page cache are over before the next")
    if hasattr(r, "chunk"):
        r.chunk = 64 << 10
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        jobs, _ = _jobs([(0, 0, 3 << 20)], datas)
        r.read(jobs)
    snap = r.stats.snapshot()
    r.close()
    assert 1.0 < snap["queue_depth_avg"] <= 4.0, snap


def test_auto_prefers_uring_and_says_why_not(files, monkeypatch):
    paths, _ = files
    r = open_reader("auto", paths)
    assert r.name == ("uring" if "uring" in KINDS else "pread")
    r.close()

    def no_uring(*a, **k):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(eio, "_uring", no_uring)
    r = open_reader("auto", paths)
    assert r.name == "pread" and "io_uring unavailable" in r.reason and "no io_uring" in r.reason
    r.close()
    with pytest.raises(EngineError, match="io: uring is not available"):
        open_reader("uring", paths)


def test_a_filesystem_refusing_o_direct_falls_back_to_buffered(files, monkeypatch):
    paths, datas = files
    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refusing_open)
    for kind in set(KINDS) - {"mmap"}:
        r = open_reader(kind, paths)
        assert not r.direct
        assert "O_DIRECT" in r.reason and "EINVAL" in r.reason
        jobs, expect = _jobs(RANGES, datas)
        r.read(jobs)
        for job, (buf, rel, n, want) in zip(jobs, expect):
            assert job.error is None and bytes(buf[rel:rel + n]) == want
        r.close()


def test_o_direct_refused_per_read_falls_back(files, monkeypatch):
    """Some filesystems accept O_DIRECT at open and refuse the read itself (EINVAL)."""
    paths, datas = files
    real = os.preadv
    direct_fds: set[int] = set()
    real_open = os.open

    def tracking_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        if flags & os.O_DIRECT:
            direct_fds.add(fd)
        return fd

    def refusing_preadv(fd, bufs, offset, *a):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset, *a)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "preadv", refusing_preadv)
    r = PreadReader(paths)
    jobs, expect = _jobs(RANGES, datas)
    r.read(jobs)
    for job, (buf, rel, n, want) in zip(jobs, expect):
        assert job.error is None and bytes(buf[rel:rel + n]) == want
    assert not r.direct and "EINVAL" in r.reason
    r.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_file_truncated_after_opening_gives_a_short_read(tmp_path, kind):
    p = tmp_path / "t.bin"
    data = np.arange(64 * ALIGN, dtype=np.uint8)
    data.tofile(p)
    r = open_reader(kind, [p])
    os.truncate(p, 16 * ALIGN)
    buf = aligned_buffer(8 * ALIGN)
    job = ReadJob([Span(0, 32 * ALIGN, 8 * ALIGN, 8 * ALIGN, memoryview(buf))])
    r.read([job])
    assert isinstance(job.error, OSError)
    if not isinstance(job.error, ShortRead):
        assert job.error.errno is not None
    else:
        assert "truncated" in str(job.error) and str(p) in str(job.error)
    r.close()


def test_mmap_reader_of_empty_and_small_files(tmp_path):
    p = tmp_path / "small.bin"
    p.write_bytes(b"abc")
    r = MmapReader([p])
    buf = aligned_buffer(ALIGN)
    job = ReadJob([Span(0, 0, ALIGN, 3, memoryview(buf))])
    r.read([job])
    assert job.error is None and bytes(buf[:3]) == b"abc"
    r.close()


def test_split_keeps_alignment():
    buf = aligned_buffer(5 * ALIGN)
    s = Span(0, 8 * ALIGN, 5 * ALIGN, 4 * ALIGN + 10, memoryview(buf))
    parts = eio.split(s, 2 * ALIGN)
    assert [p.length for p in parts] == [2 * ALIGN, 2 * ALIGN, ALIGN]
    assert [p.offset for p in parts] == [8 * ALIGN, 10 * ALIGN, 12 * ALIGN]
    assert [p.need for p in parts] == [2 * ALIGN, 2 * ALIGN, 10]
    assert sum(len(p.dest) for p in parts) == 5 * ALIGN


@pytest.mark.skipif("uring" not in KINDS, reason="io_uring unavailable here")
def test_uring_module_builds_elsewhere_when_the_cache_is_not_writable(tmp_path, monkeypatch):
    from engine.io import uring_build

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MER_TUI_CACHE_DIR", str(blocker / "cache"))
    path = uring_build._find_or_build(uring_build._name())
    assert path.exists() and not str(path).startswith(str(blocker))


def test_busy_time_counts_overlapping_reads_once(monkeypatch):
    from engine.io import base

    clock = [100.0]
    monkeypatch.setattr(base.time, "monotonic", lambda: clock[0])
    st = base.IoStats()
    st.read_began()          # 100: busy from here
    clock[0] = 101.0
    st.read_began()          # a second reader thread joins
    clock[0] = 102.0
    st.read_ended()
    clock[0] = 103.0
    st.read_ended()          # 103: idle
    assert st.snapshot()["busy"] == pytest.approx(1.0)      # the last 2 s (RATE_WINDOW_S) were all busy
    clock[0] = 110.0         # 7 s idle: not counted
    assert st.snapshot()["busy_s"] == pytest.approx(3.0)
    assert st.snapshot()["busy"] == 0.0
    st.read_began()
    clock[0] = 111.5
    assert st.snapshot()["busy_s"] == pytest.approx(4.5)   # a read under way counts up to now
    assert st.snapshot()["busy"] == pytest.approx(0.75)     # 1.5 s of the last 2
    st.reset()               # a reset mid-read keeps counting that read from the reset on
    clock[0] = 112.0
    st.read_ended()
    assert st.snapshot()["busy_s"] == pytest.approx(0.5)


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else "unknown"


def _smaps_kib(address: int, field: str = "AnonHugePages") -> int | None:
    """A field of the mapping holding `address` from /proc/self/smaps, in KiB; None: no such mapping."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _anon_huge_kib(address: int) -> int:
    return _smaps_kib(address) or 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_read_buffers_sit_in_huge_pages():
    # With small pages the block layer cut every 4 MiB O_DIRECT read into 1 MiB requests and the
    # work disk read half as fast (engine/io/buffers.py); the pool's buffers must get huge pages.
    from engine.io.buffers import BufferPool, read_buffer

    buf = read_buffer(4 << 20)
    assert _anon_huge_kib(np.frombuffer(buf, np.uint8).ctypes.data) >= 2048
    pooled = BufferPool(8 << 20).get(4 << 20)
    assert _anon_huge_kib(np.frombuffer(pooled, np.uint8).ctypes.data) >= 2048
    assert not np.frombuffer(pooled, np.uint8).any()   # zero-filled, as before
    small = read_buffer(4 << 20, huge=False)             # what bench/disk_requests.py compares against
    assert _anon_huge_kib(np.frombuffer(small, np.uint8).ctypes.data) == 0


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_pool_slots_lie_wholly_in_huge_pages():
    # A 3.5 MiB buffer mapped on its own ends in 1.5 MiB of small pages, and 3.5 MiB reads into such
    # buffers ran at 1.2-1.3 GB/s on the work disk against 1.7-2.6 into slab slots (buffers.py).
    from engine.io.buffers import BufferPool, slots_per_slab

    size = 7 << 19                      # an OLMoE-sized expert in q4_0
    assert slots_per_slab(size) == 4    # 14 MiB: seven huge pages exactly
    pool = BufferPool(0)
    bufs = [pool.get(size) for _ in range(4)]
    addrs = [np.frombuffer(b, np.uint8).ctypes.data for b in bufs]
    assert addrs[0] % (2 << 20) == 0 and addrs == [addrs[0] + i * size for i in range(4)]
    assert _anon_huge_kib(addrs[0]) >= 4 * size >> 10
    assert not any(np.frombuffer(b, np.uint8).any() for b in bufs)   # zero-filled


def _resident_kib(address: int, nbytes: int) -> int:
    return resident_pages(address, nbytes) * mmap.PAGESIZE // 1024


def test_pool_gives_memory_back_but_never_under_a_reader():
    from engine.io.buffers import BufferPool, slots_per_slab

    size = 256 << 10
    assert slots_per_slab(size) == 8     # one slab: a single huge page's worth
    pool = BufferPool(limit=size)        # keeps one spare buffer's memory for reuse
    bufs = [pool.get(size) for _ in range(8)]
    addr = np.frombuffer(bufs[0], np.uint8).ctypes.data
    for b in bufs:
        np.frombuffer(b, np.uint8)[:] = 7
    assert _resident_kib(addr, 8 * size) == 2048
    held = np.frombuffer(bufs[0], np.uint8)      # a bundle a caller still computes with
    for b in bufs:
        pool.put(b)
    del b, bufs
    pool.collect()
    assert pool.mapped_bytes == 2 * size          # the spare, and the one still in use
    assert _resident_kib(addr, 8 * size) == 2 * size >> 10   # the other six went back to the kernel
    assert (held == 7).all()                      # never released or handed out under its reader
    again = pool.get(size)                        # the spare comes back, not the held one
    assert np.frombuffer(again, np.uint8).ctypes.data != addr and pool.reused == 1
    del held
    pool.limit = 0                                # keep nothing now
    pool.put(again)
    del again
    pool.collect()
    assert pool.mapped_bytes == 0 and not any(pool._slabs.values())   # every slot released: slab unmapped


def test_pool_keeps_what_a_batch_is_about_to_get():
    # A batch of reads frees its room first (evictions put slots back), then takes its buffers: the
    # slots it freed must be the ones it gets, not fresh memory, however many more than the limit.
    from engine.io.buffers import BufferPool

    size = 256 << 10
    pool = BufferPool(limit=size)
    bufs = [pool.get(size) for _ in range(6)]
    assert pool.allocated == 6
    with pool.expecting(6 * size):
        for b in bufs:
            pool.put(b)
        del b, bufs
        bufs = [pool.get(size) for _ in range(6)]
    assert pool.allocated == 6 and pool.reused == 6 and pool.mapped_bytes == 6 * size
    for b in bufs:       # outside: all but the limit's one slot go back to the kernel, as before
        pool.put(b)
    del b, bufs
    pool.collect()
    assert pool.mapped_bytes == size
    bufs = [pool.get(size) for _ in range(6)]
    assert pool.reused == 7 and pool.allocated == 11
    with pool.expecting(2 * size):   # what is kept beyond the limit ends with the block
        for b in bufs[:3]:
            pool.put(b)
        assert pool.nbytes == 3 * size
    assert pool.nbytes == size
