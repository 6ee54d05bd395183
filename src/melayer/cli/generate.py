"""`melayer generate`: text from prompts, with or without WeMask, or both side by side (--compare)."""
from __future__ import annotations

from ..errors import MelayerError
from ..generation import GenerationConfig, compare_generations, generate_texts
from ..report import console_table
from ..masking import wemask
from .common import add_model_args, add_parser, add_wemask_args, describe_saved, load_from_args, wemask_from_args


def register(sub) -> None:
    p = add_parser(sub, "generate", "generate text, optionally with WeMask (--compare: with vs without)")
    add_model_args(p)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="prompt text (repeat for a batch)")
    add_wemask_args(p, rate_help="fraction of hidden dims masked at the first token (e.g. 0.01); default: no "
                                 "WeMask, or the mask saved with the model")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--compare", action="store_true", help="print outputs without and with WeMask side by side")
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.max_new_tokens < 1:
        raise MelayerError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if any(not p.strip() for p in args.prompt):
        raise MelayerError("--prompt: a prompt is empty")
    if args.wemask_rate is None and args.me_layer is not None:
        raise MelayerError("--me-layer needs --wemask-rate")
    config = wemask_from_args(args) if args.wemask_rate is not None else None  # validated before the slow load
    model, tokenizer, saved = load_from_args(args)
    if saved is not None:
        describe_saved(saved, "overridden by --wemask-rate" if config is not None else "applied")
        config = config or saved
    if args.compare and config is None:
        raise MelayerError("--compare needs --wemask-rate (or a model saved with a WeMask config)")
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
    if args.compare:
        out = compare_generations(model, tokenizer, args.prompt, config, gen, chat=args.chat)
        console_table(f"WeMask rate {config.rate:g}, layers {config.layers}, {config.mode} mode",
                      ["prompt", "without WeMask", "with WeMask"], zip(args.prompt, out["without"], out["with"]))
        return 0
    if config is None:
        texts = generate_texts(model, tokenizer, args.prompt, gen, chat=args.chat)
    else:
        with wemask(model, config, tokenizer=tokenizer, per_sequence=True):  # paper mode: as if run one by one
            texts = generate_texts(model, tokenizer, args.prompt, gen, chat=args.chat)
    for text in texts:
        print(text)
    return 0
