"""Quantized experts in the engine: the cost in quality against float32, bounded."""
from __future__ import annotations

import numpy as np
import pytest

import engine
import kernels
from kernels import formats

IDS = list(range(3, 120, 7))
# Relative RMS error of the logits allowed per format when the experts are quantized (issue 3's
# budget).  With quant_dense every attention matrix is quantized too; one q4_0 matrix alone has ~8%
# RMS error on Gaussian weights, so a stack of them cannot meet the experts' budget: measured on this
# checkpoint q8_0 1.4%, q4_0 19.8%, q4_k 19.1%; the dense budget below is that with a margin.
BUDGET = {"q8_0": 0.01, "q4_0": 0.10, "q4_k": 0.10}
DENSE_BUDGET = {"q8_0": 0.02, "q4_0": 0.25, "q4_k": 0.25}


def _rel_rms(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


@pytest.fixture(scope="module")
def quant_model(checkpoint_dir):
    folder = checkpoint_dir("quant")
    return folder, engine.load(folder).forward(IDS)


@pytest.mark.parametrize("fmt", list(BUDGET))
@pytest.mark.parametrize("dense", [False, True])
def test_quantized_logits_stay_close(quant_model, fmt, dense):
    folder, ref = quant_model
    model = engine.load(folder, quant=fmt, quant_dense=dense)
    bundle = model.experts.get(0, [0])[0]
    # q4_0 is held interleaved by eight rows (q4_0x8) where the rows allow: the same bytes, moved
    assert all(m.fmt == kernels.layout(fmt, m.rows) for m in (bundle.gate, bundle.up, bundle.down))
    assert (kernels.gguf_format(model.weights.layers[0].q.fmt) == fmt) == dense
    logits = model.forward(IDS)
    err = _rel_rms(logits, ref)
    agree = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
    print(f"{fmt} dense={dense}: relative RMS {err:.4f}, top-1 agreement {agree:.0%}")
    assert err < (DENSE_BUDGET if dense else BUDGET)[fmt]


def test_q4_0_experts_are_q4_0s_bytes_interleaved(quant_model):
    folder, _ = quant_model
    plain = engine.load(folder).experts.get(0, [1])[1]
    model = engine.load(folder, quant="q4_0", dense_quant="q4_0")
    x8 = model.experts.get(0, [1])[1]
    for p, q in zip((plain.gate, plain.up, plain.down), (x8.gate, x8.up, x8.down)):
        assert q.fmt == "q4_0x8"
        assert np.array_equal(formats.deinterleave(q.data, q.fmt), kernels.quantize(p.to_float(), "q4_0"))
    assert model.weights.layers[0].q.fmt == "q4_0x8" and model.weights.lm_head.fmt == "q8_0x8"


def test_bf16_checkpoint_keeps_bf16_without_a_float32_copy(checkpoint_dir):
    model = engine.load(checkpoint_dir("mixtral", "bfloat16"))
    b = model.experts.get(0, [0])[0]
    assert b.gate.fmt == "bf16" and b.gate.data.dtype == np.uint8
    assert b.gate.nbytes == b.gate.rows * b.gate.cols * 2
    assert model.weights.layers[0].q.fmt == "bf16"


def test_a_shape_the_format_cannot_hold_is_named(checkpoint_dir):
    # hidden 32 is not a multiple of q4_k's 256-weight super-block
    with pytest.raises(engine.EngineError, match=r"q4_k.*experts\.0\.w1|experts\.0\.w1.*q4_k"):
        engine.load(checkpoint_dir("mixtral"), quant="q4_k")
