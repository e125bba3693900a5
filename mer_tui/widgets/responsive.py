"""Size classes for small terminals: the stylesheet rearranges panels for `.narrow` and `.short`
screens, and the footer tightens so every key stays visible at 100 columns."""
from __future__ import annotations

from textual.geometry import Size
from textual.screen import Screen
from textual.widgets import Footer

NARROW_BELOW = 130     # columns
SHORT_BELOW = 40       # rows
PALETTE_HINT_FROM = 110


def fit(screen: Screen, size: Size) -> None:
    screen.set_class(size.width < NARROW_BELOW, "narrow")
    screen.set_class(size.height < SHORT_BELOW, "short")
    for footer in screen.query(Footer):
        footer.compact = size.width < NARROW_BELOW
        hint = size.width >= PALETTE_HINT_FROM          # ctrl+p works regardless
        if footer.show_command_palette != hint:
            footer.show_command_palette = hint
            footer.refresh(recompose=True)              # the footer reads this only when it composes
