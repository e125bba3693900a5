"""Dense (non-expert) matrices in their own format: quantized at load (dense_quant) or stored
pre-quantized by `mer-tui convert --dense-quant`, the two giving the same bytes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
import kernels
from engine import EngineError
from engine.loader import QUANTS
from engine.safetensors_file import SafetensorsFile, quantized_metadata
from engine.spec import load_spec
from engine.store import INDEX, RESIDENT_FILE, SafetensorsWriter
from engine.weights import dense_formats
from mer_tui.cli import FORMATS, build_parser
from mer_tui.convert import convert_checkpoint
from tests.checkpoints import build_checkpoint

# IDS, and the shared fixtures made visible to pytest in this module
from tests.streaming_fixtures import IDS, mixtral_bf16, reference, tiny_store  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
QUALITY_IDS = list(range(3, 120, 7))


def _gguf(m: kernels.QMatrix) -> str:
    """The GGUF format a matrix holds (the engine keeps block formats in their x8 layouts)."""
    return kernels.gguf_format(m.fmt)


def _rel_rms(a: np.ndarray, ref: np.ndarray) -> float:
    """As tests/test_quant_engine.py measures the cost of quantization."""
    return float(np.sqrt(np.mean((a - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """bf16 MoE checkpoints whose every row holds whole 32-weight blocks (q4_0 experts, q8_0 dense):
    a Mixtral (attention + experts + untied lm_head) and a Qwen2-MoE with a dense MLP layer and
    shared experts, so every kind of dense matrix is covered."""
    base = tmp_path_factory.mktemp("dense-src")
    return {
        "mixtral": build_checkpoint("mixtral", base / "mixtral", "bfloat16", intermediate_size=64),
        "qwen2_moe": build_checkpoint("qwen2_moe", base / "qwen2_moe", "bfloat16", moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64, intermediate_size=64),
    }


@pytest.fixture(scope="module")
def stores(sources, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """variant -> (plain store, store converted with --quant q4_0 --dense-quant q8_0)."""
    base = tmp_path_factory.mktemp("dense-stores")
    out = {}
    for variant, src in sources.items():
        plain, dense = base / f"{variant}-plain", base / f"{variant}-dense"
        convert_checkpoint(src, plain, quant="q4_0")
        convert_checkpoint(src, dense, quant="q4_0", dense_quant="q8_0")
        out[variant] = plain, dense
    return out


def _dense_names(folder: Path) -> set[str]:
    return {n + ".weight" for n in dense_formats(load_spec(folder), None)}


# ----------------------------------------------------------------------------- (a) same bytes
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_a_dense_quant_store_matches_quantizing_at_load(sources, stores, variant, monkeypatch):
    src, (_, store) = sources[variant], stores[variant]
    with engine.load(src, quant="q4_0", dense_quant="q8_0") as ref:
        want = ref.forward(IDS)
        ref_w = ref.weights
    # Loading the store needs no option, and converts nothing: no matrix goes through float.
    def no_float(*a, **k):
        raise AssertionError("a stored matrix was re-quantized at load")

    with monkeypatch.context() as mp:
        mp.setattr(kernels.QMatrix, "from_float", no_float)
        m = engine.load(store, ram_cache="64KiB")
    with m:
        got = m.forward(IDS)
        w = m.weights
    assert np.array_equal(got, want)
    lw, rl = w.layers, ref_w.layers
    assert all(_gguf(m) == "q8_0" for x in lw for m in (x.q, x.k, x.v, x.o))
    for x, r in zip(lw, rl):
        assert np.array_equal(x.q.data, r.q.data) and np.array_equal(x.o.data, r.o.data)
        for mats in ("dense", "shared"):
            if getattr(r, mats) is not None:
                assert [_gguf(q) for q in getattr(x, mats)] == ["q8_0"] * 3
                assert all(np.array_equal(q.data, p.data) for q, p in zip(getattr(x, mats), getattr(r, mats)))
        if r.router is not None:
            assert x.router.fmt == "bf16"       # routers keep their own format
    assert _gguf(w.lm_head) == "q8_0" and w.embed.fmt == "bf16"
    if variant == "qwen2_moe":   # the layers this variant exists to cover are there
        assert any(x.dense is not None for x in lw) and any(x.shared is not None for x in lw)
    # dense_quant equal to the stored format is a no-op (still no float copy) ...
    with monkeypatch.context() as mp:
        mp.setattr(kernels.QMatrix, "from_float", no_float)
        with engine.load(store, dense_quant="q8_0") as m:
            assert np.array_equal(m.forward(IDS), want)


def test_another_dense_quant_requantizes_a_stored_matrix(sources, stores):
    src, (_, store) = sources["mixtral"], stores["mixtral"]
    with engine.load(store, dense_quant="q4_0") as m:
        assert m.weights.layers[0].q.fmt == kernels.layout("q4_0", m.weights.layers[0].q.rows)
        assert _gguf(m.weights.lm_head) == "q8_0"
        requant = m.forward(IDS)
    with engine.load(src, quant="q4_0", dense_quant="q8_0") as m:
        stored = m.forward(IDS)
    assert not np.array_equal(requant, stored)      # it did change format, from the stored values
    assert _rel_rms(requant, stored) < 0.5


# ----------------------------------------------------------------------------- (b) the file
@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_b_dense_matrices_are_stored_as_u8_blocks(stores, variant):
    plain, dense = stores[variant]
    st, old = SafetensorsFile(dense / RESIDENT_FILE), SafetensorsFile(plain / RESIDENT_FILE)
    names = _dense_names(dense)
    assert set(st.tensors) == set(old.tensors) and names <= set(st.tensors)
    u8 = {n for n, i in st.tensors.items() if i.dtype == "U8"}
    assert u8 == names
    for n in names:
        i, o = st.tensors[n], old.tensors[n]
        cols = o.shape[1]
        # q8_0, held as q8_0x8 where the rows come in runs of eight (kernels.layout)
        assert i.fmt == kernels.layout("q8_0", o.shape[0])
        assert i.shape == (o.shape[0], cols // 32 * 34) and i.logical_shape == o.shape
        assert st.metadata["mer_tui.format:" + n] == i.fmt and st.metadata["mer_tui.cols:" + n] == str(cols)
    for n in set(st.tensors) - names:      # embedding, norms, routers: the source's bytes
        assert st.tensors[n].dtype == "BF16" and np.array_equal(st.read(n), old.read(n))
    # Only the resident file differs: the experts are the same bytes.
    assert (dense / "experts.bin").read_bytes() == (plain / "experts.bin").read_bytes()
    saved = sum(old.tensors[n].nbytes - st.tensors[n].nbytes for n in names)
    assert saved == sum(old.tensors[n].nbytes * (1 - 34 / 64) for n in names)
    before, after = (plain / RESIDENT_FILE).stat().st_size, (dense / RESIDENT_FILE).stat().st_size
    print(f"{variant}: model.safetensors {before} -> {after} bytes (header {old.data_start} -> {st.data_start})")
    assert after - st.data_start == before - old.data_start - saved    # the data: exactly what q8_0 saves
    assert after < before
    # Versions: a store with block-quantized resident tensors says so; a plain one stays version 1.
    idx, plain_idx = (json.loads((s / INDEX).read_text()) for s in (dense, plain))
    assert (idx["version"], idx["dense_quant"]) == (2, "q8_0")
    assert (plain_idx["version"], plain_idx["dense_quant"]) == (1, None)


def test_b_resident_bytes_on_a_larger_checkpoint(checkpoint_dir, tmp_path):
    """Figures on the quantization-quality checkpoint (hidden 256) in bf16: the resident file shrinks
    by the dense matrices' 34/64."""
    src = checkpoint_dir("quant", "bfloat16")
    plain = convert_checkpoint(src, tmp_path / "plain", quant="q4_0")
    dense = convert_checkpoint(src, tmp_path / "dense", quant="q4_0", dense_quant="q8_0")
    ratio = dense["resident_bytes"] / plain["resident_bytes"]
    print(f"quant checkpoint: model.safetensors {plain['resident_bytes']} -> {dense['resident_bytes']} bytes "
          f"({ratio:.3f})")
    # embedding (128 x 256 bf16) kept; q, k, v, o and lm_head at 34/64 of their bf16 bytes
    embed = 128 * 256 * 2
    assert abs(dense["resident_bytes"] - (embed + (plain["resident_bytes"] - embed) * 34 / 64)) < 16 << 10
    assert ratio < 0.6


