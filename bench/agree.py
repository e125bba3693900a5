"""Do mer-tui and llama.cpp compute the same function on our GGUF?  Checked on the small model.

Two comparisons of the logits at every position of a prompt:
1. exact weights: llama.cpp on an all-f32 GGUF against our engine on the bf16 Hugging Face folder
   (bf16 -> f32 is exact, so only float rounding differs): checks tensor names, layouts, rope,
   qk-norm, routing; expect agreement to ~1e-4.
2. the benchmark's files: llama.cpp on the q4_0 GGUF against our engine on the q4_0 store (the same
   expert bytes); llama.cpp quantizes activations to q8_0 for q4_0 matmuls, so expect small
   differences, the same argmax almost everywhere.

    .venv/bin/python -m bench.agree [--out /tmp/bench-small]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def llama_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.npy"
        subprocess.run([sys.executable, "-m", "bench.run_llama", "--model", str(gguf_path), "--logits", str(out),
                        "--ids", ",".join(map(str, ids)), "--threads", "1"], check=True, cwd=REPO)
        return np.load(out)


def ours_logits(folder: Path, ids: list[int], **load) -> np.ndarray:
    import engine

    with engine.load(folder, **load) as m:
        return m.forward(ids)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    rel = float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2)))
    return {"max_abs_diff": float(np.abs(a - b).max()), "relative_rms": rel,
            "argmax_agree": f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{len(a)}",
            "finite": bool(np.isfinite(a).all() and np.isfinite(b).all())}


def main(argv: list[str] | None = None) -> int:
    from bench.gguf_export import export_gguf
    from bench.side_by_side import build_models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/bench-small"))
    p.add_argument("--tokens", type=int, default=12)
    args = p.parse_args(argv)
    hf, store, q4_gguf = build_models(args.out, True, "bf16", False)
    f32_gguf = export_gguf(hf, args.out / "olmoe-small-f32.gguf", expert_fmt="f32", dense_fmt="f32")
    vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(1).integers(0, vocab, args.tokens).tolist()

    exact = compare(llama_logits(f32_gguf, ids), ours_logits(hf, ids))
    quant = compare(llama_logits(q4_gguf, ids), ours_logits(store, ids, io="pread"))
    print(json.dumps({"f32 GGUF vs bf16 HF folder": exact, "q4_0 GGUF vs q4_0 store": quant}, indent=2))
    ok = exact["finite"] and quant["finite"] and exact["relative_rms"] < 1e-3 and quant["relative_rms"] < 0.05
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
