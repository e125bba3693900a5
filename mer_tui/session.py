"""The bridge between the UI and the engine: threads, buffers and settings, without textual.

The UI must never wait on the engine (DESIGN.md, "The UI's rules").  A Session therefore owns
every thread that calls into the engine:

- a loader thread (loading a model takes seconds; the UI shows its progress),
- a generation thread per reply, which pushes text into a buffer and checks a stop flag between
  tokens,
- a settings thread, because a cache may take its lock to shrink or re-pin while a read is in
  flight, and a key press must not freeze the screen meanwhile.

The UI polls: `status`/`progress` while loading, then `telemetry()` and `drain()` on its timer.
Everything that happens on the engine's side comes back through `drain()` as events.  Keeping
this free of textual lets tests drive it directly, and lets `ReplaySession` stand in for a live
model with recorded telemetry.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.cache import POLICIES  # the eviction policies, in the order the policy key cycles them

if TYPE_CHECKING:
    from engine import Model

Progress = Callable[[str, int, int], None]
Loader = Callable[[Progress], "Model"]

BUDGET_UP, BUDGET_DOWN = 1.25, 0.8
MIN_BUDGET = 64 << 10
# Context the chat keeps when the model's config does not say, and a cap: a decoded token's attention
# grows with it (OLMoE's shape at 4096 tokens: 25 tok/s in RAM against 44 at 32), and a conversation
# past it drops its oldest turns, so the next prompt shares no prefix with the kept one and is computed
# whole.  The UI is for conversations, not long documents.
MAX_CONTEXT = 4096


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Text:
    """Streamed reply text, safe to show (never half a character)."""
    text: str


@dataclass(frozen=True)
class TurnDone:
    tokens: int
    seconds: float           # the whole turn: prompt (prefill) and reply
    stopped: bool            # the user stopped it (vs. eos or the token limit)
    first_s: float = 0.0     # time to the first token (mostly the prompt's prefill)
    prompt_tokens: int = 0   # the conversation as the model saw it this turn
    kept_tokens: int = 0     # of those, the ones computed in earlier turns and kept (engine.Context)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time after the first: the decode speed, without the prompt."""
        span = self.seconds - self.first_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


@dataclass(frozen=True)
class Notice:
    """The outcome of a settings action, for a toast."""
    message: str


@dataclass(frozen=True)
class Failure:
    """An engine error (bad model, I/O fault); the session stays usable."""
    message: str


Event = Text | TurnDone | Notice | Failure


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float | None = 0.9
    top_k: int | None = None
    repetition_penalty: float | None = 1.1
    seed: int | None = None
    context: int | None = None   # tokens of conversation kept (None: the model's trained context, <= MAX_CONTEXT)
    context_shift: bool = False  # past the context, keep the later turns' keys and values (engine.Context shift)


@dataclass
class ModelInfo:
    """What the header and the welcome note say about the model."""
    name: str
    path: str = ""
    kind: str = "model"          # "model" (the user's), "demo-chat", "demo-stress"
    note: str | None = None      # plain words about what this model is, shown in the chat
    io: str = "auto"
    quant: str | None = None
    extra: dict = field(default_factory=dict)


def next_budget(current: int, up: bool) -> int:
    """One step of the RAM budget (x1.25 or x0.8), rounded to 1/8 of its power of two so the header
    reads well (96 MiB, 120 MiB, 150 MiB ...) on tiny demo models and large ones alike."""
    value = current * (BUDGET_UP if up else BUDGET_DOWN)
    grain = max(1, 1 << max(0, int(value).bit_length() - 4))
    new = max(grain, round(value / grain) * grain)
    if up and new <= current:        # rounding must never swallow the step
        new = current + grain
    if not up and new >= current:
        new = current - grain
    return max(MIN_BUDGET, new)


def _fmt(n: int | None) -> str:
    from engine import format_size

    return format_size(n)


