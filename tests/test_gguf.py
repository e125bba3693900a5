"""GGUF files: read as llama.cpp wrote them, run as the peers run them.

The fixtures (tests/fixtures/gguf/make.py) are tiny random models converted by llama.cpp's own
convert_hf_to_gguf.py (and one quantized to Q4_K_M by llama.cpp), with what transformers, llama.cpp,
`tokenizers` and sentencepiece computed for them.  gguf-py is the reference for the file format.
"""
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
from engine.gguf import GgufFile
from engine.gguf_import import GgufCheckpoint, gguf_side_files
from engine.tokenizer import Tokenizer
from mer_tui.convert import convert_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "gguf"
# f16 weights: exact conversions of the checkpoints
FLOAT = ["olmoe", "qwen2moe", "qwen3moe", "mixtral", "mixtral-llama3"]
# llama.cpp's quantizations; the last holds a type only a converted store computes (Q5_0 where
# llama-quantize fell back from Q4_K on rows that are not whole super-blocks)
QUANTIZED = ["mixtral-q4_k_m", "mixtral-q5_k_m", "mixtral-q3_k_m", "mixtral-q2_k", "mixtral-iq4_xs", "qwen2moe-iq4_xs",
             "qwen2moe-q4_k_m"]
ALL = [*FLOAT, *QUANTIZED]


def fixture(name: str) -> Path:
    return FIXTURES / f"{name}.gguf"


