"""DESIGN.md: dependencies point one way, mer_tui → engine → kernels.  The engine and the kernels must
import (and load a model) in a process where textual and mer_tui cannot be imported at all."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCKER = textwrap.dedent("""
    import sys

    class Blocker:
        BLOCKED = ("textual", "textual_plotext", "plotext", "mer_tui")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} must not be imported by engine or kernels")
            return None

    sys.meta_path.insert(0, Blocker())
    import importlib
    import pkgutil

    import engine
    import kernels

    # Every module of both packages, so a new one that reaches for the UI is caught too.
    for pkg in (engine, kernels):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(mod.name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in Blocker.BLOCKED)
    assert not leaked, leaked
    print("ok")
""")


def test_engine_and_kernels_import_without_textual():
    r = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith("ok")


def test_the_blocker_blocks():
    # Guard against a blocker that silently lets everything through.
    code = BLOCKER.replace("import engine\n", "import engine\nimport textual\n", 1)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "must not be imported" in r.stderr
