"""Decode speed inside the app against the same session without it: what drawing the panels costs.

The app draws in the interpreter that the decoding thread and the expert readers also need, so every
millisecond the panels take is one a token may wait.  This runs the same chat turns twice, alternating:
through `mer-tui launch`'s own plan and app, driven headless (Textual's run_test), and through the
bare Session the app wraps, polled as the app polls it; each turn's decode tokens/s is the Session's own
count (TurnDone), so both sides are measured alike.

    .venv/bin/python -m bench.app_decode                       # the chat demo at a 2 MiB budget
    .venv/bin/python -m bench.app_decode --launch "--demo stress" --max-new-tokens 48
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time

from mer_tui import launch
from mer_tui.cli import build_parser
from mer_tui.session import GenerationSettings, Session, TurnDone

PROMPTS = ["Tell me a story.", "Tell me another story.", "Tell me a story about a dog."]
SIZE = (160, 50)


def _session(launch_args: str, max_new_tokens: int) -> Session:
    args = build_parser().parse_args(["launch", *shlex.split(launch_args)])
    loader, info, budget = launch.plan(args)
    # Sampled as the app samples, with a seed, so both sides decode alike.
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                                  repetition_penalty=args.repetition_penalty, seed=1)
    return Session(loader, info=info, policy=args.policy, ram_budget=budget, settings=settings,
                   system_prompt=args.system)


def _rates(events) -> list[float]:
    return [ev.decode_tokens_per_s for ev in events if isinstance(ev, TurnDone) and ev.decode_tokens_per_s]


def bare(launch_args: str, max_new_tokens: int, turns: int, tick_s: float) -> list[float]:
    """Decode tokens/s of each turn, the session polled for telemetry and events every `tick_s`."""
    s = _session(launch_args, max_new_tokens)
    s.start()
    try:
        while s.status not in ("ready", "failed"):
            time.sleep(0.05)
        if s.status == "failed":
            raise SystemExit(f"app_decode: {s.load_error}")
        rates: list[float] = []
        for text in (PROMPTS * turns)[:turns]:
            s.send(text)
            while s.busy:
                time.sleep(tick_s)
                s.telemetry()
                rates += _rates(s.drain())
            rates += _rates(s.drain())
        return rates
    finally:
        s.close()


def in_app(launch_args: str, max_new_tokens: int, turns: int) -> list[float]:
    """Decode tokens/s of each turn sent through the app's chat input, the app drawing as it does."""
    from mer_tui.app import MerApp
    from mer_tui.widgets import ChatPane

    s = _session(launch_args, max_new_tokens)
    app = MerApp(s, export_dir=".")
    turns_done: list[TurnDone] = []
    handle = app._handle

    def record(ev) -> None:   # the app drains the events; read the turns' figures on the way
        if isinstance(ev, TurnDone):
            turns_done.append(ev)
        handle(ev)
    app._handle = record

    async def drive() -> None:
        async with app.run_test(size=SIZE) as pilot:
            async def until(cond, what: str, timeout: float = 600.0) -> None:
                end = time.monotonic() + timeout
                while not cond():
                    if time.monotonic() > end:
                        raise SystemExit(f"app_decode: timed out waiting for {what}")
                    await pilot.pause(0.05)
            await until(lambda: s.status in ("ready", "failed") and bool(app.panels), "the model")
            if s.status == "failed":
                raise SystemExit(f"app_decode: {s.load_error}")
            chat = app.main.query_one(ChatPane)
            for n, text in enumerate((PROMPTS * turns)[:turns]):
                chat.input.focus()
                chat.input.value = text
                await until(lambda: chat.input.has_focus, "the input's focus")
                await pilot.press("enter")
                await until(lambda n=n: len(turns_done) > n, "the reply")
    try:
        asyncio.run(drive())
    finally:
        s.close()
    return _rates(turns_done)


def main(argv: list[str] | None = None) -> int:
    from mer_tui.app import TICK_S

    p = argparse.ArgumentParser(prog="python -m bench.app_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--launch", default="--ram-cache 2MiB", help="options of `mer-tui launch` (default: the "
                   "chat demo at a 2 MiB budget)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--turns", type=int, default=6, help="chat turns a run (default 6)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (default 3)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.turns < 1 or args.rounds < 1 or args.max_new_tokens < 1:
        print("app_decode: --turns, --rounds and --max-new-tokens must be >= 1", file=sys.stderr)
        return 2
    runs: dict[str, list[float]] = {"app": [], "session": []}
    for r in range(args.rounds):
        for side in (("app", "session") if r % 2 == 0 else ("session", "app")):
            rates = (in_app(args.launch, args.max_new_tokens, args.turns) if side == "app"
                     else bare(args.launch, args.max_new_tokens, args.turns, TICK_S))
            runs[side].append(statistics.median(rates) if rates else 0.0)
            print(f"  round {r}: {side:7s} median decode {runs[side][-1]:.1f} tok/s of {len(rates)} turns",
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    if args.json:
        print(json.dumps({"launch": args.launch, "runs": runs, "median": med}, indent=2))
    else:
        print(f"decode tok/s, median over {args.rounds} runs of {args.turns} turns' medians: app "
              f"{med['app']:.1f}, session alone {med['session']:.1f} ({med['app'] / med['session']:.0%})"
              if med["session"] else "no turn decoded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
