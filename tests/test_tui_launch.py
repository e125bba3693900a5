"""`mer-tui launch`: which model it opens, and bad input ending before the screen is taken."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import engine
from mer_tui import launch
from mer_tui.cli import CliError, build_parser, main


def args(*argv: str):
    return build_parser().parse_args(["launch", *argv])


def test_model_path_loads_with_the_options_and_reports_progress(model_dir):
    loader, info, budget = launch.plan(args("--model", str(model_dir), "--policy", "lfu", "--no-prefetch"))
    assert info.kind == "model" and info.name == model_dir.name and info.note is None and budget is None
    seen = []
    with loader(lambda *a: seen.append(a)) as model:
        assert isinstance(model, engine.Model) and model.prefetch_enabled is False
    assert seen and seen[-1][0] == "experts" and seen[-1][1] == seen[-1][2]


def test_stress_demo_builds_through_demo_models_with_progress(model_dir, monkeypatch):
    calls = []

    def stress_model(progress):
        progress(5, 10)
        calls.append("built")
        return model_dir

    monkeypatch.setitem(sys.modules, "mer_tui.demo_models", types.SimpleNamespace(stress_model=stress_model))
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: object())
    loader, info, _ = launch.plan(args("--demo", "stress"))
    assert info.kind == "demo-stress" and "Random weights" in info.note and "--model PATH" in info.note
    seen = []
    with loader(lambda *a: seen.append(a)) as model:
        # No --ram-cache: the demo gets a budget below its size, so the SSD has work to do.
        budget = model.telemetry()["tiers"]["ram"]["bytes_budget"]
        assert budget is not None and budget < sum(p.stat().st_size for p in Path(model_dir).iterdir())
    assert calls == ["built"] and seen[0] == ("build", 5, 10)
    assert info.path == str(model_dir)


def test_chat_demo_is_found_or_named_missing(model_dir, monkeypatch):
    monkeypatch.setattr(launch, "demo_chat_path", lambda: None)
    with pytest.raises(CliError, match="chat demo model is not in this installation"):
        launch.plan(args())
    monkeypatch.setattr(launch, "demo_chat_path", lambda: Path(model_dir))
    loader, info, budget = launch.plan(args())
    assert info.kind == "demo-chat" and "Tiny demo model" in info.note and "--model PATH" in info.note
    # the demo streams: by default its RAM budget is half its size, and the model really gets it
    size = sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.is_file())
    assert budget == int(size * launch.CHAT_BUDGET_FRACTION)
    model = loader(lambda *a: None)
    assert model.telemetry()["tiers"]["ram"]["bytes_budget"] == budget
    model.close()
    _, _, chosen = launch.plan(args("--ram-cache", "1MiB"))
    assert chosen == 1024**2


@pytest.mark.parametrize("argv,message", [
    (["--model", "/no/such/folder"], "no such model folder"),
    (["--ram-cache", "12 parsecs"], "ram-cache"),
    (["--policy", "fifo"], "--policy: unknown policy 'fifo'"),
    (["--quant", "q3_x"], "--quant: unknown format"),
    (["--threads", "0"], "--threads: must be >= 1"),
    (["--ctx-size", "64", "--max-new-tokens", "64"], "--ctx-size: must be more than --max-new-tokens (64), got 64"),
    (["--resume", "/no/such/chat.json"], "--resume: no such file: /no/such/chat.json"),
])
def test_bad_input_is_one_line_and_exit_2_before_the_app_starts(argv, message, capsys, model_dir):
    if argv[0] != "--model":
        argv = ["--model", str(model_dir), *argv]
    assert main(["launch", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("extra,shift", [([], False), (["--context-shift"], True)])
def test_the_chat_options_reach_the_session(model_dir, monkeypatch, extra, shift):
    import mer_tui.app

    seen = {}

    class ScreenlessApp:   # run_launch's app, without taking the terminal
        def __init__(self, session, export_dir):
            seen["settings"] = session.settings

        def run(self):
            pass

    monkeypatch.setattr(mer_tui.app, "MerApp", ScreenlessApp)
    argv = ["launch", "--model", str(model_dir), "--ctx-size", "300", "--temperature", "0", "--seed", "4", *extra]
    assert main(argv) == 0
    s = seen["settings"]
    assert (s.context, s.context_shift, s.temperature, s.seed) == (300, shift, 0.0, 4)


def test_a_resumed_conversation_reaches_the_session(model_dir, monkeypatch, tmp_path):
    import json

    import mer_tui.app

    seen = {}

    class ScreenlessApp:
        def __init__(self, session, export_dir):
            seen["session"] = session

        def run(self):
            pass

    monkeypatch.setattr(mer_tui.app, "MerApp", ScreenlessApp)
    talk = [{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more?"}]
    (tmp_path / "chat.json").write_text(json.dumps({"conversation": talk}))
    assert main(["launch", "--model", str(model_dir), "--resume", str(tmp_path / "chat.json")]) == 0
    s = seen["session"]
    assert s.system_prompt == "be kind" and s.messages == talk[1:3] and s.draft == "more?"
    # --system replaces the file's
    argv = ["launch", "--model", str(model_dir), "--resume", str(tmp_path / "chat.json")]
    assert main([*argv, "--system", "terse"]) == 0
    assert seen["session"].system_prompt == "terse" and seen["session"].messages == talk[1:3]
