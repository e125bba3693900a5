"""When the app hands the streaming reply's new text to its widget.

A Markdown append re-renders the reply's last block whole: cheap for a sentence, not for a code
block of a few hundred lines (600 lines took ~260 ms of the main thread an append, most of it the
compositor drawing the highlighted block).  Drawn at every tick, such a reply held the interpreter
the decoding thread and the readers need, and the app fell behind.  So the text is drawn at every
tick while that is cheap and less often as it grows costly: on average at most SHARE of the main
thread, and at least every MAX_WAIT_S.  What a draw costs is measured, not guessed: the main
thread's CPU time over the tick interval that followed it, less that of intervals without one.
"""
from __future__ import annotations

SHARE = 0.25
MAX_WAIT_S = 2.0


class TextPacer:
    def __init__(self) -> None:
        self.base_s = 0.0        # main-thread CPU of a tick interval without a draw (moving average)
        self.cost_s = 0.0        # what the last draw added to its interval
        self._mark: float | None = None
        self._drew = False
        self._last_draw = float("-inf")

    def tick(self, cpu_s: float) -> None:
        """At the start of every tick, with the main thread's CPU time (time.thread_time())."""
        if self._mark is not None:
            spent = cpu_s - self._mark
            if self._drew:
                self.cost_s = max(0.0, spent - self.base_s)
            else:
                self.base_s += 0.2 * (spent - self.base_s)
        self._mark, self._drew = cpu_s, False

    def new_reply(self) -> None:
        """A reply begins: its first block is new, so what drawing the last one cost no longer holds."""
        self.cost_s, self._last_draw = 0.0, float("-inf")

    def due(self, now: float) -> bool:
        """Whether text waiting to be drawn should be drawn at `now` (time.monotonic())."""
        return now - self._last_draw >= min(MAX_WAIT_S, self.cost_s / SHARE)

    def drew(self, now: float) -> None:
        self._last_draw, self._drew = now, True
