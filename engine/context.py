"""A sequence kept between generations: its KV cache and the token ids that cache holds.

A chat sends the whole conversation again each turn, and all of it but the new message was computed
the turn before.  Handed back to `Model.generate`, a Context keeps the longest prefix its ids share
with the new prompt and computes only the rest (llama.cpp's server reuses its slot's cache the same
way), so a reply's first token waits for the new message, not for the conversation so far.

A chat past its context leaves its oldest turns out, and the prompt then parts from the context right
after its beginning (the system prompt).  A context made with `shift=True` then also keeps the part
of itself the prompt goes on with (the later turns): it takes the left-out tokens out of its cache and
rotates the keys after them to their new positions (llama.cpp's context shift).  Those keys and values
were computed with the left-out turns in view, so the replies are not quite those of a prompt computed
afresh; without `shift` everything after the beginning is computed again.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .kv_cache import KVCache

#: a span of the context the prompt goes on with is looked for only where it starts with this many of the
#: prompt's tokens (fewer to keep save nothing worth a search)
SHIFT_MIN_MATCH = 8


def _matched_span(held: Sequence[int], ids: Sequence[int], start: int) -> tuple[int, int]:
    """(skip, n): held[start + skip:] and ids[start:] share their first n tokens, n as large as can be
    (then skip as small), with skip >= 1; (0, 0) if nowhere do SHIFT_MIN_MATCH of them agree."""
    a, b = np.asarray(held[start + 1:], dtype=np.int64), np.asarray(ids[start:], dtype=np.int64)
    k = SHIFT_MIN_MATCH
    if len(a) < k or len(b) < k:
        return 0, 0
    windows = np.lib.stride_tricks.sliding_window_view(a, k)
    best = (0, 0)
    for off in np.flatnonzero((windows == b[:k]).all(axis=1)):
        length = min(len(a) - int(off), len(b))
        differ = np.flatnonzero(a[off:off + length] != b[:length])
        n = int(differ[0]) if len(differ) else length
        if n > best[1]:
            best = (int(off) + 1, n)
    return best


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids a and b have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Context:
    """Made by `Model.new_context()`; used by one generation at a time (the model's run lock)."""

    def __init__(self, owner: object, cache: KVCache, shift: bool = False):
        self.owner = owner          # the Model whose keys and values these are
        self.cache = cache
        self.shift = shift          # whether a part after where the prompt parts from it may be kept too
        self.shifted = 0            # tokens the last generation took out of the middle (shift)
        self.ids: list[int] = []    # the tokens whose keys and values the cache holds, in order
        self.kept = 0               # prompt tokens the last generation found here and did not compute

    def __len__(self) -> int:
        return len(self.ids)

    def keep(self, ids: Sequence[int], rotation: Callable[[int], Callable[[np.ndarray], np.ndarray]]) -> int:
        """Cut the cache to the prefix it shares with the prompt `ids` (with `shift`, and the span of it the
        prompt goes on with after that, moved up), less the prompt's last token (whose logits the generation
        needs, so it is computed again); return the length kept.  rotation(by) gives the function that
        turns keys `by` positions back (KVCache.remove)."""
        n = shared_prefix(self.ids, ids)
        self.shifted = 0
        if self.shift and n < len(self.ids) and n < len(ids):
            skip, more = _matched_span(self.ids, ids, n)
            if more:
                self.cache.truncate(n + skip + more)   # nothing past the span is moved
                self.cache.remove(n, skip, rotation(skip))
                del self.ids[n + skip + more:]
                del self.ids[n:n + skip]
                n, self.shifted = n + more, skip
        n = min(n, len(ids) - 1)
        del self.ids[n:]
        self.cache.truncate(n)
        self.kept = n
        return n

    def clear(self) -> None:
        """Forget the sequence (a new conversation); the cache's room stays for the next one."""
        self.ids.clear()
        self.cache.truncate(0)
        self.kept = self.shifted = 0
