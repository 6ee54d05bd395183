"""`melayer explain`: check the paper's explanation of massive activations on a model."""
from __future__ import annotations

from pathlib import Path

from ..explanation import PRESETS, ExplainConfig, run_and_print
from ..provenance import write_record
from ..text import read_prompts
from .common import (add_model_args, add_out_arg, add_parser, check_out_dir, describe_saved, load_from_args,
                     parse_floats, parse_layers)


def register(sub) -> None:
    p = add_parser(sub, "explain", "check the paper's explanation of massive activations on a model",
                   "Measure each claim of the paper on a model, with 95% CIs over prompts and a verdict in "
                   "{holds, does_not_hold, inconclusive}.")
    add_model_args(p)
    add_out_arg(p, "out/explain")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                      help=f"{PRESETS['quick']} varied texts, plain and chat-templated (the default; minutes on a CPU)")
    size.add_argument("--full", dest="preset", action="store_const", const="full",
                      help=f"{PRESETS['full']} varied texts, plain and chat-templated ({2 * PRESETS['full']} prompts; "
                           "for a GPU)")
    p.set_defaults(preset="quick")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompt file (.txt one per line, or .jsonl) "
                                                                    "instead of the built-in set")
    p.add_argument("--me-layer", type=int, default=None, help="0-based ME block (default: found by the emergence "
                                                               "analysis)")
    p.add_argument("--wemask-rates", default="0,0.01,0.05,0.25,1", metavar="R,R",
                   help="WeMask rates for the WeMask curves")
    p.add_argument("--wemask-layer-sets", default="after_me,from_after_me", metavar="S,S",
                   help="layer sets for the WeMask curves")
    p.add_argument("--claim-rate", type=float, default=0.05, help="the rate the WeMask claims are decided at")
    p.add_argument("--claim-layers", default="after_me", help="the layer set the WeMask claims are decided at")
    p.add_argument("--max-prompt-tokens", type=int, default=96, metavar="N")
    p.add_argument("--ppl-data-dir", default=None, metavar="DIR",
                   help="folder with wikitext2/wiki.test.raw for perplexity (default: not measured)")
    p.add_argument("--ppl-tokens", type=int, default=2048, metavar="N", help="WikiText-2 tokens")
    p.add_argument("--ppl-window", type=int, default=256, metavar="N", help="tokens per window")
    p.add_argument("--ffn-cap", type=float, default=2.0, metavar="C",
                   help="cap token 0's FFN output norm at C × the other tokens' median")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and control-neuron seed")
    p.set_defaults(handler=run)


def run(args) -> int:
    sets = [s.strip() for s in args.wemask_layer_sets.split(",") if s.strip()]
    for s in sets + [args.claim_layers]:
        parse_layers(s)  # one-line error for a typo
    config = ExplainConfig(model=args.model, me_layer=args.me_layer, prompts=args.prompts, preset=args.preset,
                           max_prompt_tokens=args.max_prompt_tokens,
                           wemask_rates=parse_floats(args.wemask_rates, "--wemask-rates"), wemask_layer_sets=sets,
                           claim_rate=args.claim_rate, claim_layers=args.claim_layers, ppl_data_dir=args.ppl_data_dir,
                           ppl_tokens=args.ppl_tokens, ppl_window=args.ppl_window, ffn_cap=args.ffn_cap,
                           seed=args.seed)
    if args.prompts:
        read_prompts(args.prompts)  # validated before the slow load
    check_out_dir(args.out)
    model, tokenizer, saved = load_from_args(args)
    if saved is not None:
        describe_saved(saved, "not applied: explain studies the bare model and applies WeMask where it measures it")
    run_and_print(model, tokenizer, config, args.out)
    files = [Path(args.prompts)] if args.prompts else []
    if args.ppl_data_dir:
        files.append(Path(args.ppl_data_dir) / "wikitext2" / "wiki.test.raw")
    write_record(args.out, model, files)
    return 0
