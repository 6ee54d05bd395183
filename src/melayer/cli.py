"""The `melayer` command: one sub-command per feature module, each registering itself."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register_cli(subparsers)`; the handler it sets returns an exit code.
COMMAND_MODULES = ["melayer.scan", "melayer.wemask", "melayer.explain", "melayer.evaluate", "melayer.train"]


def model_argument(parser: argparse.ArgumentParser) -> None:
    """The optional first positional argument every command shares."""
    parser.add_argument("model", nargs="?", default="default",
                        help="hub id, local folder, .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melayer", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import MelayerError

    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except MelayerError as e:
        print(f"melayer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("melayer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
