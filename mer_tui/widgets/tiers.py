"""Cache tiers: hit rate per tier (RAM, VRAM when present), SSD reads, occupancy against the budget.

Everything shown is read from the snapshot, including the budget, policy and prefetch state: the
UI shows what the engine applies, not what was asked for (a source may ignore a setting; the
requested value is shown beside it when they differ).
"""
from __future__ import annotations

from collections.abc import Mapping

from rich.style import StyleType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from engine import format_size
from engine.telemetry import most_waited

# Colours come from the stylesheet (component classes tiers--hit etc. in app.tcss); these are the
# fallbacks for rendering without an app (tests, exports).
DEFAULT_STYLES: dict[str, StyleType] = {"hit": "green", "used": "cyan", "on": "green", "off": "yellow",
                                        "asked": "yellow", "track": "dim"}


def bar(fraction: float | None, width: int, style: StyleType, track: StyleType = "dim") -> Text:
    """A horizontal gauge: filled blocks (eighths for precision) on a dim track; None: no gauge."""
    t = Text(no_wrap=True)
    if fraction is None:
        return t.append("╌" * width, style=track)
    f = min(1.0, max(0.0, fraction))
    eighths = round(f * width * 8)
    full, part = divmod(eighths, 8)
    t.append("█" * full, style=style)
    if part and full < width:
        t.append(" ▏▎▍▌▋▊▉"[part], style=style)
        full += 1
    t.append("░" * (width - full), style=track)
    return t


