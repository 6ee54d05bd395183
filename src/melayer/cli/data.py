"""`melayer data preferences`: on-policy preference pairs without the hub (see melayer.training.preferences)."""
from __future__ import annotations

from pathlib import Path

from ..errors import MelayerError
from ..report import console_table
from .common import add_model_args, add_parser, add_wemask_args, check_out_dir, wemask_from_args


def register(sub) -> None:
    p = add_parser(sub, "data", "build training data locally (preference pairs for DPO)")
    kinds = p.add_subparsers(dest="data_command", required=True, metavar="KIND")
    a = add_parser(kinds, "preferences", "sample n responses per prompt and label pairs with melayer's judges",
                   description="Sample --n responses per prompt from the model (optionally WeMask'd: on-policy for "
                               "a WeMask run means the masked model) and pair a response the judge calls good "
                               "(chosen) with one it calls bad (rejected). refusal: refusal/harmful_val.json and "
                               "harmless_val.json (the *_test splits stay held out): chosen complies on harmless "
                               "prompts and refuses on harmful ones. gsm8k: the GSM8K train split: chosen has the "
                               "right final number. Writes a prompt/chosen/rejected JSONL that TRL (and `melayer "
                               "train dpo --data FILE`) reads, and preferences_config.json beside it (model, seed, "
                               "judge, mask, pairs and skips per prompt kind).")
    add_model_args(a)
    a.add_argument("--source", choices=["refusal", "gsm8k"], default="refusal")
    a.add_argument("--data-dir", default=None, metavar="DIR",
                   help="local folder laid out like shared/data (refusal/*_val.json, gsm8k/train.jsonl); needed for "
                        "refusal (no hub copy), gsm8k falls back to the Hugging Face Hub")
    a.add_argument("--n", type=int, default=4, help="responses sampled per prompt")
    a.add_argument("--limit", type=int, default=16, metavar="N", help="prompts sampled (refusal: alternately "
                                                                        "harmful and harmless)")
    a.add_argument("--min-pairs", type=int, default=0, metavar="N",
                   help="then keep sampling further prompts until N pairs (or --max-prompts)")
    a.add_argument("--max-prompts", type=int, default=None, metavar="N", help="cap on prompts (default: 4 x --limit)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--temperature", type=float, default=1.0)
    a.add_argument("--top-p", type=float, default=1.0)
    a.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="per response (default: refusal 128, gsm8k 256; a good response must finish within it)")
    a.add_argument("--judge", default=None,
                   help="refusal classifier (prefix, substring, or one registered; default prefix, as melayer eval)")
    a.add_argument("--fill", choices=["none", "reference"], default="none",
                   help="none: strictly on-policy (a prompt whose samples are all judged alike is skipped); "
                        "reference: its missing side comes from a reference response (GSM8K's gold solution, a "
                        "fixed refusal), marked in the row and counted apart")
    a.add_argument("--prompt-batch", type=int, default=1, metavar="B",
                   help="prompts sampled per generate call, left-padded (1: every prompt seeded on its own; B > 1: "
                        "seeded per block, reproducible for the same B, far faster on a GPU)")
    add_wemask_args(a, rate_help="sample with WeMask at this rate (default: unmasked)")
    a.add_argument("--out", default=None, metavar="FILE.jsonl",
                   help="output JSONL (default: runs/preferences/SOURCE/preferences.jsonl); one set per folder")
    a.set_defaults(handler=run)


def run(args) -> int:
    from ..load import load_model
    from ..training.preferences import PreferenceConfig, build_preferences, write_preferences

    wemask = wemask_from_args(args)
    cfg = PreferenceConfig(source=args.source, model=args.model, data_dir=args.data_dir, n=args.n, limit=args.limit,
                           min_pairs=args.min_pairs, max_prompts=args.max_prompts, seed=args.seed,
                           temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                           judge=args.judge, fill=args.fill, prompt_batch=args.prompt_batch,
                           wemask=wemask if wemask.rate > 0 else None)
    if args.source == "refusal" and args.data_dir is None:
        raise MelayerError("--source refusal reads refusal/*_val.json, which has no hub copy: pass --data-dir")
    out = Path(args.out) if args.out else Path("runs/preferences") / args.source / "preferences.jsonl"
    if out.suffix != ".jsonl":
        raise MelayerError(f"--out must name a .jsonl file, got {out}")
    check_out_dir(out.parent)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)  # a saved mask is not applied
    rows, built = build_preferences(model, tokenizer, cfg)
    if not rows:
        raise MelayerError(f"no pair: every prompt's {cfg.n} samples were judged alike (see the skip counts above); "
                           "try more --n, a higher --temperature, or --min-pairs")
    write_preferences(rows, built, out)
    table = [(kind, c["prompts"], c["pairs"], c["pairs_with_reference"],
              ", ".join(f"{k} {v}" for k, v in sorted(c["skipped"].items())) or "-")
             for kind, c in built.counts.items()]
    console_table(f"melayer data preferences: {out}", ["prompts", "sampled", "pairs", "with a reference", "skipped"],
                  table)
    return 0
