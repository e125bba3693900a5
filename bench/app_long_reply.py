"""What the app's main thread spends while a long code reply streams in, paced and drawn at every tick.

A Markdown append re-renders the reply's last block whole, so a long code block costs more to draw
with every line; mer_tui.textpace spaces the draws by their measured cost.  This streams the same
reply (a code block of `--lines` lines, two a chunk, `--chunks-per-s` chunks a second) from a session
without a model into `mer-tui launch`'s app, headless, and reports the main thread's CPU time as a
share of the streaming time, with the pacer and with the text drawn at every tick, alternating.

    .venv/bin/python -m bench.app_long_reply                  # 600 lines at 20 chunks a second
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

from mer_tui.app import MerApp
from mer_tui.session import Event, ModelInfo, Text, TurnDone
from mer_tui.textpace import TextPacer

SIZE = (160, 50)


class CodeSession:
    """The face of a Session that answers every message with the same code block, at a set pace."""

    def __init__(self, lines: int, chunks_per_s: float):
        self.info = ModelInfo(name="long reply", kind="model")
        self.status, self.progress, self.load_error = "ready", ("", 0, 0), None
        self.busy, self.messages, self.requested_budget = False, [], None
        self.chunks = (["Here is the code:\n\n```python\n"]
                       + [f"def function_{i}(x, y):\n    return x * {i} + y  # comment {i}\n"
                          for i in range(lines // 2)] + ["```\n"])
        self.chunks_per_s = chunks_per_s
        self._began = 0.0
        self._sent = 0

    def start(self) -> None:
        pass

    def telemetry(self) -> dict:
        return {"time": time.time(), "tokens": self._sent}

    def send(self, text: str) -> bool:
        self.messages.append({"role": "user", "content": text})
        self.busy, self._began, self._sent = True, time.monotonic(), 0
        return True

    def drain(self) -> list[Event]:
        out: list[Event] = []
        if self.busy:
            due = min(len(self.chunks), int((time.monotonic() - self._began) * self.chunks_per_s))
            out += [Text(c) for c in self.chunks[self._sent:due]]
            self._sent = max(self._sent, due)
            if self._sent == len(self.chunks):
                self.messages.append({"role": "assistant", "content": "".join(self.chunks)})
                out.append(TurnDone(self._sent, time.monotonic() - self._began, False))
                self.busy = False
        return out

    def stop(self) -> None:
        pass

    def request(self, action: str) -> None:
        pass

    def close(self, timeout: float = 1.5) -> None:
        pass


def stream_once(lines: int, chunks_per_s: float) -> dict:
    """One reply through the app: the main thread's CPU share while it streamed, and whether all of
    the text was shown."""
    session = CodeSession(lines, chunks_per_s)
    app = MerApp(session)

    async def drive() -> dict:
        async with app.run_test(size=SIZE) as pilot:
            while not app.panels:
                await pilot.pause(0.05)
            app.chat.input.value = "write some code"
            app.chat.input.focus()
            await pilot.pause(0.2)
            await pilot.press("enter")
            cpu, wall = time.thread_time(), time.perf_counter()
            while session.busy or app.chat.undrawn or app.chat._reply is not None:
                await pilot.pause(0.1)
            share = (time.thread_time() - cpu) / (time.perf_counter() - wall)
            shown = app.main.query("Markdown")[-1].source
            return {"main_thread_share": share, "seconds": time.perf_counter() - wall,
                    "whole": shown == "".join(session.chunks)}
    return asyncio.run(drive())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.app_long_reply", description=__doc__.split("\n\n")[0])
    p.add_argument("--lines", type=int, default=600, help="lines of the code block (default 600)")
    p.add_argument("--chunks-per-s", type=float, default=20.0, help="chunks of two lines a second (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each, alternating (default 3)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.lines < 2 or args.rounds < 1 or args.chunks_per_s <= 0:
        print("app_long_reply: --lines must be >= 2, --rounds >= 1 and --chunks-per-s > 0", file=sys.stderr)
        return 2
    paced_due = TextPacer.due
    runs: dict[str, list[dict]] = {"paced": [], "every tick": []}
    try:
        for r in range(args.rounds):
            for side in (("paced", "every tick") if r % 2 == 0 else ("every tick", "paced")):
                TextPacer.due = paced_due if side == "paced" else (lambda self, now: True)
                runs[side].append(stream_once(args.lines, args.chunks_per_s))
                print(f"  round {r}: {side:10s} main thread {runs[side][-1]['main_thread_share']:.0%} of a core",
                      file=sys.stderr, flush=True)
    finally:
        TextPacer.due = paced_due
    med = {k: statistics.median(x["main_thread_share"] for x in v) for k, v in runs.items()}
    whole = all(x["whole"] for v in runs.values() for x in v)
    if args.json:
        print(json.dumps({"lines": args.lines, "chunks_per_s": args.chunks_per_s, "runs": runs,
                          "median_main_thread_share": med, "whole": whole}, indent=2))
    else:
        print(f"main thread while a {args.lines}-line code block streams, median of {args.rounds}: paced "
              f"{med['paced']:.0%} of a core, drawn at every tick {med['every tick']:.0%}"
              + ("" if whole else " (some text was not shown!)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