def reference(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("name", ALL)
def test_header_read_as_gguf_py_reads_it(name):
    gguf = pytest.importorskip("gguf")
    ours, theirs = GgufFile(fixture(name)), gguf.GGUFReader(fixture(name))
    assert {t.name: (t.data_offset, t.n_bytes, tuple(int(d) for d in t.shape), int(t.tensor_type))
            for t in theirs.tensors} == \
        {t.name: (t.start, t.nbytes, t.dims, t.ggml_type) for t in ours.tensors.values()}
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert ours.metadata[key] == (pytest.approx(value) if isinstance(value, float) else value), key


@pytest.mark.parametrize("name", FLOAT)
@pytest.mark.parametrize("how", [{}, {"ram_cache": "64KiB", "io": "pread"}, {"ram_cache": "64KiB", "io": "uring"}])
def test_float_gguf_logits_match_transformers(name, how):
    """In RAM and streamed from the GGUF itself: the same logits as transformers on the source checkpoint
    (mixtral's q and k rows come back from llama.cpp's permutation; a wrong order fails this)."""
    ref = reference(name)
    model = engine.load(fixture(name), **how)
    try:
        assert rel_err(model.forward(ref["ids"]), ref["transformers"]) < 1e-5
    finally:
        model.close()


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_logits_match_llama_cpp(name, tmp_path):
    """llama.cpp's own quantized files, run as they are: our logits land near llama.cpp's, far nearer than
    either lands to the float model (both compute the same weights; the activations' rounding differs a
    little)."""
    ref = reference(name)
    model = engine.load(fixture(name), ram_cache="256KiB")
    try:
        ours = model.forward(ref["ids"])
    finally:
        model.close()
    theirs, floats = ref["llama_cpp"], ref["transformers"]
    per_row = [rel_err(o, t) for o, t in zip(ours, theirs)]
    quant_noise = [rel_err(t, f) for t, f in zip(theirs, floats)]
    # Q4_K_M: 1-5% of the largest logit from llama.cpp's, 10-17% from the float model's; Q3_K_M 1.2-1.6%
    # against 19%, Q2_K 1.4-1.9% against 49%, IQ4_XS 1.0-1.5% against 16%.  Q5_K_M 1-3%, and 9% at the
    # position where the activations' rounding changes one of the top-2 experts, against 6-10%.
    assert max(per_row) < 0.1
    assert np.median(per_row) < 0.4 * np.median(quant_noise)
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("name, fmt, experts", [("mixtral-q4_k_m", "q4_k", {"q4_k", "q6_k"}),
                                                ("mixtral-iq4_xs", "iq4_xs", {"iq4_xs"})])
def test_resident_matrices_load_in_the_kernels_layouts(name, fmt, experts):
    """A GGUF's attention matrices load interleaved by runs of eight rows (q4_k as q4_kx8, iq4_xs as
    iq4_xsx8), as a store holds them: the same bytes moved, at a one-time cost far below the experts'
    (which stream as they are)."""
    model = engine.load(fixture(name))
    try:
        lw = model.weights.layers[0]
        assert lw.o.fmt == fmt + "x8" and lw.q.fmt == fmt + "x8"
        assert model.weights.embed.fmt == fmt   # looked up by row: left as it is
        assert {m.fmt for b in model.experts.bundles.values() for m in (b.gate, b.up, b.down)} <= experts
    finally:
        model.close()


@pytest.mark.parametrize("name", ALL)
def test_convert_gguf_to_store(name, tmp_path):
    """`mer-tui convert model.gguf DST`: a store with the GGUF's bytes in the kernels' x8 layouts, its
    config and tokenizer; it computes what the GGUF computes."""
    ref = reference(name)
    dst = tmp_path / "store"
    summary = convert_checkpoint(fixture(name), dst)
    assert summary["bundles"] == len(GgufCheckpoint(fixture(name)).spec.moe_layers) * \
        GgufCheckpoint(fixture(name)).spec.num_experts
    index = json.loads((dst / "index.json").read_text())
    formats = {p["fmt"] for b in index["bundles"] for p in b["parts"]}
    expected = {"mixtral-q4_k_m": ["q4_kx8", "q6_k"],    # GGUF's q4_K interleaved by rows of eight (no q6_kx8)
                "mixtral-q5_k_m": ["q5_kx8", "q6_k"],    # GGUF's q5_K interleaved too (no q6_kx8)
                "mixtral-q3_k_m": ["q3_k", "q4_kx8"],
                "mixtral-q2_k": ["q2_k", "q3_k"],
                "mixtral-iq4_xs": ["iq4_xsx8"],
                "qwen2moe-iq4_xs": ["iq4_nl", "iq4_xsx8"],   # IQ4_NL where the rows are not whole super-blocks
                # Q5_0 (for Q4_K) and Q8_0 (for Q6_K) where the rows are not whole super-blocks
                "qwen2moe-q4_k_m": ["q4_kx8", "q5_0", "q8_0x8"]}.get(name)
    if expected:
        assert sorted(formats) == summary["expert_formats"] == expected
    direct = engine.load(fixture(name))
    stored = engine.load(dst, ram_cache="128KiB")
    try:
        a, b = direct.forward(ref["ids"]), stored.forward(ref["ids"])
        # the same weights; the x8 kernels sum in another order (float fixtures: the same kernels), and on
        # the avx512 variant a prompt's products over q4_kx8 experts round the activations to int8 where
        # the GGUF's plain q4_k ones do so only from 8 vectors an expert (int16 below): the store then
        # lands as near llama.cpp's logits
        int8 = any(kernels.int8_activations(f, len(ref["ids"])) for f in formats)
        assert rel_err(b, a) < (1.5e-2 if int8 else 1e-3 if name in QUANTIZED else 1e-5)
        if name in QUANTIZED:
            near = [np.median([rel_err(o, t) for o, t in zip(x, ref["llama_cpp"])]) for x in (a, b)]
            assert near[1] < 1.1 * near[0], near
        assert stored.tokenizer.encode("Hello world") == direct.tokenizer.encode("Hello world")
        assert stored.tokenizer.chat_template == direct.tokenizer.chat_template is not None
        assert stored.spec == direct.spec
    finally:
        direct.close()
        stored.close()


def test_convert_gguf_requantized(tmp_path):
    """--quant / --dense-quant apply to a GGUF as to a folder: Q4_K experts re-quantized to q4_0 and Q4_K /
    Q6_K dense matrices to q8_0, the logits still llama.cpp's give or take
    the extra rounding."""
    ref = reference("mixtral-q4_k_m")
    dst = tmp_path / "store"
    summary = convert_checkpoint(fixture("mixtral-q4_k_m"), dst, quant="q4_0", dense_quant="q8_0")
    assert summary["expert_formats"] == ["q4_0x8"] and summary["dense_quant"] == "q8_0"
    model = engine.load(dst)
    try:
        assert model.weights.layers[0].q.fmt == "q8_0x8"
        ours = model.forward(ref["ids"])
    finally:
        model.close()
    theirs, floats = ref["llama_cpp"], ref["transformers"]
    assert np.median([rel_err(o, t) for o, t in zip(ours, theirs)]) < \
        0.5 * np.median([rel_err(t, f) for t, f in zip(theirs, floats)])


@pytest.mark.parametrize("name", ALL)
def test_tokenizer_matches_the_source_tokenizer(name, tmp_path):
    """The vocabulary rebuilt from the GGUF splits text as the tokenizer it was converted from
    (`tokenizers` for byte-level BPE, sentencepiece for Mixtral's) and decodes back to the text."""
    files, missing = gguf_side_files(GgufCheckpoint(fixture(name)))   # as a converted store has them
    assert missing is None
    folder = tmp_path / "tok"
    folder.mkdir()
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (folder / file).write_text(files[file])
    tok = Tokenizer(folder)
    data = json.loads((FIXTURES / f"{name}.tokens.json").read_text())
    for text, ids in zip(data["texts"], data["ids"], strict=True):
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == text
    for text, pieces in zip(data["texts"], data["pieces"], strict=True) if "pieces" in data else ():
        # the split regex itself (byte-level BPE): a toy vocabulary's ids alone do not tell regexes apart
        assert [p for p, _ in tok._tok.pre_tokenizer.pre_tokenize_str(text)] == pieces, text
    # SentencePiece models start with BOS, as llama.cpp adds it; these byte-level BPE ones do not
    spm = GgufFile(fixture(name)).get("tokenizer.ggml.model") == "llama"
    assert (tok.encode("hi")[0] == tok.bos_id) == spm


def test_chat_and_special_tokens():
    model = engine.load(fixture("qwen2moe"))
    tok = model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "hi"}])
    start, end = tok.token_id("<|im_start|>"), tok.token_id("<|im_end|>")
    assert ids[0] == start and ids.count(end) == 1 and tok.eos_id == end
    assert tok.decode(ids) == "user\nhi\nassistant\n"    # control tokens skipped
    model.close()


