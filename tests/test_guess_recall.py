"""bench/guess_recall.py: the recall figures docs/BENCHMARKS.md gives for the prefetch's guesses."""
from __future__ import annotations

import json

import pytest

import engine
from bench.guess_recall import PREDICTORS, main, recall, record
from mer_tui.bench import bench_inputs


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])   # the second has a dense layer between its two MoE ones
def test_the_routers_own_input_is_recalled_whole(checkpoint_dir, variant):
    with engine.load(checkpoint_dir(variant)) as model:
        runs = [lambda p=p, c=c: model.generate(p, max_new_tokens=6, ignore_eos=True, forced=c)
                for p, c in bench_inputs(model.spec.vocab_size, 5, 6, 2)]
        steps = record(model, runs)
        assert "_moe" not in vars(model) and "_attention" not in vars(model)   # the methods again
        assert "routed" not in vars(model._telemetry)
        # two sequences of 5 single-token steps, each opened by an empty mark
        assert len(steps) == 2 + 2 * 5 and steps[0] == {} and steps[6] == {}
        got = recall(model, steps)
    # Were a step's or a layer's records mixed up, the router would not see its own input here.
    assert got["the layer's own input"] == [1.0, 1.0, 1.0]
    assert set(got) <= {name for name, _, _ in PREDICTORS} and len(got) >= 4
    for r in got.values():
        assert all(0.0 <= v <= 1.0 for v in r) and r == sorted(r)   # more guesses recall no less


def test_guess_recall_command(checkpoint_dir, capsys):
    folder, dense = str(checkpoint_dir("mixtral")), str(checkpoint_dir("llama"))
    capsys.readouterr()   # building the checkpoints writes progress to stderr
    assert main(["--model", folder, "--prompts", "1", "--prompt-tokens", "4", "--decode-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["top_k"] == [2, 4, 6] and out["recall"]["the layer's own input"] == [1.0, 1.0, 1.0]
    assert main(["--model", dense, "--decode-tokens", "3"]) == 2
    assert capsys.readouterr().err.strip() == "guess_recall: the model has no MoE layer"