# ----------------------------------------------------------------------------- (c) quality
def test_c_dense_q8_0_logits_stay_close_to_float32(checkpoint_dir, tmp_path):
    folder = checkpoint_dir("quant")           # float32, transformers' own init (as test_quant_engine)
    ref = engine.load(folder).forward(QUALITY_IDS)
    model = engine.load(folder, dense_quant="q8_0")
    assert _gguf(model.weights.layers[0].q) == "q8_0" and _gguf(model.weights.lm_head) == "q8_0"
    assert model.experts.get(0, [0])[0].gate.fmt == "f32"     # independent of the experts' format
    logits = model.forward(QUALITY_IDS)
    err = _rel_rms(logits, ref)
    agree = float(np.mean(logits.argmax(-1) == ref.argmax(-1)))
    # the store gives the same numbers
    convert_checkpoint(folder, tmp_path / "s", dense_quant="q8_0")
    with engine.load(tmp_path / "s") as m:
        assert np.array_equal(m.forward(QUALITY_IDS), logits)
    both = _rel_rms(engine.load(folder, quant="q4_0", dense_quant="q8_0").forward(QUALITY_IDS), ref)
    print(f"dense q8_0: relative RMS {err:.4f}, top-1 agreement {agree:.0%}; with q4_0 experts {both:.4f}")
    assert 0 < err < 0.02
    assert both < 0.10       # test_quant_engine's budget for q4_0 experts alone


