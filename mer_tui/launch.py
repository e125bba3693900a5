"""`mer-tui launch`: pick the model (the user's, or an embedded demo), then run the app.

Cheap checks (options, the model's config.json) run here, before the screen is taken, so bad
input ends the usual way: one line on stderr, exit status 2.  The slow part (reading weights,
building the stress model on first launch) runs inside the app, in the session's loader thread,
with its progress on screen.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import engine
from engine.gguf_import import GgufCheckpoint, is_gguf
from engine.loader import POLICIES, QUANTS

from .cli import CliError
from .conversation import Conversation, ConversationError, read_conversation
from .session import GenerationSettings, Loader, ModelInfo, Progress, Session

REAL_MODEL_HINT = ("To run a real model: `mer-tui launch --model PATH` (a Hugging Face MoE folder, an expert store "
                   "or a GGUF file).")

CHAT_NOTE = ("**Tiny demo model.** A Mixtral-style MoE of a few million parameters, trained on this machine: "
             "it knows little and answers briefly, but every panel shows the engine really running it. "
             + REAL_MODEL_HINT)
STRESS_NOTE = ("**Random weights.** This MoE is random numbers, built on first launch to exercise expert "
               "streaming from the SSD: its replies are gibberish, but the cache, I/O and expert panels are "
               "real. " + REAL_MODEL_HINT)

# The demos exist to show streaming; without --ram-cache each gets a budget of this fraction of its
# size, so the RAM tier misses and the SSD works (the chat demo's is larger: its replies stay brisk).
STRESS_BUDGET_FRACTION = 0.25
CHAT_BUDGET_FRACTION = 0.5


def _quant_label(args: argparse.Namespace) -> str | None:
    """What the header says of the formats asked for: experts', then the dense matrices' if set."""
    dense = getattr(args, "dense_quant", None)
    if dense:
        return f"{args.quant or 'as stored'} + dense {dense}"
    return args.quant


def demo_chat_path() -> Path | None:
    """The trained demo model: assets/demo in a source checkout, or inside the package if shipped there."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "assets" / "demo", here / "assets" / "demo"):
        if (cand / "config.json").exists():
            return cand
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _check_options(args: argparse.Namespace) -> int | None:
    """Validate what can be validated without loading; return the RAM budget in bytes."""
    if args.policy not in POLICIES:
        raise CliError(f"--policy: unknown policy {args.policy!r} (choose from {', '.join(POLICIES)})")
    for option, fmt in (("--quant", args.quant), ("--dense-quant", args.dense_quant)):
        if fmt is not None and fmt not in QUANTS:
            raise CliError(f"{option}: unknown format {fmt!r} (choose from {', '.join(QUANTS)})")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads: must be >= 1, got {args.threads}")
    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.ctx_size is not None and args.ctx_size <= args.max_new_tokens:
        raise CliError(f"--ctx-size: must be more than --max-new-tokens ({args.max_new_tokens}), got {args.ctx_size}")
    # the engine's Sampler names a bad temperature / top-p / penalty the same way generate's would
    from engine.sampling import Sampler

    Sampler(temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    return engine.parse_size(args.ram_cache, "--ram-cache")


def plan(args: argparse.Namespace) -> tuple[Loader, ModelInfo, int | None]:
    """What to load and how to describe it: (loader for the session, info for the screen, budget)."""
    budget = _check_options(args)
    common = dict(io=args.io, policy=args.policy, prefetch=not args.no_prefetch, quant=args.quant,
                  dense_quant=args.dense_quant, threads=args.threads, kv_cache=args.kv_cache)

    if args.model:
        path = Path(args.model).expanduser()
        if not path.exists():
            raise CliError(f"--model: {path}: no such model folder")
        # A bad config.json or GGUF header, or a GGUF type mer-tui cannot compute, fails now, not after the
        # screen opens.
        if is_gguf(path):
            GgufCheckpoint(path)
        else:
            engine.load_spec(path)
        info = ModelInfo(name=path.resolve().name, path=str(path), kind="model", io=args.io, quant=_quant_label(args))

        def load_model(progress: Progress) -> engine.Model:
            return engine.load(path, ram_cache=budget, progress=progress, **common)

        return load_model, info, budget

    if args.demo == "stress":
        if importlib.util.find_spec("mer_tui.demo_models") is None:
            raise CliError("the stress demo is not in this installation (mer_tui/demo_models.py); "
                           "run a model with --model PATH")
        info = ModelInfo(name="stress demo", path="(built in the user cache on first launch)",
                         kind="demo-stress", note=STRESS_NOTE, io=args.io, quant=_quant_label(args))

        def load_stress(progress: Progress) -> engine.Model:
            # imported only when asked for, through sys.modules (so tests can stand in for it)
            demo_models = importlib.import_module("mer_tui.demo_models")

            # stress_model reports (bytes written, bytes in all) while it builds.
            folder = Path(demo_models.stress_model(lambda done, total: progress("build", done, total)))
            info.path = str(folder)
            ram = budget if budget is not None else int(_folder_bytes(folder) * STRESS_BUDGET_FRACTION)
            return engine.load(folder, ram_cache=ram, progress=progress, **common)

        return load_stress, info, budget

    path = demo_chat_path()
    if path is None:
        raise CliError("the chat demo model is not in this installation (expected assets/demo); "
                       "run a model with --model PATH, or try --demo stress")
    engine.load_spec(path)
    info = ModelInfo(name="chat demo", path=str(path), kind="demo-chat", note=CHAT_NOTE, io=args.io,
                     quant=_quant_label(args))

    if budget is None:
        budget = int(_folder_bytes(path) * CHAT_BUDGET_FRACTION)

    def load_demo(progress: Progress) -> engine.Model:
        return engine.load(path, ram_cache=budget, progress=progress, **common)

    return load_demo, info, budget


def _resumed(path: str | None) -> Conversation:
    """--resume's conversation (read before anything loads, so a bad file ends at once), or an empty one."""
    if path is None:
        return Conversation()
    try:
        return read_conversation(path)
    except ConversationError as e:
        raise CliError(f"--resume: {e}") from None


def run_launch(args: argparse.Namespace) -> int:
    resumed = _resumed(args.resume)
    loader, info, budget = plan(args)
    from .app import MerApp  # textual only once the options are known to be good

    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                                  context=args.ctx_size, context_shift=args.context_shift)
    session = Session(loader, info=info, policy=args.policy, ram_budget=budget, settings=settings,
                      system_prompt=args.system if args.system is not None else resumed.system)
    session.messages = resumed.messages
    session.draft = resumed.unanswered
    app = MerApp(session, export_dir=args.export_dir)
    try:
        app.run()
    finally:
        session.close()
    if session.status == "failed":
        # The screen said it; say it again where it stays visible after the app is gone.
        print(f"mer-tui: error: {session.load_error}", file=sys.stderr)
        return 2
    return 0
