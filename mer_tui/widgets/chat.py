"""The chat pane: the conversation as Markdown, an input line, and the reply streaming in.

The app feeds text in batches (whatever the generation thread produced since the last tick) and
draws it at most once a tick, less often when drawing the reply grows costly (mer_tui/textpace.py);
the log is anchored to its end while a reply streams, until the user scrolls up to read.
"""
from __future__ import annotations

import re
import unicodedata

from textual import events
from textual.app import ComposeResult
from textual.await_complete import AwaitComplete
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Input, Markdown, Static

# Model output may contain anything (a random model emits any byte); the terminal must only ever get
# text it draws as Textual measured it.  Replaced: control characters (C0 but newline and tab, DEL,
# and C1, which some terminals still obey: U+009B is a CSI), the bidirectional embeddings, overrides
# and isolates (a terminal that reorders text would draw it elsewhere than Textual placed it), the
# line and paragraph separators, and code points this Python's Unicode does not assign (Textual counts
# them one cell, terminals zero or one: the stress demo's replies shifted the panels beside them).
# Unassigned points in the pictograph planes are kept: newer emoji than this Python knows land there.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _assigned(c: str) -> bool:
    return unicodedata.category(c) != "Cn" or 0x1F000 <= ord(c) <= 0x1FFFF


def printable(text: str) -> str:
    text = _UNSAFE.sub("\ufffd", text)
    if text.isascii():
        return text
    return "".join(c if _assigned(c) else "\ufffd" for c in text)


class _StreamedMarkdown(Markdown):
    """The reply being streamed.  Markdown's own mount handler sets its source to the initial text,
    replacing whatever was appended before: text that comes first (a reply begun and fed within one
    tick) is held and appended once that handler has run, and what follows after it, in order."""

    def __init__(self, **kwargs) -> None:
        super().__init__("", **kwargs)
        self._early: str | None = ""      # None once appended

    def append(self, markdown: str) -> AwaitComplete:
        if self._early is not None:
            self._early += markdown
            return AwaitComplete()
        return super().append(markdown)

    def _on_mount(self, event: events.Mount) -> None:
        # Textual calls Markdown's _on_mount after this one (a handler per class): append after it.
        self.call_later(self._append_early)

    def _append_early(self) -> None:
        early, self._early = self._early, None
        if early:
            super().append(early)


class ChatPane(Vertical):
    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._reply: Markdown | None = None     # the reply being streamed
        self._reply_text = ""
        self._drawn = 0

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="chat-log")
        # Disabled until the app has the model (MerApp._became_ready, up to a tick after this screen
        # composes): an Enter typed in between would otherwise be dropped without a word.
        yield Input(placeholder="Message — Enter sends, Esc stops the reply", id="prompt", disabled=True)

    @property
    def chat_log(self) -> VerticalScroll:
        return self.query_one("#chat-log", VerticalScroll)

    @property
    def input(self) -> Input:
        return self.query_one("#prompt", Input)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        if text:
            self.post_message(self.Submitted(text))

    def _add(self, widget) -> None:
        self.chat_log.mount(widget)
        self.chat_log.anchor()

    def clear(self) -> None:
        """Empty the log (a new chat)."""
        self.chat_log.remove_children()
        self._reply, self._reply_text, self._drawn = None, "", 0

    def drop_last_reply(self) -> None:
        """Remove the last reply and the line under it (the reply is being generated again)."""
        widgets = list(self.chat_log.children)
        last = next((i for i in range(len(widgets) - 1, -1, -1) if widgets[i].has_class("assistant")), None)
        if last is not None:
            for w in widgets[last:]:
                if w.has_class("assistant") or w.has_class("meta"):
                    w.remove()

    def add_note(self, markdown: str, kind: str = "note") -> None:
        """A line from the app, not the model: the demo notice, an error, a stop."""
        self._add(Markdown(markdown, classes=f"msg {kind}"))

    def add_user(self, text: str) -> None:
        self._add(Static(printable(text), classes="msg user", markup=False))

    def add_assistant(self, text: str) -> None:
        """A finished reply (e.g. from a recorded conversation)."""
        self._add(Markdown(printable(text), classes="msg assistant"))

    def begin_reply(self) -> None:
        self._reply_text = ""
        self._drawn = 0          # how much of _reply_text the widget has been given
        self._reply = _StreamedMarkdown(classes="msg assistant streaming")
        self._add(self._reply)

    def append_reply(self, text: str, draw: bool = True) -> None:
        """Add text to the reply being streamed; drawn now, or (draw=False) at the next draw_reply()."""
        if self._reply is None:
            self.begin_reply()
        self._reply_text += printable(text)
        if draw:
            self.draw_reply()

    @property
    def undrawn(self) -> bool:
        return self._reply is not None and self._drawn < len(self._reply_text)

    def draw_reply(self) -> None:
        """Hand the reply's widget the text that came since it was last drawn."""
        if self.undrawn:
            self._reply.append(self._reply_text[self._drawn:])
            self._drawn = len(self._reply_text)

    def end_reply(self, footer: str | None = None) -> None:
        if self._reply is not None:
            self.draw_reply()
            self._reply.remove_class("streaming")
            if not self._reply_text.strip():
                self._reply.append("*(no text)*")   # held like any text if the reply is not mounted yet
        if footer:
            self._add(Static(footer, classes="msg meta", markup=False))
        self._reply = None

    @property
    def reply_text(self) -> str:
        return self._reply_text
