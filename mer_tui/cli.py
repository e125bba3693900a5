"""`mer-tui` command line: launch, generate, convert, bench.

Bad input (a missing file, a broken checkpoint, a bad option) ends with one line on stderr
naming what is wrong and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

USAGE_ERROR = 2
#: weight formats the options take (engine.loader.QUANTS, kept here so that parsing imports no numpy)
FORMATS = ("q4_0", "q8_0", "q4_k", "bf16", "f16", "f32")


class CliError(Exception):
    """Bad input found by the CLI itself (the engine raises EngineError)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        self.exit(USAGE_ERROR, f"mer-tui: error: {message}\n")


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram-cache", metavar="SIZE", help="RAM budget for cached experts, e.g. 512MiB, 4GiB")
    p.add_argument("--io", default="auto", choices=["auto", "uring", "pread", "mmap"], help="expert reader")
    p.add_argument("--policy", default="lru", help="eviction policy: lru, lfu, lfu-decay, router")
    p.add_argument("--quant", help="quantize experts at load: q4_0, q8_0, q4_k, bf16")
    p.add_argument("--dense-quant", metavar="FMT", choices=FORMATS,
                   help="format of the dense matrices (attention, dense MLPs, shared experts, lm_head) at load: "
                        "q8_0 (as llama.cpp), q4_0, q4_k, bf16, f16, f32; default: as stored")
    p.add_argument("--no-prefetch", action="store_true", help="do not read the next layer's experts ahead")
    p.add_argument("--threads", type=int, help="kernel threads (default: all cores)")
    p.add_argument("--kv-cache", choices=["f16", "f32", "q8_0"],
                   help="keys and values kept in float16 (as llama.cpp; the default with the C kernels), float32, "
                        "or q8_0 (about half of float16's memory)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mer-tui", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("launch", help="the live terminal app (default model: the embedded demo)")
    p.add_argument("--model", metavar="PATH", help="checkpoint folder, expert store or GGUF file")
    p.add_argument("--demo", choices=["chat", "stress"], default="chat",
                   help="embedded model when --model is not given: the trained chat demo, or a large "
                        "random MoE for I/O-heavy runs")
    p.add_argument("--export-dir", metavar="DIR", default=".", help="where ctrl+s writes screenshots and telemetry")
    p.add_argument("--system", help="system message for the chat (in place of a resumed conversation's)")
    p.add_argument("--resume", metavar="FILE",
                   help="go on with a saved conversation: the JSON ctrl+s exports, or a list of "
                        "{role, content} messages")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--ctx-size", type=int, metavar="N",
                   help="tokens of conversation the chat keeps, the reply included (default: the model's "
                        "trained context, at most 4096; never more than it): older turns are left out")
    p.add_argument("--context-shift", action="store_true",
                   help="past the context, keep the later turns' keys and values, moved up to their new "
                        "positions (llama.cpp's context shift), rather than compute them again: the next reply "
                        "starts at once, computed with the left-out turns still in view")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy replies")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--seed", type=int, help="seed for reproducible sampling")
    _add_cache_options(p)

    p = sub.add_parser("generate", help="generate text headlessly, streaming to stdout")
    p.add_argument("--model", metavar="PATH", required=True)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt's text")
    prompt.add_argument("-f", "--file", metavar="PATH",
                        help="read the prompt from a UTF-8 text file ('-': standard input), as llama.cpp's -f")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--ctx-size", type=int, metavar="N",
                   help="tokens the prompt and the reply may fill (default and most: the model's trained "
                        "context): a longer prompt is refused, a reply stops there")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object: ids, text, timings")
    _add_cache_options(p)

    p = sub.add_parser("convert", help="write an expert store from a Hugging Face checkpoint or a GGUF file")
    p.add_argument("src", help="a Hugging Face checkpoint folder, or a GGUF file (llama.cpp's MoE models: "
                               "Mixtral, OLMoE, Qwen-MoE; F16/BF16/F32, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K-Q6_K, "
                               "IQ4_XS, IQ4_NL tensors)")
    p.add_argument("dst")
    p.add_argument("--quant", choices=FORMATS, help="format of the experts (default: the source's; a GGUF's "
                                                    "in the kernels' faster layout of it)")
    p.add_argument("--dense-quant", metavar="FMT", choices=FORMATS,
                   help="store the dense matrices (attention, dense MLPs, shared experts, lm_head) in this "
                        "format, e.g. q8_0 with --quant q4_0 (default: as in the source)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")

    p = sub.add_parser("bench", help="measure prefill/decode speed against this machine's roofline "
                                     "(`mer-tui bench kernels` for the kernel benchmark)")
    p.add_argument("--model", metavar="PATH")
    p.add_argument("--prompt-tokens", type=int, default=64, help="random token ids prefilled per repeat")
    p.add_argument("--decode-tokens", type=int, default=32,
                   help="tokens decoded per repeat (a forced random continuation, the same every run)")
    p.add_argument("--repeats", type=int, default=3, help="runs, each with its own prompt; medians are reported")
    p.add_argument("--dram-bw", type=float, metavar="BYTES_PER_S",
                   help="use this DRAM read bandwidth for the roofline instead of measuring it")
    p.add_argument("--disk-bw", type=float, metavar="BYTES_PER_S",
                   help="use this O_DIRECT read bandwidth for the roofline instead of measuring it")
    p.add_argument("--preload", action="store_true",
                   help="read experts into the RAM cache before timing, as many as its budget holds (what "
                        "llama.cpp's mmap does at load with MAP_POPULATE): an in-RAM run then times compute, "
                        "not first reads")
    p.add_argument("--json", action="store_true")
    _add_cache_options(p)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from .generate import run_generate

        return run_generate(args)
    if args.command == "convert":
        from .convert import run_convert

        return run_convert(args)
    if args.command == "launch":
        from .launch import run_launch

        return run_launch(args)
    if args.command == "bench":
        from .bench import run_bench

        return run_bench(args)
    raise CliError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "kernels"]:
        # The kernel benchmark has options of its own; hand them over untouched.
        from .bench_kernels import main as bench_kernels

        return bench_kernels(argv[2:])
    args = build_parser().parse_args(argv)
    from engine import EngineError

    try:
        return _run(args)
    except (EngineError, CliError) as e:
        print(f"mer-tui: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("mer-tui: interrupted", file=sys.stderr)
        return 130
