"""The Textual app: a chat beside live panels of what the engine does.

The app holds no engine logic.  It talks to a Session (mer_tui.session), which owns the threads;
a timer at 10 Hz drains the session's events into the chat, polls one telemetry snapshot and
redraws the panels from it inside one batch update.  A ReplaySession in its place (recorded
snapshots, no model) gives the same screen every time, for the snapshot tests.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Protocol

from textual import events
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Container, Horizontal
from textual.screen import Screen
from textual.widgets import Footer

from .export import export_bundle
from .session import Event, Failure, ModelInfo, Notice, Text, TurnDone
from .textpace import TextPacer
from .timeseries import TimeSeries
from .widgets import ChatPane, ExpertHeatmap, IOQueuePlot, LoadingScreen, ModelHeader, ThroughputPlot, TierGauges
from .widgets.responsive import fit

TICK_S = 0.1          # telemetry poll and token drain: about 10 Hz
# The panels are drawn in the interpreter that the decoding thread and the expert readers also need,
# so what they cost comes off decoding (bench/app_decode.py measures it: drawn at every tick they cut
# the stress demo to 12 tok/s against 28-32 without the app).  The reply's text and the header (one
# line) are drawn at every tick; while a reply streams the gauges at 5 Hz, and the plots (plotext,
# ~10 ms each) and the heatmap (decayed counts, which change slowly) at 1 Hz each, on different ticks
# so that no tick draws two of them; all of them again when the reply ends.  When idle the gauges
# and the header are checked at every tick (a key's effect shows at once; they draw only what
# changed) and the rest drawn at 1 Hz (the plots only scroll then).
# Panel -> (ticks between two draws, the tick of those it is drawn on).
BUSY_CADENCE = {"header": (1, 0), "tiers": (2, 1), "throughput": (10, 0), "ioqueue": (10, 4), "heatmap": (10, 8)}
IDLE_CADENCE = {"header": (1, 0), "tiers": (1, 0), "throughput": (10, 0), "ioqueue": (10, 0), "heatmap": (10, 0)}
PANELS = frozenset(BUSY_CADENCE)

# (action, key, footer label, palette name, palette help)
TUNING = [
    ("budget_down", "f2", "RAM−", "RAM budget down", "Shrink the RAM cache budget (x0.8)"),
    ("budget_up", "f3", "RAM+", "RAM budget up", "Grow the RAM cache budget (x1.25)"),
    ("cycle_policy", "f4", "Policy", "Cycle eviction policy", "lru → lfu → lfu-decay → router"),
    ("toggle_prefetch", "f5", "Prefetch", "Toggle prefetch", "Read the experts of the next two layers ahead, or not"),
    ("pin_hottest", "f6", "Pin", "Pin hottest experts", "Keep the most used experts resident"),
    ("unpin_all", "f7", "Unpin", "Unpin all experts", "Let every expert be evicted again"),
    ("reset_counters", "f8", "Reset", "Reset counters", "Zero hit rates, reads and activation counts"),
]


class SessionLike(Protocol):
    """What the app needs from a session (Session or ReplaySession)."""
    info: ModelInfo
    status: str
    progress: tuple[str, int, int]
    load_error: str | None
    busy: bool
    messages: list[dict[str, str]]
    requested_budget: int | None

    def start(self) -> None: ...
    def telemetry(self) -> dict | None: ...
    def drain(self) -> list[Event]: ...
    def send(self, text: str) -> bool: ...
    def stop(self) -> None: ...
    def new_chat(self) -> bool: ...
    def regenerate(self) -> bool: ...
    def request(self, action: str) -> None: ...
    def close(self, timeout: float = 1.5) -> None: ...


class MainScreen(Screen):
    """The chat and the panels.  The app keeps references to the widgets (no query per tick)."""

    def compose(self) -> ComposeResult:
        yield ModelHeader(id="header")
        with Horizontal(id="main"):
            yield ChatPane(id="chat")
            # A grid, so the stylesheet can rearrange the panels for small terminals.
            with Container(id="panels"):
                yield ThroughputPlot(id="throughput")
                yield IOQueuePlot(id="ioqueue")
                yield TierGauges(id="tiers")
                yield ExpertHeatmap(id="heatmap")
        yield Footer()

    def on_resize(self, event: events.Resize) -> None:
        fit(self, event.size)       # panels give way to the chat on small terminals (see app.tcss)

    def on_mount(self) -> None:
        fit(self, self.app.size)
        titles = {"#chat": "Chat", "#tiers": "Cache tiers", "#heatmap": "Expert activations: layers × experts"}
        for sel, title in titles.items():
            self.query_one(sel).border_title = title


class MerApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "mer-tui"
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        *(Binding(key, action, label) for action, key, label, *_ in TUNING),
        Binding("ctrl+r", "regenerate", "Retry"),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+s", "export", "Export"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, session: SessionLike, export_dir: str | os.PathLike = ".", **kwargs) -> None:
        super().__init__(**kwargs)
        self.session = session
        self.export_dir = export_dir
        self.series = TimeSeries()
        self.snapshot: dict | None = None
        self._ticks = 0
        self._loaded = False
        self._failed = False
        self._last_time: float | None = None
        self._pacer = TextPacer()
        self.chat: ChatPane | None = None
        self.panels: tuple = ()

    # ------------------------------------------------------------------ setup
    def on_mount(self) -> None:
        self.session.start()
        ready = self.session.status == "ready"
        self.push_screen(MainScreen(id="main-screen") if ready else LoadingScreen(self.session.info))
        self.set_interval(TICK_S, self._tick)

    @property
    def main(self) -> MainScreen:
        return next(s for s in self.screen_stack if isinstance(s, MainScreen))

    def _main_composed(self) -> bool:
        main = next((s for s in self.screen_stack if isinstance(s, MainScreen)), None)
        return main is not None and bool(main.query(ChatPane)) and bool(main.query(ModelHeader))

    def _became_ready(self) -> None:
        main = self.main
        self.chat = main.query_one(ChatPane)
        self.panels = (main.query_one(ModelHeader), main.query_one(TierGauges), main.query_one(ExpertHeatmap),
                       main.query_one(ThroughputPlot), main.query_one(IOQueuePlot))
        self._loaded = True
        self.refresh_bindings()      # the footer shows the model keys from now on
        chat = self.chat
        info = self.session.info
        if info.note:
            chat.add_note(info.note, "note demo")
        for m in self.session.messages:      # a resumed conversation, or a recorded one (replay)
            if m["role"] == "user":
                chat.add_user(m["content"])
            elif m["role"] == "assistant":
                chat.add_assistant(m["content"])
        draft = getattr(self.session, "draft", None)
        if draft:
            chat.input.value = draft
            chat.add_note("The conversation's last message had no reply: it is in the box below, Enter sends it.")
        history = getattr(self.session, "history", None)
        if history is not None:
            for snap in history():
                self._push(snap)
        chat.input.disabled = False
        chat.input.focus()
        self._ticks = -1      # the first tick after this draws every panel

    # ------------------------------------------------------------------ the timer
    def _tick(self) -> None:
        s = self.session
        if not self._loaded:
            if s.status == "ready":
                if isinstance(self.screen, LoadingScreen):
                    self.switch_screen(MainScreen(id="main-screen"))
                if not self._main_composed():
                    return          # composing; the next tick carries on
                self._became_ready()
            elif s.status == "failed":
                if not self._failed and isinstance(self.screen, LoadingScreen):
                    self._failed = True
                    self.screen.show_error(s.load_error or "unknown error")
                    self.notify(s.load_error or "unknown error", title="Could not load the model",
                                severity="error", timeout=10)
                return
            else:
                if isinstance(self.screen, LoadingScreen):
                    self.screen.update_progress(*s.progress)
                return
        main = next((x for x in self.screen_stack if isinstance(x, MainScreen)), None)
        if main is None or not main.is_attached or main._pruning:
            return          # shutting down: the screen's widgets are going away
        self._ticks += 1
        self._pacer.tick(time.thread_time())
        events = s.drain()
        snap = s.telemetry()
        with self.batch_update():
            for ev in events:
                self._handle(ev)
            now = time.monotonic()
            if self.chat.undrawn and self._pacer.due(now):
                self.chat.draw_reply()
                self._pacer.drew(now)
            if snap is not None:
                self._push(snap)
                self.snapshot = snap
            ended = any(isinstance(ev, (TurnDone, Failure)) for ev in events)
            first = self._ticks == 0
            self._redraw(PANELS if ended or first else self._due(BUSY_CADENCE if s.busy else IDLE_CADENCE))

    def _due(self, cadence: dict[str, tuple[int, int]]) -> frozenset[str]:
        """The panels whose turn it is at this tick."""
        return frozenset(name for name, (every, at) in cadence.items() if self._ticks % every == at)

    def _push(self, snap: dict) -> None:
        t = snap.get("time")
        if t is not None and t == self._last_time:
            return          # nothing new (a replay, or a poll faster than the engine's clock)
        self._last_time = t
        self.series.push(snap)

    def _redraw(self, panels: frozenset[str] = PANELS) -> None:
        header, tiers, activations, throughput, ioqueue = self.panels
        snap, state = self.snapshot, ("generating" if self.session.busy else "idle")
        if "header" in panels:
            tps = self.series.cols["tokens_per_s"][-1] if len(self.series) else None
            header.update_from(self.session.info, snap, state, tps)
        if "tiers" in panels:
            tiers.update_from(snap, self.session.requested_budget)
        if "heatmap" in panels:
            activations.update_from(snap)
        if "throughput" in panels:
            throughput.update_from(self.series)
        if "ioqueue" in panels:
            ioqueue.update_from(self.series)

    def _handle(self, ev: Event) -> None:
        chat = self.chat
        if isinstance(ev, Text):
            chat.append_reply(ev.text, draw=False)     # drawn when the pacer says (see _tick)
        elif isinstance(ev, TurnDone):
            parts = [f"{ev.tokens} tokens in {ev.seconds:.1f} s"]
            if ev.tokens:
                parts.append(f"first after {ev.first_s:.1f} s")
            if ev.decode_tokens_per_s:
                parts.append(f"{ev.decode_tokens_per_s:.1f} tok/s")
            if ev.prompt_tokens:
                # the conversation so far is resent each turn; what was computed before is kept, not redone
                kept = f", {ev.kept_tokens} kept" if ev.kept_tokens else ""
                parts.append(f"prompt {ev.prompt_tokens} tokens{kept}")
            chat.end_reply(" · ".join(parts) + (" — stopped" if ev.stopped else ""))
        elif isinstance(ev, Notice):
            self.notify(ev.message, timeout=4)
        elif isinstance(ev, Failure):
            chat.add_note(f"**Engine error:** {ev.message}", "note error")
            self.notify(ev.message, title="Engine error", severity="error", timeout=10)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        # Until a model is loaded only quitting (and the palette) make sense: hide the rest from the footer.
        if not self._loaded and action in self._MODEL_ACTIONS:
            return False
        return True

    _MODEL_ACTIONS = frozenset([a for a, *_ in TUNING] + ["stop", "export", "new_chat", "regenerate"])

    # ------------------------------------------------------------------ chat
    def on_chat_pane_submitted(self, message: ChatPane.Submitted) -> None:
        if not self._loaded:
            return
        if self.session.busy:
            self.notify("Still replying — Esc stops the reply", severity="warning", timeout=3)
            return
        chat = self.chat
        if self.session.send(message.text):
            chat.input.value = ""
            chat.add_user(message.text)
            chat.begin_reply()
            self._pacer.new_reply()

    def action_stop(self) -> None:
        if self.session.busy:
            self.session.stop()

    def action_regenerate(self) -> None:
        if not self._loaded:
            return
        if self.session.busy:
            self.notify("Still replying — Esc stops the reply", severity="warning", timeout=3)
            return
        if not self.session.regenerate():
            self.notify("No reply to generate again yet", severity="warning", timeout=3)
            return
        self.chat.drop_last_reply()
        self.chat.begin_reply()
        self._pacer.new_reply()

    def action_new_chat(self) -> None:
        if not self._loaded:
            return
        if not self.session.new_chat():
            self.notify("Still replying — Esc stops the reply", severity="warning", timeout=3)
            return
        self.chat.clear()
        if self.session.info.note:
            self.chat.add_note(self.session.info.note, "note demo")

    # ------------------------------------------------------------------ tuning
    def _request(self, action: str) -> None:
        if not self._loaded:
            self.notify("The model is still loading", severity="warning", timeout=3)
            return
        self.session.request(action)

    def action_budget_down(self) -> None:
        self._request("budget_down")

    def action_budget_up(self) -> None:
        self._request("budget_up")

    def action_cycle_policy(self) -> None:
        self._request("cycle_policy")

    def action_toggle_prefetch(self) -> None:
        self._request("toggle_prefetch")

    def action_toggle_context_shift(self) -> None:
        self._request("toggle_context_shift")

    def action_pin_hottest(self) -> None:
        self._request("pin_hottest")

    def action_unpin_all(self) -> None:
        self._request("unpin_all")

    def action_reset_counters(self) -> None:
        self.series.clear()
        self._last_time = None
        self._request("reset_counters")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for action, key, _label, name, help_text in TUNING:
            yield SystemCommand(name, f"{help_text} ({key})", getattr(self, f"action_{action}"))
        yield SystemCommand("Stop reply", "Stop generating at the next token (esc)", self.action_stop)
        yield SystemCommand("Retry", "Generate the last reply again (ctrl+r)", self.action_regenerate)
        yield SystemCommand("New chat", "Forget the conversation and start another (ctrl+n)", self.action_new_chat)
        yield SystemCommand("Toggle context shift",
                            "Past the context, keep the later turns' keys and values (moved up), or compute them "
                            "again", self.action_toggle_context_shift)
        yield SystemCommand("Export telemetry",
                            "SVG screenshot + JSON (telemetry, conversation) + CSV into the export folder (ctrl+s)",
                            self.action_export)

    # ------------------------------------------------------------------ export and quit
    def action_export(self) -> None:
        try:
            system = getattr(self.session, "system_prompt", None)
            conversation = ([{"role": "system", "content": system}] if system else []) + list(self.session.messages)
            paths = export_bundle(self.export_dir, self.export_screenshot(), self.snapshot, self.series,
                                  model={"name": self.session.info.name, "path": self.session.info.path},
                                  conversation=conversation)
        except OSError as e:
            self.notify(f"{e}", title="Export failed", severity="error", timeout=8)
            return
        self.notify("\n".join(str(p) for p in paths), title="Exported", timeout=6)

    async def action_quit(self) -> None:
        self.session.close()
        self.exit()

    def on_unmount(self) -> None:
        self.session.close()