class Session:
    """A model behind threads.  Pass `load` (called in a thread with a progress callback) or `model`."""

    def __init__(self, load: Loader | None = None, *, model: Model | None = None, info: ModelInfo | None = None,
                 settings: GenerationSettings | None = None, system_prompt: str | None = None,
                 policy: str | None = None, ram_budget: int | None = None):
        if (load is None) == (model is None):
            raise ValueError("Session: pass exactly one of load= or model=")
        self._load = load
        self.model: Model | None = model
        self.info = info or ModelInfo(name=Path(getattr(model, "path", "") or "model").name)
        self.settings = settings or GenerationSettings()
        self.system_prompt = system_prompt
        self.messages: list[dict[str, str]] = []
        self.draft: str | None = None   # text for the input box at the start (a resumed chat's unanswered message)
        self._context = None     # the conversation's keys and values, kept from turn to turn (engine.Context)
        self._first_kept = 0     # messages before this one no longer fit the context (_prompt_ids)
        self.status = "ready" if model is not None else "new"     # new → loading → ready | failed
        self.progress: tuple[str, int, int] = ("", 0, 0)
        self.load_error: str | None = None
        # What the user asked for; the snapshot says what the source actually applies.
        self.requested_policy = policy
        self.requested_budget = ram_budget
        self._events: list[Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._loader: threading.Thread | None = None
        self._gen: threading.Thread | None = None
        self._settings_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mer-settings")
        self._closed = False

    # ------------------------------------------------------------------ loading
    def start(self) -> None:
        """Begin loading in a thread (no-op when a model was given)."""
        if self.status != "new":
            return
        self.status = "loading"
        self._loader = threading.Thread(target=self._load_main, name="mer-load", daemon=True)
        self._loader.start()

    def _report(self, stage: str, done: int, total: int) -> None:
        self.progress = (stage, done, total)

    def _load_main(self) -> None:
        try:
            model = self._load(self._report)
        except Exception as e:  # noqa: BLE001 - a thread boundary: every failure must reach the UI
            self.load_error = _describe(e)
            self.status = "failed"
            return
        if self._closed:             # the app quit while we loaded
            model.close()
            return
        self.model = model
        self.status = "ready"

    # ------------------------------------------------------------------ telemetry and events
    def telemetry(self) -> dict | None:
        """The engine's snapshot, or None before the model is loaded; its KV context is the chat's."""
        if self.model is None:
            return None
        snap = self.model.telemetry()
        if "kv" in snap:
            snap["kv"]["context"] = self._context_limit()
        return snap

    def _emit(self, event: Event) -> None:
        with self._lock:
            # Consecutive text is merged so a burst of fast tokens costs the UI one append.
            if isinstance(event, Text) and self._events and isinstance(self._events[-1], Text):
                self._events[-1] = Text(self._events[-1].text + event.text)
            else:
                self._events.append(event)

    def drain(self) -> list[Event]:
        """Everything that happened since the last call, in order."""
        with self._lock:
            out, self._events = self._events, []
        return out

    # ------------------------------------------------------------------ chat
    @property
    def busy(self) -> bool:
        return self._gen is not None and self._gen.is_alive()

    def send(self, text: str) -> bool:
        """Start a reply to `text`; False (and nothing happens) while busy or not loaded."""
        if self.busy or self.model is None or not text.strip():
            return False
        self.messages.append({"role": "user", "content": text})
        self._reply()
        return True

    def regenerate(self) -> bool:
        """Answer the last message again, in place of its reply; False (and nothing happens) while busy or
        before a reply.  The conversation up to that message is kept (engine.Context), so the new reply
        starts at once."""
        if self.busy or self.model is None or not self.messages or self.messages[-1]["role"] != "assistant":
            return False
        self.messages.pop()
        self._reply()
        return True

    def _reply(self) -> None:
        self._stop.clear()
        self._gen = threading.Thread(target=self._generate_main, name="mer-generate", daemon=True)
        self._gen.start()

    def stop(self) -> None:
        """Stop the reply at the next token; what was generated stays in the conversation."""
        self._stop.set()

    def new_chat(self) -> bool:
        """Forget the conversation and its kept keys and values; False (and nothing happens) while busy."""
        if self.busy:
            return False
        self.messages.clear()
        self._first_kept = 0
        if self._context is not None:
            self._context.clear()
        return True

    def _context_limit(self) -> int:
        trained = self.model.spec.max_position_embeddings
        asked = self.settings.context or MAX_CONTEXT
        return min(asked, trained) if trained else asked

    def _prompt_ids(self) -> tuple[list[int], int]:
        """The conversation through the chat template from its first kept message, and how many more of its
        oldest messages this turn left out to fit the context with room for the reply.

        Past the context, whole turns are left out until the rest fills half of it (llama.cpp's context
        shift discards half too): the turns after keep the same beginning, and so the keys and values
        kept for it, until the context fills again, rather than all of it being computed again each turn."""
        tok = self.model.tokenizer
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        budget = self._context_limit() - self.settings.max_new_tokens
        start = min(self._first_kept, max(len(self.messages) - 1, 0))
        ids = tok.encode_chat(system + self.messages[start:])
        if len(ids) > budget:
            while len(ids) > budget // 2 and len(self.messages) - start > 1:
                start += min(2, len(self.messages) - start - 1)   # a turn; never the message to answer
                ids = tok.encode_chat(system + self.messages[start:])
        dropped, self._first_kept = start - self._first_kept, start
        return ids, max(dropped, 0)

    def _generate_main(self) -> None:
        from engine import EngineError

        model, s = self.model, self.settings
        t0 = time.perf_counter()
        n, reply, stopped, first, ids = 0, [], False, 0.0, []
        try:
            tok = model.tokenizer
            if tok is None:
                raise EngineError(f"{model.path}: no tokenizer.json, so the chat cannot encode text")
            ids, dropped = self._prompt_ids()
            if dropped:   # the kept keys and values cannot serve a prompt that lost its beginning
                rest = ("the rest's keys and values are kept, moved up to their new positions" if s.context_shift
                        else "the rest is computed again")
                self._emit(Notice(f"The conversation is past the {self._context_limit()}-token context: "
                                  f"{dropped} more of its oldest messages are left out ({self._first_kept} in "
                                  f"all); {rest}"))
            if self._context is None:
                self._context = model.new_context(shift=s.context_shift)
            # A tokenizer's end-of-turn token may not be among config.json's eos ids; stop on it too.
            eos = tok.eos_id
            stream = tok.stream()
            gen = model.generate(ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                 top_p=s.top_p, repetition_penalty=s.repetition_penalty, seed=s.seed,
                                 cancel=self._stop,   # also interrupts a long prompt between chunks
                                 context=self._context)
            try:
                for t in gen:
                    if t == eos:
                        break
                    n += 1
                    if n == 1:
                        first = time.perf_counter() - t0
                    piece = stream.push(t)
                    if piece:
                        reply.append(piece)
                        self._emit(Text(piece))
                    if self._stop.is_set():
                        stopped = True
                        break
            finally:
                gen.close()       # releases the model's run lock now, not when the generator is collected
            # the engine may have ended the reply itself on the stop flag (e.g. during the prompt)
            stopped = stopped or self._stop.is_set()
            tail = stream.flush()
            if tail:
                reply.append(tail)
                self._emit(Text(tail))
        except Exception as e:  # noqa: BLE001 - a thread boundary: every failure must reach the UI
            # Drop the unanswered question: chat templates often insist that roles alternate.
            if not reply and self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()
            else:
                self.messages.append({"role": "assistant", "content": "".join(reply)})
            self._emit(Failure(_describe(e)))
            self._emit(TurnDone(n, time.perf_counter() - t0, stopped=True, first_s=first, **self._prompt_stats(ids)))
            return
        self.messages.append({"role": "assistant", "content": "".join(reply)})
        self._emit(TurnDone(n, time.perf_counter() - t0, stopped, first_s=first, **self._prompt_stats(ids)))

    def _prompt_stats(self, ids: list[int]) -> dict[str, int]:
        kept = self._context.kept if self._context is not None and ids else 0
        return {"prompt_tokens": len(ids), "kept_tokens": kept}

    # ------------------------------------------------------------------ settings (run off the UI thread)
    def request(self, action: str) -> None:
        """Run a settings action (a method name below) on the settings thread; its outcome comes as an event."""
        fn = getattr(self, action)

        def run() -> None:
            try:
                self._emit(Notice(fn()))
            except Exception as e:  # noqa: BLE001 - report, stay usable
                self._emit(Failure(_describe(e)))

        if self.model is None:
            self._emit(Notice("The model is still loading"))
            return
        if not self._closed:
            self._settings_pool.submit(run)

    def _snap(self) -> dict:
        return self.model.telemetry()

    def budget_up(self) -> str:
        return self._set_budget(up=True)

    def budget_down(self) -> str:
        return self._set_budget(up=False)

    def _set_budget(self, up: bool) -> str:
        ram = self._snap().get("tiers", {}).get("ram", {})
        current = ram.get("bytes_budget") or self.requested_budget or ram.get("bytes_used") or 64 << 20
        new = next_budget(int(current), up)
        self.model.configure(ram_cache=new)
        self.requested_budget = new
        applied = self._snap().get("tiers", {}).get("ram", {}).get("bytes_budget")
        msg = f"RAM budget {_fmt(current)} → {_fmt(new)}"
        if applied != new:
            msg += f" requested; the {self._backend()} source keeps every expert in RAM and ignores it"
        return msg

    def cycle_policy(self) -> str:
        snap = self._snap()
        current = snap.get("policy")
        if current not in POLICIES:
            current = self.requested_policy if self.requested_policy in POLICIES else POLICIES[-1]
        new = POLICIES[(POLICIES.index(current) + 1) % len(POLICIES)]
        self.model.configure(policy=new)
        self.requested_policy = new
        if self._snap().get("policy") != new:
            return f"Eviction policy → {new} requested; the {self._backend()} source never evicts"
        return f"Eviction policy → {new}"

    def toggle_context_shift(self) -> str:
        on = not self.settings.context_shift
        self.settings.context_shift = on
        if self._context is not None:   # read at the start of each generation (engine.Context.keep)
            self._context.shift = on
        return ("Context shift on: past the context, the later turns' keys and values are kept, moved up" if on
                else "Context shift off: past the context, the later turns are computed again")

    def toggle_prefetch(self) -> str:
        on = not self.model.prefetch_enabled
        self.model.set_prefetch(on)
        return f"Prefetch {'on' if on else 'off'}"

    def pin_count(self) -> int:
        """How many experts 'pin hottest' pins: one token's worth (top-k in every MoE layer)."""
        spec = self.model.spec
        return max(1, spec.top_k * sum(spec.moe_layers))

    def pin_hottest(self) -> str:
        if self.model.experts is None:
            return "This model has no experts to pin"
        pairs = self.model.hottest_experts(self.pin_count())
        if not pairs:
            return "Nothing to pin yet: no expert has been used (send a prompt first)"
        self.model.experts.pin(pairs)
        return f"Pinned the {len(pairs)} hottest experts"

    def unpin_all(self) -> str:
        if self.model.experts is None:
            return "This model has no experts to unpin"
        self.model.experts.unpin_all()
        return "Unpinned all experts"

    def reset_counters(self) -> str:
        self.model.reset_telemetry()
        return "Counters reset"

    def _backend(self) -> str:
        return str(self._snap().get("io", {}).get("backend", "engine"))

    # ------------------------------------------------------------------ shutdown
    def close(self, timeout: float = 1.5) -> None:
        """Stop generation, join the threads, release the model, all within `timeout` seconds: a reply
        stops at its next token, but a long prefill cannot be interrupted, and quitting must stay
        prompt (the threads are daemons; a model still in use is left to the process exit)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in (self._gen, self._loader):
            if t is not None and t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        self._settings_pool.shutdown(wait=False, cancel_futures=True)
        if self.model is not None and not self.busy:
            self.model.close()


def _describe(e: BaseException) -> str:
    from engine import EngineError

    if isinstance(e, EngineError):
        return str(e)
    return f"{type(e).__name__}: {e}"
