"""The `melayer` command: the whole command-line layer, over the plain functions of the library.

One module per command (``scan``, ``generate``, ``explain``, ``eval``, ``train``, ``data``, ``cache``); shared
flags in ``common``.
A :class:`melayer.MelayerError` (bad input) prints one line and exits 2; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from .. import __version__
from ..errors import MelayerError

COMMANDS = ["scan", "generate", "explain", "eval", "train", "data", "cache"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="melayer", description="Find, explain and act on massive activations "
                                     "(the ME layer and WeMask) in decoder LLMs.")
    parser.add_argument("--version", action="version", version=f"melayer {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"melayer: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        warnings.showwarning = _one_line_warnings
    try:
        return int(args.handler(args) or 0)
    except MelayerError as e:
        if args.debug:
            raise
        print(f"melayer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("melayer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
