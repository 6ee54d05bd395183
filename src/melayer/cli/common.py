"""What several commands share, defined once: the model, WeMask, data and output flags, and model loading.

Each ``add_*`` function adds a group of flags; each ``*_from_args`` turns the parsed flags back into the typed
config the library takes, so a command module only wires flags to a library call.
"""
from __future__ import annotations

import argparse
from typing import Optional

from ..errors import MelayerError
from ..load import load_model, saved_wemask
from ..report import say
from ..masking import LAYER_CHOICES, MODES, SCORES, WeMaskConfig, parse_layers


class Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default (and keeps the description's line breaks)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.help is argparse.SUPPRESS or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_parser(sub, name: str, help: str, description: Optional[str] = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=Formatter)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The optional first positional argument every command shares, and where/how to run it."""
    parser.add_argument("model", nargs="?", default="default",
                        help="hub id, local folder, .gguf file, or 'default' (SmolLM2-135M-Instruct, 4-bit GGUF)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)")


def parse_floats(text: str, flag: str) -> list[float]:
    """Comma-separated numbers (``0,0.01,0.05``)."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise MelayerError(f"{flag} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise MelayerError(f"{flag}: give at least one number")
    return values


def add_wemask_args(parser: argparse.ArgumentParser, sweep: bool = False, rate_help: Optional[str] = None) -> None:
    """WeMask flags. ``sweep``: rates and modes are comma-separated lists (``--wemask-rates``, ``--wemask-mode``
    correct,paper), as ``melayer eval`` sweeps them; otherwise one ``--wemask-rate``."""
    g = parser.add_argument_group("WeMask")
    if sweep:
        g.add_argument("--wemask-rates", default=None, metavar="R,R,...",
                       help=rate_help or "rates to sweep, e.g. 0,0.01,0.05 (default: 0, or the mask saved with the "
                                         "model)")
        g.add_argument("--wemask-mode", default="correct", metavar="M[,M]",
                       help="correct, paper, or both (correct,paper); paper applies the official index-0 mask to "
                            "each item as if it ran alone")
    else:
        g.add_argument("--wemask-rate", type=float, default=None, metavar="R",
                       help=rate_help or "fraction of hidden dims masked at the first token (e.g. 0.01)")
        g.add_argument("--wemask-mode", choices=MODES, default="correct",
                       help="correct (absolute position 0) or paper (index 0 of every chunk, the official code)")
    g.add_argument("--wemask-layers", default="after_me", metavar="L",
                   help=f"{', '.join(LAYER_CHOICES)}, or comma-separated 0-based blocks")
    g.add_argument("--wemask-score", choices=SCORES, default="activation",
                   help="rank dims by |attention input| (activation) or by |γ| of the pre-attention norm")
    g.add_argument("--wemask-gamma", type=float, default=0.0, metavar="G",
                   help="masked dims are multiplied by G (0: zeroed, the paper)")
    g.add_argument("--me-layer", type=int, default=None, metavar="N",
                   help="0-based ME block (default: found by a scan)")


def wemask_from_args(args, rate: Optional[float] = None, mode: Optional[str] = None) -> WeMaskConfig:
    """The :class:`WeMaskConfig` the WeMask flags describe (``rate``/``mode`` override the flags: sweeps)."""
    if rate is None:
        rate = getattr(args, "wemask_rate", None) or 0.0
    return WeMaskConfig(rate=rate, layers=parse_layers(args.wemask_layers), score=args.wemask_score,
                        gamma=args.wemask_gamma, mode=mode or args.wemask_mode, me_layer=args.me_layer)


def sweep_from_args(args) -> tuple[Optional[list[float]], list[str]]:
    """(rates or None, modes) of a sweep's ``--wemask-rates`` / ``--wemask-mode``."""
    rates = parse_floats(args.wemask_rates, "--wemask-rates") if args.wemask_rates else None
    modes = [m.strip() for m in args.wemask_mode.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise MelayerError(f"--wemask-mode must be {' or '.join(MODES)} (comma-separated for both), "
                           f"got {args.wemask_mode!r}")
    return rates, modes


def add_data_dir_arg(parser: argparse.ArgumentParser, what: str = "the data sets") -> None:
    parser.add_argument("--data-dir", default=None, metavar="DIR",
                        help=f"local folder with {what} (the layout of shared/data); default: the Hugging Face Hub")


def add_out_arg(parser: argparse.ArgumentParser, default: str, what: str = "report folder") -> None:
    parser.add_argument("--out", default=default, metavar="DIR", help=what)


def check_out_dir(path) -> None:
    """One-line error, before any work, for an output folder that is a file or cannot be written."""
    import os
    import tempfile
    from pathlib import Path

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise MelayerError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".melayer-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise MelayerError(f"--out {out} cannot be written ({e.strerror}): choose another folder") from None


def load_from_args(args):
    """``(model, tokenizer, saved)``: the model loaded bare, and the WeMask saved beside its weights (or None).

    Nothing is applied here; every command says what it does with a saved mask (:func:`describe_saved`).
    """
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    return model, tokenizer, saved_wemask(model)


def describe_saved(saved: WeMaskConfig, decision: str) -> None:
    """One stderr line: a saved WeMask was found, and whether this command applies it."""
    say(f"the model was saved with WeMask (rate {saved.rate:g}, blocks {saved.layers}, {saved.mode} mode): "
        f"{decision}")
