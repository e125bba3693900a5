"""`mer-tui convert` and the expert store format: layout, checksums, staging, refusals, flat memory."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

import engine
import kernels
from engine import EngineError
from engine.checkpoint import Checkpoint
from engine.safetensors_file import SafetensorsFile
from engine.spec import load_spec
from engine.store import ALIGN, EXPERT_FILE, INDEX, SafetensorsWriter, is_store, open_store
from mer_tui.convert import convert_checkpoint
from tests import streaming_fixtures as fx
from tests.streaming_fixtures import IDS

# the shared fixtures, made visible to pytest in this module
mixtral_bf16, reference, tiny_store = fx.mixtral_bf16, fx.reference, fx.tiny_store

ROOT = Path(__file__).resolve().parents[1]


def test_store_layout(tiny_store, mixtral_bf16):
    index = json.loads((tiny_store / INDEX).read_text())
    assert index["format"] == "mer-tui expert store" and index["version"] == 1 and index["alignment"] == ALIGN
    assert index["formats"] == ["bf16"] and index["checksum"] == "crc32"
    spec = load_spec(mixtral_bf16)
    raw = (tiny_store / EXPERT_FILE).read_bytes()
    assert len(raw) % ALIGN == 0
    src = Checkpoint(mixtral_bf16)
    assert len(index["bundles"]) == spec.num_layers * spec.num_experts
    for b in index["bundles"]:
        assert b["offset"] % ALIGN == 0
        extent = raw[b["offset"]:b["offset"] + b["size"]]
        assert zlib.crc32(extent) == b["crc32"]
        names = spec.expert_names(b["layer"], b["expert"])
        for part, name in zip(b["parts"], names):   # gate, up, down back to back, the source's bytes
            want = src.read(name + ".weight")[0].tobytes()
            assert extent[part["offset"]:part["offset"] + part["nbytes"]] == want
    # The resident weights: every non-expert tensor, same names, same bytes; no expert tensor.
    st = SafetensorsFile(tiny_store / "model.safetensors")
    experts = {n + ".weight" for i in range(spec.num_layers) for e in range(spec.num_experts)
               for n in spec.expert_names(i, e)}
    assert set(st.tensors) == set(src.where) - experts
    for name in st.tensors:
        assert np.array_equal(st.read(name), src.read(name)[0])
    for f in ("config.json", "generation_config.json"):
        assert (tiny_store / f).read_bytes() == (mixtral_bf16 / f).read_bytes()
    assert is_store(tiny_store) and not is_store(mixtral_bf16)


def test_a_store_loads_and_matches_the_checkpoint(tiny_store, reference):
    with engine.load(tiny_store) as m:
        assert m.experts.backend in ("uring", "pread")
        logits = m.forward(IDS)
        tokens = list(m.generate(IDS[:4], max_new_tokens=12))
    assert np.array_equal(logits, reference[0]) and tokens == reference[1]


def _quant_ok(fmt: str) -> bool:
    try:
        kernels.quantize(np.ones((1, 256), np.float32), fmt)
        return True
    except ValueError:
        return False


@pytest.fixture(scope="module")
def mixtral_64(tmp_path_factory) -> Path:
    """A Mixtral whose expert rows are a multiple of the 32-weight blocks of q8_0 and q4_0."""
    from tests.checkpoints import build_checkpoint

    return build_checkpoint("mixtral", tmp_path_factory.mktemp("m64"), "bfloat16", intermediate_size=64)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_quantized_store_matches_quantizing_at_load(mixtral_64, tmp_path, quant):
    if not _quant_ok(quant):
        pytest.skip(f"kernels cannot quantize to {quant} yet")
    dst = tmp_path / "q"
    convert_checkpoint(mixtral_64, dst, quant=quant)
    # every expert matrix here has a multiple of eight rows: q4_0 is stored as q4_0x8 (kernels.layout)
    assert json.loads((dst / INDEX).read_text())["formats"] == [kernels.layout(quant, 8)]
    with engine.load(mixtral_64, quant=quant) as ref, engine.load(dst, ram_cache="64KiB") as m:
        assert np.array_equal(m.forward(IDS), ref.forward(IDS))
    # Quantizing at load from a bf16 store gives the same bytes as converting with --quant.
    plain = tmp_path / "plain"
    convert_checkpoint(mixtral_64, plain)
    with engine.load(plain, quant=quant, ram_cache="64KiB") as m, engine.load(dst) as q:
        assert np.array_equal(m.forward(IDS), q.forward(IDS))


def test_refuses_to_overwrite_without_force(mixtral_bf16, tmp_path):
    dst = tmp_path / "s"
    convert_checkpoint(mixtral_bf16, dst)
    marker = dst / "index.json"
    before = marker.stat().st_mtime_ns
    with pytest.raises(EngineError, match=r"already exists \(use --force"):
        convert_checkpoint(mixtral_bf16, dst)
    assert marker.stat().st_mtime_ns == before
    convert_checkpoint(mixtral_bf16, dst, force=True)
    assert is_store(dst) and sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_cli_convert(mixtral_bf16, tmp_path):
    dst = tmp_path / "cli"
    cmd = [sys.executable, "-m", "mer_tui", "convert", str(mixtral_bf16), str(dst)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "expert bundles" in r.stdout and is_store(dst)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0] and "--force" in lines[0], r.stderr
    r = subprocess.run(cmd + ["--force"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_an_interrupted_convert_leaves_nothing(mixtral_bf16, tmp_path, monkeypatch):
    from engine.store import ExpertFileWriter

    real = ExpertFileWriter.end_bundle
    calls = []

    def dying(self):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(ExpertFileWriter, "end_bundle", dying)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(mixtral_bf16, tmp_path / "s")
    assert list(tmp_path.iterdir()) == []    # neither s nor s.tmp-*


def test_bad_sources_are_named(mixtral_bf16, tiny_store, tmp_path, checkpoint_dir):
    with pytest.raises(EngineError, match="no such checkpoint folder"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "x")
    with pytest.raises(EngineError, match="already an expert store"):
        convert_checkpoint(tiny_store, tmp_path / "x")
    with pytest.raises(EngineError, match="has no experts"):
        convert_checkpoint(checkpoint_dir("llama"), tmp_path / "x")
    with pytest.raises(EngineError, match="must not be the source"):
        convert_checkpoint(mixtral_bf16, mixtral_bf16 / "inside")
    with pytest.raises(EngineError, match="--quant"):
        convert_checkpoint(mixtral_bf16, tmp_path / "x", quant="q9_9")
    assert not (tmp_path / "x").exists()


def _copy_store(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_index(store: Path, edit) -> None:
    index = json.loads((store / INDEX).read_text())
    edit(index)
    (store / INDEX).write_text(json.dumps(index))


def test_a_store_of_another_version_is_refused(tiny_store, tmp_path):
    s = _copy_store(tiny_store, tmp_path / "s")
    _edit_index(s, lambda i: i.update(version=3))   # 2 is a store with quantized dense matrices
    with pytest.raises(EngineError, match=r"index.json: expert store format version 3; this engine reads "
                                          r"versions 1, 2\. Convert the model again"):
        engine.load(s)


def test_a_missing_bundle_is_named(tiny_store, tmp_path):
    s = _copy_store(tiny_store, tmp_path / "s")
    _edit_index(s, lambda i: i.update(bundles=[b for b in i["bundles"]
                                               if (b["layer"], b["expert"]) != (2, 3)]))
    with pytest.raises(EngineError, match="missing bundle for layer 2 expert 3"):
        engine.load(s)


def test_a_truncated_expert_file_is_named_at_open(tiny_store, tmp_path):
    s = _copy_store(tiny_store, tmp_path / "s")
    size = (s / EXPERT_FILE).stat().st_size
    with open(s / EXPERT_FILE, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(EngineError, match=r"experts.bin: truncated: layer \d+ expert \d+ ends at byte"):
        open_store(s, load_spec(s))


def test_index_shape_mismatch_is_named(tiny_store, tmp_path):
    s = _copy_store(tiny_store, tmp_path / "s")
    _edit_index(s, lambda i: i["bundles"][0]["parts"][2].update(shape=[1, 2]))
    with pytest.raises(EngineError, match="layer 0 expert 0 down: shape"):
        engine.load(s)


# ------------------------------------------------------------------------------------- memory
def _big_source(folder: Path, hidden: int, width: int, layers: int, experts: int) -> int:
    """A Mixtral-shaped checkpoint with random expert bytes, written piecewise; returns its largest tensor."""
    folder.mkdir()
    cfg = dict(model_type="mixtral", vocab_size=64, hidden_size=hidden, intermediate_size=width,
               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
               num_local_experts=experts, num_experts_per_tok=2)
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = [("model.embed_tokens.weight", (64, hidden)), ("lm_head.weight", (64, hidden))]
    for i in range(layers):
        for e in range(experts):
            for w, shape in (("w1", (width, hidden)), ("w2", (hidden, width)), ("w3", (width, hidden))):
                tensors.append((f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight", shape))
    st = SafetensorsWriter(folder / "model.safetensors",
                           [(n, "BF16", s, 2 * s[0] * s[1]) for n, s in tensors])
    rng = np.random.default_rng(0)
    for n, s in tensors:
        st.begin(n)
        st.write(rng.integers(0, 1 << 15, s, dtype=np.uint16))
    st.close()
    return max(2 * s[0] * s[1] for _, s in tensors)


def test_convert_memory_stays_flat(tmp_path):
    """Peak RSS while converting a model 24x larger than its largest tensor stays under 2x that tensor."""
    largest = _big_source(tmp_path / "src", hidden=1024, width=4096, layers=2, experts=4)
    total = sum(p.stat().st_size for p in (tmp_path / "src").glob("*.safetensors"))
    assert total > 20 * largest
    script = textwrap.dedent(f"""
        import json, re
        from mer_tui.convert import convert_checkpoint

        def hwm():
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

        def rss():
            return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

        before = rss()
        with open("/proc/self/clear_refs", "w") as f:   # reset the high-water mark to the current RSS
            f.write("5")
        convert_checkpoint({str(tmp_path / 'src')!r}, {str(tmp_path / 'dst')!r})
        print(json.dumps({{"before": before, "peak": hwm()}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    growth = m["peak"] - m["before"]
    print(f"convert of {total / 2**20:.0f} MiB: peak RSS growth {growth / 2**20:.1f} MiB, "
          f"largest tensor {largest / 2**20:.0f} MiB")
    assert growth < 2 * largest
    assert is_store(tmp_path / "dst")
