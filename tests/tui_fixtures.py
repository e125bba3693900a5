"""Builders for the TUI tests: a tiny random Mixtral checkpoint with a byte-level chat tokenizer.

The trained demo model (assets/demo) and the stress model are built elsewhere; the TUI tests must
not depend on them, so they build this one: random weights (the text is gibberish) but the same
shape of files a real Hugging Face chat model has, so the whole path (template, tokenizer, engine,
streaming detokenizer) runs for real.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from engine.cache import POLICIES
from engine.experts import ExpertSource
from mer_tui.session import Event, ModelInfo, Notice, Text, TurnDone

SPECIALS = ["<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
EOS = "<|end|>"

# A template in the style of HF chat templates: one header per role, each turn closed by the eos token
# (so a trained model stops at the end of its turn).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_byte_tokenizer(folder: Path) -> int:
    """Write tokenizer.json + tokenizer_config.json; return the vocabulary size.

    Byte-level BPE with no merges: every byte is one token, so any text round-trips and the
    vocabulary is 256 byte symbols plus the specials.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()          # the 256 printable stand-ins for bytes
    vocab = {sym: i for i, sym in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"bos_token": "<|bos|>", "eos_token": EOS, "pad_token": EOS, "add_bos_token": False,
           "chat_template": CHAT_TEMPLATE, "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
    return tok.get_vocab_size(with_added_tokens=True)


def build_tiny_mixtral(folder: str | os.PathLike, *, layers: int = 2, experts: int = 4, top_k: int = 2,
                       hidden: int = 32, width: int = 48, seed: int = 0) -> Path:
    """A random Mixtral checkpoint (a few hundred KB) with a chat tokenizer, in `folder`."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_byte_tokenizer(folder)
    ids = {s: 256 + i for i, s in enumerate(SPECIALS)}
    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=width,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=2048,
                        bos_token_id=ids["<|bos|>"], eos_token_id=ids[EOS], tie_word_embeddings=False)
    model = MixtralForCausalLM(cfg).eval()
    # The default init gives near-uniform logits; scale them up so sampling has a preference and a
    # short run is deterministic in practice (greedy decoding in the tests makes it exact).
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


class RecordingExperts(ExpertSource):
    """Wraps a model's ExpertSource: records the settings calls (the in-memory source ignores them),
    and can fail reads (`fail`) or slow them down (`delay`, seconds per layer) on demand."""

    def __init__(self, inner):
        self.inner = inner
        self.backend = inner.backend
        self.calls: list[tuple] = []
        self.fail = False
        self.delay = 0.0

    def get(self, layer, experts):
        import time

        import engine

        if self.fail:
            raise engine.ExpertReadError(f"experts.bin: read of layer {layer} failed (EIO)")
        if self.delay:
            time.sleep(self.delay)
        return self.inner.get(layer, experts)

    def prefetch(self, hints):
        self.inner.prefetch(hints)

    def wants_hints(self):
        return self.inner.wants_hints()

    def stats(self):
        return self.inner.stats()

    def configure(self, **settings):
        self.calls.append(("configure", settings))

    def pin(self, pairs):
        self.calls.append(("pin", list(pairs)))

    def unpin_all(self):
        self.calls.append(("unpin_all",))

    def reset_stats(self):
        self.calls.append(("reset_stats",))
        self.inner.reset_stats()

    def close(self):
        self.inner.close()


def load_recording_model(folder: Path):
    """engine.load(folder) with its experts wrapped in a RecordingExperts."""
    import engine

    m = engine.load(folder)
    m.experts = RecordingExperts(m.experts)
    return m


def greedy_and_long(session, n: int) -> None:
    """Greedy decoding of the tiny model runs into a loop without its eos token (sampling may stop
    early), so a test that must interrupt a reply gets one that does not end by itself."""
    session.settings.temperature, session.settings.repetition_penalty = 0.0, None
    session.settings.max_new_tokens = n


def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny checkpoint, built once per test session (torch import + build take a few seconds)."""
    root = tmp_path_factory.getbasetemp() / "tiny-mixtral"
    if not (root / "config.json").exists():
        build_tiny_mixtral(root)
    return root




# ----------------------------------------------------------------------------- recorded telemetry
def record_telemetry(model, prompts: list[str], hz: float = 10.0, max_new_tokens: int = 48,
                     idle_s: float = 0.5) -> list[dict]:
    """Snapshots polled at `hz` while the model answers `prompts` in turn (the way the app polls)."""
    import threading
    import time

    snaps: list[dict] = []
    done = threading.Event()

    def run() -> None:
        msgs: list[dict] = []
        for p in prompts:
            msgs.append({"role": "user", "content": p})
            out = list(model.generate(model.tokenizer.encode_chat(msgs), max_new_tokens=max_new_tokens,
                                      temperature=0.8, seed=1))
            msgs.append({"role": "assistant", "content": model.tokenizer.decode(out)})
            time.sleep(idle_s)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    while not done.is_set():
        snaps.append(model.telemetry())
        time.sleep(1.0 / hz)
    snaps.append(model.telemetry())
    return snaps


def synthetic_stream_telemetry(layers: int = 48, experts: int = 128, top_k: int = 8, n: int = 300,
                               seed: int = 0) -> list[dict]:
    """Snapshots shaped like a streaming cache's on a 30B-class MoE: a RAM budget smaller than the
    experts, SSD reads, a reader queue.  Made up (seeded), because the streaming source is not in the
    engine yet; the app must draw such a run, and the snapshot tests need one that never changes.
    Only the last snapshot carries the activation counts (the app draws only the latest), which keeps
    the file small."""
    import numpy as np

    rng = np.random.default_rng(seed)
    # Each layer prefers its own few experts (a Zipf-like popularity, shuffled per layer).
    pop = 1.0 / np.arange(1, experts + 1) ** 1.1
    prefs = np.stack([rng.permutation(pop) for _ in range(layers)])
    prefs /= prefs.sum(axis=1, keepdims=True)
    counts = np.zeros((layers, experts))
    bundle = 3 * 2048 * 768 * 18 // 32          # one q4_0 expert of a 30B-A3B model, in bytes
    budget = 6 << 30
    t0 = 1_790_000_000.0
    tokens = hits = misses = reads = issued = useful = 0
    snaps = []
    for i in range(n):
        t = t0 + i * 0.1
        busy = (i % 150) < 120                   # two replies with a pause between them
        tps = (4.0 + 1.5 * np.sin(i / 9) + rng.normal(0, 0.3)) * min(1.0, (i % 150) / 12) if busy else 0.0
        new = int(rng.poisson(max(tps, 0) * 0.1)) if busy else 0
        tokens += new
        for _ in range(new):
            for layer in range(layers):
                chosen = rng.choice(experts, size=top_k, replace=False, p=prefs[layer])
                counts *= 0.99 ** (1 / layers)
                counts[layer, chosen] += 1
        warm = min(1.0, i / 200)
        step = new * layers * top_k
        h = int(step * (0.35 + 0.5 * warm))
        hits, misses = hits + h, misses + step - h
        reads += step - h
        issued += new * layers * 3
        useful += int(new * layers * 3 * 0.6)
        qd = float(max(0, rng.normal(9, 3))) if busy else 0.0
        mbs = (step - h) * bundle / 0.1 / 1e6 if busy else 0.0
        snaps.append({
            "tokens_per_s": round(float(max(tps, 0.0)), 3), "prefill_tokens_per_s": 38.5 if i >= 10 else 0.0,
            "ttft_s": 1.9, "tokens": tokens,
            "tiers": {"ram": {"hits": hits, "misses": misses,
                              "hit_rate": round(hits / max(1, hits + misses), 4),
                              "bytes_used": int(min(budget, (0.2 + 0.8 * warm) * budget)), "bytes_budget": budget,
                              "entries": int(min(budget, (0.2 + 0.8 * warm) * budget) // bundle), "pinned": 0},
                      "ssd": {"reads": reads, "bytes_read": reads * bundle, "read_mb_s": round(mbs, 1)}},
            "io": {"backend": "uring", "queue_depth": round(qd, 1), "queue_depth_max": 32,
                   "queue_depth_mean": 8.7, "read_ms_p50": 0.41, "read_ms_p99": 2.35},
            "prefetch": {"enabled": True, "issued": issued, "useful": useful},
            "policy": "lfu-decay", "time": round(t, 3),
        })
    snaps[-1]["experts"] = {"layers": layers, "experts": experts, "counts": np.round(counts, 2).tolist()}
    return snaps


def write_fixtures(out: Path, model_dir: Path) -> None:
    """Regenerate tests/fixtures/telemetry_*.json (by hand, when the snapshot schema grows)."""
    import engine

    out.mkdir(parents=True, exist_ok=True)
    with engine.load(model_dir) as model:
        snaps = record_telemetry(model, ["Tell me about experts.", "And about caches?", "Thanks!"], max_new_tokens=96)
    for s in snaps:   # keep the file readable: two decimals are plenty for a heatmap
        s["experts"]["counts"] = [[round(c, 2) for c in row] for row in s["experts"]["counts"]]
    doc = {"note": "recorded from a random 8x8 Mixtral (tests/tui_fixtures.py) answering three prompts",
           "snapshots": snaps}
    (out / "telemetry_chat.json").write_text(json.dumps(doc) + "\n")
    doc = {"note": "synthetic: a streaming cache on a 48x128 MoE (tests/tui_fixtures.py)",
           "snapshots": synthetic_stream_telemetry()}
    (out / "telemetry_stream.json").write_text(json.dumps(doc) + "\n")


if __name__ == "__main__":
    # python tests/tui_fixtures.py model DIR     a tiny model to try the app with
    # python tests/tui_fixtures.py fixtures      rewrite tests/fixtures/telemetry_*.json
    import sys
    import tempfile

    if sys.argv[1] == "model":
        print(build_tiny_mixtral(sys.argv[2]))
    elif sys.argv[1] == "fixtures":
        with tempfile.TemporaryDirectory() as d:
            write_fixtures(Path(__file__).parent / "fixtures",
                           build_tiny_mixtral(d, layers=8, experts=8, hidden=64, width=96))


# ----------------------------------------------------------------------------- replay
class ReplaySession:
    """A Session's face over recorded snapshots: no model, no threads, the same screen every time.

    Used by the snapshot tests (and `--replay`-style demos): `telemetry()` returns the last recorded
    snapshot, `history()` all of them so the plots start full, and the chat shows `messages`.
    Settings actions change the returned snapshot, so key presses show on screen as with a model.
    """

    def __init__(self, snapshots: list[dict], info: ModelInfo, messages: list[dict[str, str]] | None = None):
        if not snapshots:
            raise ValueError("ReplaySession: need at least one snapshot")
        self.snapshots = [dict(s) for s in snapshots]
        self.info = info
        self.messages = list(messages or [])
        self.status = "ready"
        self.progress = ("", 0, 0)
        self.load_error = None
        self.busy = False
        self.requested_budget = None
        self.requested_policy = None
        self._events: list[Event] = []

    def start(self) -> None:
        pass

    def history(self) -> list[dict]:
        return self.snapshots

    def telemetry(self) -> dict:
        return self.snapshots[-1]

    def drain(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def send(self, text: str) -> bool:
        self.messages.append({"role": "user", "content": text})
        self._events += [Text("(replay: no model is loaded)"), TurnDone(0, 0.0, False)]
        return True

    def stop(self) -> None:
        pass

    def new_chat(self) -> bool:
        self.messages.clear()
        return True

    def regenerate(self) -> bool:
        if not self.messages or self.messages[-1]["role"] != "assistant":
            return False
        self.messages.pop()
        self._events += [Text("(replay: no model is loaded)"), TurnDone(0, 0.0, False)]
        return True

    def request(self, action: str) -> None:
        snap = self.snapshots[-1]
        if action == "toggle_prefetch":
            p = snap.setdefault("prefetch", {})
            p["enabled"] = not p.get("enabled")
        elif action == "cycle_policy" and snap.get("policy") in POLICIES:
            snap["policy"] = POLICIES[(POLICIES.index(snap["policy"]) + 1) % len(POLICIES)]
        self._events.append(Notice(f"{action} (replay)"))

    def pin_count(self) -> int:
        return 0

    def close(self, timeout: float = 0.0) -> None:
        pass


def load_recording(path: str | Path) -> list[dict]:
    """Snapshots recorded as a JSON list (tests/fixtures/telemetry_*.json)."""
    data = json.loads(Path(path).read_text())
    return data["snapshots"] if isinstance(data, dict) else data
