"""Compile the io_uring cffi module once per user and Python, and load it.

Built into platformdirs.user_cache_dir("mer-tui")/cffi/, keyed by a hash of the source and the
interpreter, in a temporary folder renamed into place, so concurrent first uses (two test workers,
two terminals) never load a half-written library.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from ._uring_c import CDEF, SOURCE

_lock = threading.Lock()
_module: ModuleType | None = None
_error: str | None = None


def cache_dirs() -> list[Path]:
    """Where the module may live: the per-user cache (MER_TUI_CACHE_DIR overrides it, as for the kernels),
    then a per-user folder under the temporary directory for when the cache is not writable."""
    env = os.environ.get("MER_TUI_CACHE_DIR")
    if env:
        first = Path(env)
    else:
        from platformdirs import user_cache_dir

        first = Path(user_cache_dir("mer-tui"))
    return [first / "cffi", Path(tempfile.gettempdir()) / f"mer-tui-{os.getuid()}" / "cffi"]


def _name() -> str:
    key = "\0".join([SOURCE, CDEF, sys.version, sysconfig.get_platform()]).encode()
    return "_mer_uring_" + hashlib.sha256(key).hexdigest()[:16]


def _build(name: str, out: Path) -> Path:
    import cffi

    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source(name, SOURCE, extra_compile_args=["-O2"])
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".build-", dir=out))
    try:
        built = Path(ffi.compile(tmpdir=str(tmp), verbose=False))
        final = out / built.name
        os.replace(built, final)   # atomic: a reader sees the old library or the whole new one
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _find_or_build(name: str) -> Path:
    dirs = cache_dirs()
    for d in dirs:
        found = sorted(d.glob(name + ".*.so")) + sorted(d.glob(name + ".so")) if d.is_dir() else []
        if found:
            return found[0]
    for d in dirs:
        try:
            return _build(name, d)
        except PermissionError:
            continue   # read-only home or sandbox: try the next place
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.ENOTDIR, errno.EACCES):
                raise
    raise OSError(f"no writable directory for the io_uring module (tried {', '.join(map(str, dirs))})")


def load_uring() -> ModuleType:
    """The compiled module (attributes ffi, lib); raises OSError saying why it cannot be had."""
    global _module, _error
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise OSError(_error)
        name = _name()
        try:
            path = _find_or_build(name)
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
        except Exception as e:  # compiler or headers missing, cffi/setuptools errors: all mean "no uring"
            first = str(e).splitlines()[0] if str(e) else ""
            _error = f"cannot build the io_uring module ({type(e).__name__}: {first})"
            raise OSError(_error) from None
        _module = mod
        return mod
