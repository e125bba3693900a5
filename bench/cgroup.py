"""A memory cgroup for one benchmark child: its RAM *and the page cache it fills* capped together.

Why a cgroup and not just a smaller --ram-cache: llama.cpp with mmap keeps weights in the page
cache, which no per-process limit sees; a memory cgroup charges page-cache pages to the group
that read them, so "2 GiB" means the same thing for both engines.  This machine mounts cgroup v1
(`mount | grep cgroup`: /sys/fs/cgroup/memory); v2 (memory.max) is handled too.

Needs root.  `MemoryCgroup.create` returns None with a reason when it cannot be made, and the
caller runs without the cap and says so.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class MemoryCgroup:
    """One cgroup with a memory limit; `join_fn` puts a child into it between fork and exec."""

    def __init__(self, path: Path, v2: bool):
        self.path = path
        self.v2 = v2

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> tuple[MemoryCgroup | None, str]:
        """(cgroup, "") or (None, why not)."""
        if os.geteuid() != 0:
            return None, "not root: cannot create a memory cgroup"
        if (V1_ROOT / "memory.limit_in_bytes").exists():
            path = V1_ROOT / name
            try:
                if path.exists():
                    cls(path, False).remove()
                path.mkdir()
                _write(path / "memory.limit_in_bytes", str(limit_bytes))
                # No swap here, but where there is some, cap it too so "over the limit" means re-reads.
                if (path / "memory.memsw.limit_in_bytes").exists():
                    _write(path / "memory.memsw.limit_in_bytes", str(limit_bytes))
            except OSError as e:
                return None, f"cannot set up {path}: {e}"
            return cls(path, False), ""
        for root in V2_ROOTS:
            controllers = root / "cgroup.controllers"
            if controllers.exists() and "memory" in controllers.read_text().split():
                path = root / name
                try:
                    if path.exists():
                        cls(path, True).remove()
                    path.mkdir()
                    _write(path / "memory.max", str(limit_bytes))
                    if (path / "memory.swap.max").exists():
                        _write(path / "memory.swap.max", "0")
                except OSError as e:
                    return None, f"cannot set up {path}: {e}"
                return cls(path, True), ""
        return None, "no memory cgroup controller mounted"

    def join_fn(self):
        """A preexec_fn for subprocess.Popen: the child enters the cgroup before it execs."""
        procs = str(self.path / "cgroup.procs")

        def join() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return join

    def reset_peak(self) -> None:
        if not self.v2:
            try:
                _write(self.path / "memory.max_usage_in_bytes", "0")
            except OSError:
                pass

    def peak_bytes(self) -> int | None:
        """Peak usage (process memory + page cache charged to the group) since reset_peak."""
        return _read_int(self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))

    def oom_kills(self) -> int:
        """How many processes the kernel killed in this group for memory (cumulative)."""
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def release_cache(self) -> None:
        """Drop the page cache charged to the group, so the next child starts from zero."""
        if not self.v2 and (self.path / "memory.force_empty").exists():
            try:
                _write(self.path / "memory.force_empty", "0")
            except OSError:
                pass

    def remove(self) -> None:
        """Remove the group (waiting briefly for exited children to leave it)."""
        for _ in range(50):
            try:
                if self.path.exists() and not (self.path / "cgroup.procs").read_text().strip():
                    self.release_cache()
                    self.path.rmdir()
                    return
            except OSError:
                pass
            if not self.path.exists():
                return
            time.sleep(0.1)


def drop_page_cache() -> str:
    """Flush dirty pages and drop the whole page cache; "" on success, else why not."""
    os.sync()
    try:
        _write(Path("/proc/sys/vm/drop_caches"), "3")
        return ""
    except OSError as e:
        return f"cannot drop the page cache: {e}"