def test_generate_from_a_gguf_on_the_command_line():
    out = subprocess.run([sys.executable, "-m", "mer_tui", "generate", "--model", str(fixture("mixtral-q4_k_m")),
                          "--prompt", "Hello", "--max-new-tokens", "6", "--ram-cache", "512KiB", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["ids"]) == 6


def _rewrite(src: Path, dst: Path, field=lambda key, value: value, tensor=lambda name, data: [(name, data)],
             split_max_tensors: int = 0):
    """A copy of GGUF `src` written by gguf-py, each metadata value through `field` (None drops it) and
    each tensor through `tensor` (to the (name, array) pairs it returns); split into files of at most
    `split_max_tensors` tensors where given (gguf-py names them as llama.cpp's gguf-split does)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents(),
                        split_max_tensors=split_max_tensors)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = field(key, f.contents())
        if value is not None:
            w.add_key_value(key, value, f.types[0], f.types[1] if len(f.types) > 1 else None)
    for t in reader.tensors:
        for name, data in tensor(t.name, np.asarray(t.data)):
            w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_experts_as_separate_tensors(tmp_path):
    """Mixtral GGUFs written before llama.cpp merged the experts (blk.N.ffn_gate.E.weight, one tensor an
    expert): the mixtral fixture rewritten that way by gguf-py computes the same logits."""
    def split(name, data):
        base = name.rsplit(".", 1)[0]
        if not base.endswith("_exps"):
            return [(name, data)]
        return [(base.replace("_exps", f".{e}") + ".weight", part) for e, part in enumerate(data)]

    old = tmp_path / "split.gguf"
    _rewrite(fixture("mixtral"), old, tensor=split)
    assert "blk.0.ffn_gate.3.weight" in GgufFile(old).tensors
    ref = reference("mixtral")
    model = engine.load(old)
    assert rel_err(model.forward(ref["ids"]), ref["transformers"]) < 1e-5
    model.close()


def test_split_gguf(tmp_path):
    """A GGUF split into files (NAME-00001-of-00004.gguf ...): loaded, streamed and converted from any of
    its files; a missing one is named."""
    _rewrite(fixture("qwen2moe"), tmp_path / "model.gguf", split_max_tensors=15)
    files = sorted(tmp_path.glob("model-*-of-00004.gguf"))
    assert len(files) == 4 and "split.count" in GgufFile(files[2]).metadata
    ref = reference("qwen2moe")
    for path, how in ((files[0], {}), (files[2], {"ram_cache": "32KiB", "io": "uring"})):
        model = engine.load(path, **how)
        assert rel_err(model.forward(ref["ids"]), ref["transformers"]) < 1e-5
        assert model.tokenizer.encode("Hello world") == json.loads(
            (FIXTURES / "qwen2moe.tokens.json").read_text())["ids"][0]
        model.close()
    convert_checkpoint(files[1], tmp_path / "store")
    stored = engine.load(tmp_path / "store")
    assert rel_err(stored.forward(ref["ids"]), ref["transformers"]) < 1e-5
    stored.close()
    files[3].unlink()
    with pytest.raises(EngineError, match=r"model-00004-of-00004\.gguf: missing \(file 4 of the 4"):
        engine.load(files[0])


def test_embedding_padded_past_the_vocabulary(tmp_path):
    """Converters pad the embedding (and output) to a round size past the tokens listed: the model's
    vocabulary is the embedding's rows, the tokenizer the tokens'."""
    padded = tmp_path / "padded.gguf"
    _rewrite(fixture("olmoe"), padded, tensor=lambda name, data: [(name, np.concatenate(
        [data, np.zeros((8, data.shape[1]), data.dtype)]) if name in ("token_embd.weight", "output.weight") else data)])
    model = engine.load(padded)
    ref = reference("olmoe")
    assert model.spec.vocab_size == 328 and model.tokenizer.vocab_size == 320
    assert rel_err(model.forward(ref["ids"])[:, :320], ref["transformers"]) < 1e-5
    model.close()


def test_a_vocabulary_that_makes_no_tokenizer_is_said_in_one_line(tmp_path, caplog):
    """Merges of tokens the list lacks: the tokenizers library's error becomes the reason there is no
    tokenizer, not a traceback; the weights still load."""
    bad = tmp_path / "bad-vocab.gguf"
    _rewrite(fixture("olmoe"), bad, field=lambda key, value: value[:-8] if key in (
        "tokenizer.ggml.tokens", "tokenizer.ggml.token_type") else value)
    model = engine.load(bad)
    assert model.tokenizer is None and "its vocabulary does not make a tokenizer" in caplog.text
    model.close()


# ------------------------------------------------------------------------------------------ bad files
def _set_tensor_type(path: Path, tensor: str, ggml_type: int) -> None:
    """Rewrite one tensor's type id in the header (name, dims count, dims, then the type)."""
    raw = bytearray(path.read_bytes())
    name = tensor.encode()
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(raw[at:at + 4], "little")
    at += 4 + 8 * n_dims
    raw[at:at + 4] = ggml_type.to_bytes(4, "little")
    path.write_bytes(bytes(raw))


def test_unsupported_block_type_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(fixture("mixtral-q4_k_m"), bad)
    _set_tensor_type(bad, "blk.1.ffn_down_exps.weight", 16)   # IQ2_XXS
    with pytest.raises(EngineError, match=r"blk\.1\.ffn_down_exps\.weight is IQ2_XXS"):
        engine.load(bad)
    out = subprocess.run([sys.executable, "-m", "mer_tui", "convert", str(bad), str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "IQ2_XXS" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "store").exists() and list(tmp_path.iterdir()) == [bad]


def test_launch_names_an_unreadable_type_before_the_screen_opens(tmp_path):
    """The app on a file with a type mer-tui cannot compute: one line and status 2, not a screen that
    opens to fail."""
    bad = tmp_path / "bad.gguf"
    shutil.copyfile(fixture("mixtral-q4_k_m"), bad)
    _set_tensor_type(bad, "blk.0.attn_q.weight", 18)   # IQ3_XXS
    out = subprocess.run([sys.executable, "-m", "mer_tui", "launch", "--model", str(bad)],
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "blk.0.attn_q.weight is IQ3_XXS" in out.stderr


def test_truncated_and_foreign_files(tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(fixture("olmoe").read_bytes()[:-1000])
    with pytest.raises(EngineError, match="runs past the end"):
        engine.load(cut)
    cut.write_bytes(fixture("olmoe").read_bytes()[:2000])
    with pytest.raises(EngineError, match="header ends early"):
        engine.load(cut)
    other = tmp_path / "model.gguf"
    other.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(EngineError, match="not a folder"):
        engine.load(other)


def test_dense_and_unknown_architectures_are_refused(tmp_path):
    gguf = pytest.importorskip("gguf")
    for arch, experts, words in (("llama", 0, "no experts to stream"), ("gemma", 8, "architecture 'gemma'")):
        path = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(1)
        w.add_embedding_length(32)
        w.add_head_count(4)
        w.add_expert_count(experts)
        w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(EngineError, match=words):
            engine.load(path)


def test_a_vocabulary_that_cannot_be_rebuilt_leaves_the_weights_usable(tmp_path, caplog):
    """An unknown pre-tokenizer is refused by name (a tokenizer that splits otherwise would feed the model
    text it never saw), but the weights still load and convert: token ids work, as `mer-tui bench` uses."""
    from engine.gguf_vocab import tokenizer_files

    meta = dict(GgufFile(fixture("olmoe")).metadata)
    meta["tokenizer.ggml.pre"] = "made-up"
    with pytest.raises(EngineError, match="pre-tokenizer 'made-up' is not supported"):
        tokenizer_files(meta, "x.gguf")
    bad = tmp_path / "made-up.gguf"
    raw = fixture("olmoe").read_bytes()
    bad.write_bytes(_replace_string(raw, "olmo", "abcd", after=b"tokenizer.ggml.pre"))
    model = engine.load(bad)
    assert model.tokenizer is None and "pre-tokenizer 'abcd' is not supported" in caplog.text
    ref = reference("olmoe")
    assert rel_err(model.forward(ref["ids"]), ref["transformers"]) < 1e-5
    model.close()
    out = subprocess.run([sys.executable, "-m", "mer_tui", "convert", str(bad), str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "no tokenizer" in out.stdout and "'abcd'" in out.stdout
    assert not (tmp_path / "store" / "tokenizer.json").exists()


def _replace_string(raw: bytes, old: str, new: str, after: bytes) -> bytes:
    """A GGUF string value of the same length replaced in place, the first one after `after`."""
    assert len(old) == len(new)
    at = raw.index(len(old).to_bytes(8, "little") + old.encode(), raw.index(after))
    return raw[:at + 8] + new.encode() + raw[at + 8 + len(old):]