# ----------------------------------------------------------------------------- (d) bad input
def _convert_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mer_tui", "convert", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("value, says", [("q9_9", "invalid choice: 'q9_9'"),
                                         ("q4_k", "--dense-quant q4_k: tensor")])
def test_d_bad_dense_quant_exits_2_and_writes_nothing(mixtral_bf16, tmp_path, value, says):  # noqa: F811
    # q9_9 is no format; q4_k's 256-weight super-blocks do not fit the 32-wide rows of this model
    dst = tmp_path / "out" / "dst"
    r = _convert_cli(str(mixtral_bf16), str(dst), "--dense-quant", value)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not dst.exists() and (not dst.parent.exists() or list(dst.parent.iterdir()) == [])


def test_d_engine_and_load_commands_refuse_unknown_formats(mixtral_bf16):  # noqa: F811
    with pytest.raises(EngineError, match=r"^dense_quant: unknown format 'q3' \(choose from q4_0"):
        engine.load(mixtral_bf16, dense_quant="q3")
    with pytest.raises(EngineError, match="quant_dense.*give dense_quant alone"):
        engine.load(mixtral_bf16, quant="q8_0", quant_dense=True, dense_quant="bf16")
    with pytest.raises(EngineError, match=r"--dense-quant: unknown format 'q3'"):
        convert_checkpoint(mixtral_bf16, mixtral_bf16.parent / "never", dense_quant="q3")
    assert not (mixtral_bf16.parent / "never").exists()
    for argv in (["generate", "--prompt", "x"], ["bench"], ["launch"]):
        r = subprocess.run([sys.executable, "-m", "mer_tui", *argv, "--model", str(mixtral_bf16),
                            "--dense-quant", "q3"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        lines = r.stderr.strip().splitlines()
        cmd = argv[0]
        assert r.returncode == 2 and len(lines) == 1 and "--dense-quant" in lines[0], (cmd, r.stderr)
    assert FORMATS == QUANTS       # the CLI's choices are the engine's formats


def test_quant_dense_keeps_its_meaning(sources):
    src = sources["mixtral"]
    with engine.load(src, quant="q8_0", quant_dense=True) as m:
        assert _gguf(m.weights.layers[0].q) == "q8_0" and _gguf(m.experts.get(0, [0])[0].gate) == "q8_0"
        old = m.forward(IDS)
    with engine.load(src, quant="q8_0", dense_quant="q8_0") as m:
        assert np.array_equal(m.forward(IDS), old)


# ----------------------------------------------------------------------------- the CLI plumbing
@pytest.mark.parametrize("command", ["generate", "bench", "launch"])
def test_load_commands_pass_dense_quant(stores, sources, command):
    from mer_tui import launch
    from mer_tui.generate import load_from_args

    src = sources["mixtral"]
    argv = {"generate": ["generate", "--model", str(src), "--prompt", "x"],
            "bench": ["bench", "--model", str(src)],
            "launch": ["launch", "--model", str(src)]}[command]
    args = build_parser().parse_args(argv + ["--dense-quant", "q8_0", "--quant", "q4_0"])
    if command == "launch":
        loader, info, _ = launch.plan(args)
        assert info.quant == "q4_0 + dense q8_0"     # what the header shows
        model = loader(lambda *a: None)
    else:
        model = load_from_args(args)
    with model:
        assert _gguf(model.weights.layers[0].q) == "q8_0" and _gguf(model.weights.lm_head) == "q8_0"
        gate = model.experts.get(0, [0])[0].gate
        assert gate.fmt == kernels.layout("q4_0", gate.rows) and _gguf(gate) == "q4_0"
    args = build_parser().parse_args(argv)
    assert args.dense_quant is None


def test_cli_convert_with_dense_quant(sources, tmp_path):
    src, dst = sources["mixtral"], tmp_path / "s"
    r = _convert_cli(str(src), str(dst), "--quant", "q8_0", "--dense-quant", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "resident weights (q8_0)" in r.stdout
    with engine.load(dst) as m, engine.load(src, quant="q8_0", dense_quant="q8_0") as ref:
        assert _gguf(m.weights.layers[0].q) == "q8_0"
        assert np.array_equal(m.forward(IDS), ref.forward(IDS))


# ----------------------------------------------------------------------------- (e) old stores
def test_e_an_old_style_store_still_loads(tiny_store, reference, mixtral_bf16, tmp_path):  # noqa: F811
    """A store as the converter wrote it before --dense-quant: version 1, bf16 dense, no such keys."""
    old = tmp_path / "old"
    shutil.copytree(tiny_store, old)
    index = json.loads((old / INDEX).read_text())
    index.pop("dense_quant", None)
    (old / INDEX).write_text(json.dumps(index))
    st = SafetensorsFile(old / RESIDENT_FILE)
    assert index["version"] == 1 and not any(k.startswith("mer_tui.") for k in st.metadata)
    assert {i.dtype for i in st.tensors.values()} == {"BF16"}
    with engine.load(old) as m:
        assert m.weights.layers[0].q.fmt == "bf16"
        assert np.array_equal(m.forward(IDS), reference[0])
    # and dense_quant quantizes its bf16 matrices at load, as it does a Hugging Face folder's
    with engine.load(old, dense_quant="q8_0") as m, engine.load(mixtral_bf16, dense_quant="q8_0") as ref:
        assert _gguf(m.weights.layers[0].q) == "q8_0"
        assert np.array_equal(m.forward(IDS), ref.forward(IDS))


# ----------------------------------------------------------------------------- defects named
def _one_tensor_file(path: Path, dtype: str, shape: tuple[int, int], metadata: dict) -> Path:
    nbytes = int(np.prod(shape)) * (1 if dtype == "U8" else 2)
    st = SafetensorsWriter(path, [("w.weight", dtype, shape, nbytes)], {"format": "pt", **metadata})
    st.begin("w.weight")
    st.write(bytes(nbytes))
    st.close()
    return path


@pytest.mark.parametrize("dtype, shape, metadata, says", [
    ("U8", (4, 34), quantized_metadata("w.weight", "q8_0", 64), "q8_0 rows of 64 weights take 68 bytes"),
    ("U8", (4, 34), quantized_metadata("w.weight", "q5_9", 32), "unknown block format 'q5_9'"),
    ("U8", (4, 34), quantized_metadata("w.weight", "bf16", 32), "unknown block format 'bf16'"),
    ("U8", (4, 34), {"mer_tui.format:w.weight": "q8_0"}, "mer_tui.cols:w.weight should be a positive"),
    ("U8", (4, 34), {"mer_tui.format:w.weight": "q8_0", "mer_tui.cols:w.weight": "-32"}, "positive"),
    ("BF16", (4, 32), quantized_metadata("w.weight", "q8_0", 32), "stored as BF16 [4, 32]"),
    ("U8", (4, 34), quantized_metadata("x.weight", "q8_0", 32), "names a tensor the file does not hold"),
    ("U8", (4, 34), {"mer_tui.cols:w.weight": "32"}, "without mer_tui.format:w.weight"),
])
def test_bad_block_metadata_is_named(tmp_path, dtype, shape, metadata, says):
    path = _one_tensor_file(tmp_path / "m.safetensors", dtype, shape, metadata)
    with pytest.raises(EngineError, match="m.safetensors") as e:
        SafetensorsFile(path)
    assert says in str(e.value)


def test_u8_without_metadata_is_refused_by_name(tmp_path):
    from engine.checkpoint import Checkpoint

    _one_tensor_file(tmp_path / "m.safetensors", "U8", (4, 34), {})
    with pytest.raises(EngineError, match=r"w.weight has dtype U8; weights must be F32, F16 or BF16"):
        Checkpoint(tmp_path).read("w.weight", (4, 34))
    good = _one_tensor_file(tmp_path / "m.safetensors", "U8", (4, 34), quantized_metadata("w.weight", "q8_0", 32))
    info = SafetensorsFile(good).tensors["w.weight"]
    assert (info.fmt, info.logical_shape, info.shape) == ("q8_0", (4, 32), (4, 34))
    with pytest.raises(EngineError, match=r"has shape \[4, 32\] \(q8_0 blocks\), expected \[4, 64\]"):
        Checkpoint(tmp_path).read("w.weight", (4, 64))
