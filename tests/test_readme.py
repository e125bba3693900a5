"""The README's Quickstart stays true: two commands, and CI runs the second one."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_is_exactly_two_commands():
    install_and_launch, install_and_test = _quickstart_commands()
    assert "pip install -e ." in install_and_launch and install_and_launch.endswith("mer-tui launch")
    assert "'.[test]'" in install_and_test and "pytest" in install_and_test


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = _quickstart_commands()[1]
    # CI may quieten pip, nothing else: the command is otherwise verbatim.
    assert test_command.replace("pip install -e", "pip install -q -e") in ci


def test_console_script_is_declared():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["mer-tui"] == "mer_tui.cli:main"
    assert "torch==2.13.0" in meta["project"]["optional-dependencies"]["test"]
    runtime = " ".join(meta["project"]["dependencies"])
    assert "torch" not in runtime and "transformers" not in runtime
