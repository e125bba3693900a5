"""Shared fixtures: tiny random checkpoints of every architecture, built with transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.checkpoints import VARIANTS, build_checkpoint, build_tokenizer


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    """build(variant, dtype="float32") -> folder of a saved random checkpoint (cached per session)."""
    made: dict[tuple[str, str], Path] = {}

    def build(variant: str, dtype: str = "float32") -> Path:
        key = (variant, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"{variant}-{dtype}")
            # the quantization-quality checkpoint keeps transformers' own init (see build_checkpoint)
            build_checkpoint(variant, out, dtype, decisive=variant != "quant")
            made[key] = out
        return made[key]

    return build


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """A tiny Mixtral with a byte-level BPE tokenizer and a chat template."""
    out = tmp_path_factory.mktemp("chat-model")
    tok = build_tokenizer(out)
    build_checkpoint("mixtral", out, "float32", vocab_size=tok.get_vocab_size(),
                     eos_token_id=tok.token_to_id("<|end|>"))
    return out


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The TUI tests' tiny Mixtral with a byte tokenizer (tests/tui_fixtures.py)."""
    from tests.tui_fixtures import tiny_model_dir

    return tiny_model_dir(tmp_path_factory)


@pytest.fixture
def model(model_dir):
    """A fresh engine model on model_dir whose expert source records the settings calls."""
    from tests.tui_fixtures import load_recording_model

    m = load_recording_model(model_dir)
    yield m
    m.close()


def pytest_report_header(config):
    return f"checkpoint variants: {', '.join(VARIANTS)}"


__all__ = ["json"]