def _ms(v: float) -> str:
    """Milliseconds in two or three digits, so that the Waits row fits its column."""
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def render_tiers(snap: dict | None, width: int, requested_budget: int | None = None,
                 styles: Mapping[str, StyleType] = DEFAULT_STYLES) -> Table | Text:
    if not snap:
        return Text("waiting for the engine…", style="dim")
    tiers = snap.get("tiers") or {}
    # label | gauge | value: labels and values keep their width, the gauge takes what is left.
    label_w = 8
    value_w = max(12, min(26, (width - label_w) // 2))
    gauge_w = max(4, min(28, width - label_w - value_w - 2))
    t = Table.grid(padding=(0, 1))
    t.add_column(no_wrap=True, style="bold", width=label_w)
    t.add_column(no_wrap=True, width=gauge_w)
    t.add_column(no_wrap=True, overflow="ellipsis", width=max(8, width - label_w - gauge_w - 2))

    for name in ("ram", "vram"):
        tier = tiers.get(name)
        if not tier:
            continue
        label = name.upper()
        hit = tier.get("hit_rate")
        seen = (tier.get("hits") or 0) + (tier.get("misses") or 0)
        t.add_row(f"{label} hit", bar(hit if seen else None, gauge_w, styles["hit"], styles["track"]),
                  Text(f"{100 * hit:.1f}%" if seen else "no reads yet", style="" if seen else "dim"))
        used, budget = tier.get("bytes_used") or 0, tier.get("bytes_budget")
        occ = Text(format_size(used) + " of " + (format_size(budget) if budget else "no limit"))
        t.add_row(f"{label} use", bar(used / budget if budget else None, gauge_w, styles["used"], styles["track"]), occ)
        detail = Text(f"{tier.get('entries', 0)} experts", style="dim")
        pins = Text(f"{tier.get('pinned', 0)} pinned", style="dim")
        if name == "ram" and requested_budget is not None and requested_budget != budget:
            pins = Text(f"asked {format_size(requested_budget)}", style=styles["asked"])
        t.add_row("", detail, pins)

    # The keys and values the model holds (a chat's, kept between turns), against the model's context.
    kv = snap.get("kv")
    if kv is not None:
        tokens, context = kv.get("tokens") or 0, kv.get("context")
        t.add_row(f"KV {kv.get('format', '')}", bar(tokens / context if context else None, gauge_w, styles["used"],
                                                   styles["track"]),
                  Text(f"{tokens}/{context or '?'} tok, {format_size(kv.get('bytes') or 0)}"))

    # The SSD as a gauge of how much of the last seconds some read was under way: near 100% while
    # decoding, the disk is the bound (a bigger cache, or fewer wasted prefetches, helps); well below,
    # compute or the guessing of the next experts is.  Totals read are in the exported telemetry.
    ssd = tiers.get("ssd") or {}
    busy = ssd.get("busy") or 0.0
    t.add_row("SSD", bar(busy, gauge_w, styles["used"], styles["track"]),
              Text(f"{100 * busy:.0f}% busy, {ssd.get('read_mb_s') or 0.0:.0f} MB/s"))
    io = snap.get("io") or {}
    reader = str(io.get("backend", "?")) + (" O_DIRECT" if io.get("direct") else "")
    t.add_row("Reader", Text(reader),
              Text(f"p50 {io.get('read_ms_p50') or 0.0:.2f} p99 {io.get('read_ms_p99') or 0.0:.2f} ms"))
    pf = snap.get("prefetch") or {}
    issued, useful = pf.get("issued") or 0, pf.get("useful") or 0
    on = bool(pf.get("enabled"))
    t.add_row("Prefetch", Text("on" if on else "off", style=styles["on"] if on else styles["off"]),
              Text(f"{100 * useful / issued:.0f}% of {issued} useful" if issued else ""))
    if on and pf.get("guess_recall") is not None and issued:
        # How much of what the routers then picked the guesses of the layers ahead foresaw: what is not
        # foreseen is read while decoding waits.
        recall, precision = pf["guess_recall"], pf.get("guess_precision") or 0.0
        t.add_row("Guessed", bar(recall, gauge_w, styles["hit"], styles["track"]),
                  Text(f"{100 * recall:.0f}% picks, {100 * precision:.0f}% right"))
    waits = snap.get("waits") or {}
    recent = waits.get("recent_ms_per_token") or []
    if waits.get("steps") and tiers.get("ssd"):
        # How long a decoded token lately waited for experts the cache did not have, as a share of
        # the token's time, and the layers where it waited most: the first layers of a token wait
        # the longest (their experts are known only once the token is), which a budget or a policy
        # can change and the prefetch cannot.
        total = sum(recent)
        token_ms = waits.get("recent_token_ms")
        if token_ms is None:   # a recording from before the field: the speed of the last tokens instead
            tps = snap.get("tokens_per_s") or 0.0
            token_ms = 1e3 / tps if tps else 0.0
        worst = most_waited(recent, 2)
        share = min(1.0, total / token_ms) if token_ms else None
        t.add_row("Waits", bar(share, gauge_w, styles["off"], styles["track"]),
                  Text(f"{_ms(total)} ms:" + ",".join(f" L{i} {_ms(recent[i])}" for i in worst)))
    t.add_row("Policy", Text(str(snap.get("policy", "?"))), "")
    return t


class TierGauges(Static):
    COMPONENT_CLASSES = {f"tiers--{k}" for k in DEFAULT_STYLES}

    def _styles(self) -> dict[str, StyleType]:
        return {k: self.get_component_rich_style(f"tiers--{k}", partial=True) for k in DEFAULT_STYLES}

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._snap: dict | None = None
        self._requested: int | None = None
        self._shown: str | None = None

    def update_from(self, snap: dict | None, requested_budget: int | None = None) -> None:
        # Repaint only when what this panel shows changed (most ticks of an idle engine change nothing).
        s = snap or {}
        # repr, not the dicts: a snapshot's parts may be mutated in place between ticks.
        shown = repr((s.get("tiers"), s.get("io"), s.get("prefetch"), s.get("policy"), s.get("waits"),
                      s.get("tokens_per_s"), requested_budget))
        if self._snap is not None and shown == self._shown:
            return
        self._snap, self._requested, self._shown = snap, requested_budget, shown
        # The panel's size is its grid cell's, whatever it shows: no layout (Static.update's default
        # lays out the whole screen; with the header's, 62 of 169 layouts over four stress-demo turns).
        self.update(render_tiers(snap, self.content_size.width or 60, requested_budget, self._styles()), layout=False)

    def on_resize(self) -> None:
        self.update(render_tiers(self._snap, self.content_size.width or 60, self._requested, self._styles()))
