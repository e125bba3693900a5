"""A sequence kept between generations: its KV cache and the token ids that cache holds.

A chat sends the whole conversation again each turn, and all of it but the new message was computed
the turn before.  Handed back to `Model.generate`, a Context keeps the longest prefix its ids share
with the new prompt and computes only the rest (llama.cpp's server reuses its slot's cache the same
way), so a reply's first token waits for the new message, not for the conversation so far.
"""
from __future__ import annotations

from collections.abc import Sequence

from .kv_cache import KVCache


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

    def __init__(self, owner: object, cache: KVCache):
        self.owner = owner          # the Model whose keys and values these are
        self.cache = cache
        self.ids: list[int] = []    # the tokens whose keys and values the cache holds, in order
        self.kept = 0               # prompt tokens the last generation found here and did not compute

    def __len__(self) -> int:
        return len(self.ids)

    def keep(self, ids: Sequence[int]) -> int:
        """Cut the cache to the prefix it shares with the prompt `ids`, less the prompt's last token
        (whose logits the generation needs, so it is computed again); return that prefix's length."""
        n = min(shared_prefix(self.ids, ids), len(ids) - 1)
        del self.ids[n:]
        self.cache.truncate(n)
        self.kept = n
        return n

    def clear(self) -> None:
        """Forget the sequence (a new conversation); the cache's room stays for the next one."""
        self.ids.clear()
        self.cache.truncate(0)
        self.kept = 0
