"""Counters the model keeps while it runs, and the snapshot the UI polls (schema in DESIGN.md).

Writers are the generation thread; readers poll at about 10 Hz from another thread.  One lock
guards everything, held only for a few arithmetic operations on each side.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence

import numpy as np

# Activation counts decay by this factor per routed token: a half-life of about 70 tokens,
# long enough to show which experts a topic prefers, short enough to follow a change of topic.
DECAY_PER_TOKEN = 0.99


class Telemetry:
    def __init__(self, layers: int, experts: int):
        self._lock = threading.Lock()
        self.layers, self.experts = layers, experts
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.tokens = 0
            self.ttft_s = 0.0
            self.prefill_tokens_per_s = 0.0
            self._decode_times: deque[float] = deque(maxlen=32)
            self.counts = np.zeros((self.layers, max(self.experts, 1)), dtype=np.float64)
            self._last_decay_layer = -1
            # Seconds decoding waited for each layer's experts: in all since the reset (with the decode
            # steps they add up over), and decayed per step as the counts are.
            self.wait_total = np.zeros(self.layers, dtype=np.float64)
            self.wait_steps = 0
            self.wait_recent = np.zeros(self.layers, dtype=np.float64)
            self._last_wait_layer = self.layers   # above every layer: the first call opens a step
            # A decoded token's time (from the token before, in the same generation), decayed per
            # token as the waits are, so that the two make a share of the same recent tokens.
            self.token_recent = 0.0
            self.token_steps = 0
            self.prompt: list[int] | None = None   # [tokens, parts done, parts] while a prompt runs

    def prompt_started(self, tokens: int, parts: int) -> None:
        """A prompt of `tokens` began, in `parts` (chunk, layer) steps: progress for a UI, since a long one
        over a memory limit takes seconds before its first token."""
        with self._lock:
            self.prompt = [tokens, 0, parts]

    def prompt_advanced(self) -> None:
        with self._lock:
            if self.prompt is not None:
                self.prompt[1] += 1

    def prompt_ended(self) -> None:
        with self._lock:
            self.prompt = None

    def prefill_done(self, n_tokens: int, seconds: float) -> None:
        with self._lock:
            self.prefill_tokens_per_s = n_tokens / seconds if seconds > 0 else 0.0

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft_s = seconds

    def token(self) -> None:
        with self._lock:
            now = time.perf_counter()
            self.tokens += 1
            if self._decode_times:   # none before a generation's first token (the prompt's)
                self.token_recent = self.token_recent * DECAY_PER_TOKEN + (now - self._decode_times[-1])
                self.token_steps += 1
            self._decode_times.append(now)

    def generation_started(self) -> None:
        with self._lock:
            self._decode_times.clear()

    def routed(self, layer: int, experts: np.ndarray) -> None:
        """Record the experts chosen at `layer` for a batch of tokens (shape (n, k))."""
        n = experts.shape[0]
        with self._lock:
            if layer <= self._last_decay_layer:  # a new forward step began: age the counts
                self.counts *= DECAY_PER_TOKEN ** n
            self._last_decay_layer = layer
            np.add.at(self.counts[layer], experts.ravel(), 1.0)

    def waited(self, layer: int, seconds: float) -> None:
        """Record how long a decode step (one token) waited for `layer`'s experts: asking the source
        for them and waiting for the misses it reads.  Called for every MoE layer of every step, a
        zero included, so that the steps are counted."""
        with self._lock:
            if layer <= self._last_wait_layer:   # a new step
                self.wait_steps += 1
                self.wait_recent *= DECAY_PER_TOKEN
            self._last_wait_layer = layer
            self.wait_total[layer] += seconds
            self.wait_recent[layer] += seconds

    def counts_now(self) -> np.ndarray:
        """A copy of the decayed activation counts (layers x experts)."""
        with self._lock:
            return self.counts.copy()

    def tokens_per_s(self) -> float:
        t = self._decode_times
        if len(t) < 2:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0]) if t[-1] > t[0] else 0.0

    def snapshot(self) -> dict:
        with self._lock:
            steps_weight, tokens_weight = _decayed_weight(self.wait_steps), _decayed_weight(self.token_steps)
            return {
                "tokens_per_s": self.tokens_per_s(),
                "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "ttft_s": self.ttft_s,
                "tokens": self.tokens,
                # a prompt under way: its tokens and the share of its (chunk, layer) steps done; else None
                "prompt": None if self.prompt is None else
                {"tokens": self.prompt[0], "done": self.prompt[1] / max(self.prompt[2], 1)},
                "experts": {"layers": self.layers, "experts": self.experts, "counts": self.counts.tolist()},
                # ms a decoded token by layer: lately (decayed as the counts are), and since the reset
                "waits": {"recent_ms_per_token": (1e3 * self.wait_recent / steps_weight).tolist()
                          if self.wait_steps else [0.0] * self.layers,
                          "total_s": self.wait_total.tolist(), "steps": self.wait_steps,
                          # a decoded token's time lately, decayed alike: the waits' share of it
                          "recent_token_ms": 1e3 * self.token_recent / tokens_weight if self.token_steps else 0.0},
                "time": time.time(),
            }


def _decayed_weight(steps: int) -> float:
    """What `steps` ones weigh after decaying as the recent sums do, one step at a time (a geometric
    sum): a decayed sum over it is a mean."""
    return (1.0 - DECAY_PER_TOKEN ** steps) / (1.0 - DECAY_PER_TOKEN)


def most_waited(ms_by_layer: Sequence[float], n: int) -> list[int]:
    """The `n` layers whose decoded tokens waited longest for experts, longest first; layers that
    waited under 0.05 ms (nothing worth naming) left out."""
    ranked = sorted(range(len(ms_by_layer)), key=lambda i: -ms_by_layer[i])[:n]
    return [i for i in ranked if ms_by_layer[i] >= 0.05]
