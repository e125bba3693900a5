"""bench/routing_stats.py: the routing summary the side-by-side suite's text relies on."""
from __future__ import annotations

import numpy as np

import engine
from bench.routing_stats import main, routing_stats


def test_routing_stats_count_every_decode_pick(checkpoint_dir):
    model = engine.load(checkpoint_dir("mixtral"))
    res = routing_stats(model, prompt_tokens=5, decode_tokens=7)
    assert "routed" not in vars(model._telemetry)          # the telemetry's own method again
    E, k = model.spec.num_experts, model.spec.top_k
    assert res["decode_tokens"] == 7 and res["experts"] == E and res["even_entropy_bits"] == np.log2(E)
    assert [r["layer"] for r in res["layers"]] == [i for i in range(model.spec.num_layers) if model.spec.moe_layers[i]]
    for r in res["layers"]:
        assert 0.0 <= r["entropy_bits"] <= np.log2(E) + 1e-9
        assert k / E <= r["busiest_share"] <= 1.0           # the busiest experts take at least their share
        assert 0.0 <= r["shared_with_previous"] <= k
    # The first decode token comes from the prompt's pass (routed as a batch): 6 single-token steps,
    # each counted once with its k picks, and nothing of the prompt's pass.
    assert all(r["picks"] == 6 * k for r in res["layers"])


def test_routing_stats_command_prints_a_row_per_layer(checkpoint_dir, capsys):
    assert main(["--model", str(checkpoint_dir("mixtral")), "--prompt-tokens", "4", "--decode-tokens", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("5 decode tokens") and len(out) == 2 + engine.load(
        checkpoint_dir("mixtral")).spec.moe_layers.count(True)
