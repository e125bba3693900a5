"""The screen shown while the model loads (or fails to): progress, and what this model is."""
from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Markdown, ProgressBar, Static

from engine import format_size

from ..session import ModelInfo
from .responsive import fit

STAGES = {
    "experts": "Reading expert weights",
    "build": "Building the random stress model (first launch only)",
}
BYTE_STAGES = {"build"}      # stages that count bytes, not items


class LoadingScreen(Screen):
    def __init__(self, info: ModelInfo) -> None:
        super().__init__(id="loading")
        self.info = info

    def compose(self) -> ComposeResult:
        with Center(), Vertical(id="loading-box"):
            yield Static(f"Loading [b]{self.info.name}[/b]", id="loading-title")
            yield Static(self.info.path, id="loading-path", markup=False)
            yield ProgressBar(total=None, show_eta=False, id="loading-bar")
            yield Static("Starting…", id="loading-stage", markup=False)
            if self.info.note:
                yield Markdown(self.info.note, id="loading-note")
        yield Footer()

    def on_mount(self) -> None:
        fit(self, self.app.size)

    def on_resize(self, event: events.Resize) -> None:
        fit(self, event.size)

    def update_progress(self, stage: str, done: int, total: int) -> None:
        if not self.is_mounted or not self.query(ProgressBar):
            return              # the first tick can come before this screen has composed
        bar = self.query_one(ProgressBar)
        if total:
            bar.update(total=total, progress=done)
        label = STAGES.get(stage, stage.replace("_", " ").capitalize() or "Starting")
        if stage in BYTE_STAGES and total:
            count = f"{format_size(done)} of {format_size(total)}"
        else:
            count = f"{done}/{total}"
        self.query_one("#loading-stage", Static).update(f"{label}: {count}" if total else f"{label}…")

    def show_error(self, message: str) -> None:
        self.query_one("#loading-title", Static).update(f"Could not load [b]{self.info.name}[/b]")
        self.query_one(ProgressBar).display = False
        stage = self.query_one("#loading-stage", Static)
        stage.update(f"{message}\n\nLoad another model with `mer-tui launch --model PATH`; ctrl+q quits.")
        stage.add_class("error")
