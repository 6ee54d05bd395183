"""`melayer scan`: massive activations per block, the ME layer, the paper's 3-D plot."""
from __future__ import annotations

from pathlib import Path

from ..data import files_read
from ..capture import REDUCTIONS
from ..detect import MassiveCriterion
from ..errors import MelayerError
from ..scanning import ScanConfig, describe_me_layer, print_summary, scan, write_scan_report
from ..masking import apply_wemask
from ..provenance import write_record
from ..text import read_prompts
from .common import add_model_args, add_out_arg, add_parser, check_out_dir, describe_saved, load_from_args


def register(sub) -> None:
    p = add_parser(sub, "scan", "find massive activations and the ME layer")
    add_model_args(p)
    p.add_argument("--prompts", help="text file (one prompt per line) or JSONL ({'text', 'chat', 'bos'})")
    add_out_arg(p, "out/scan")
    p.add_argument("--abs-threshold", type=float, default=100.0, help="a massive value exceeds this |a|")
    p.add_argument("--ratio", type=float, default=1000.0, help="… and this many times the block's median |h|")
    p.add_argument("--persist-fraction", type=float, default=0.8,
                   help="share of the later blocks in which an event must stay massive to count as born")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reduction", choices=REDUCTIONS, default="auto",
                   help="how the statistics are computed (same values): auto (a CUDA graph replay per block on a "
                        "GPU, eager elsewhere), fused (one Triton kernel per bf16/fp16 block, GPU), ...")
    p.add_argument("--with-saved-wemask", action="store_true",
                   help="scan a model saved with WeMask with its mask applied (default: the bare model)")
    p.set_defaults(handler=run)


def run(args) -> int:
    if args.batch_size < 1:
        raise MelayerError(f"--batch-size must be at least 1, got {args.batch_size}")
    criterion = MassiveCriterion(abs_threshold=args.abs_threshold, ratio=args.ratio,
                                 persist_fraction=args.persist_fraction)
    config = ScanConfig(criterion=criterion, batch_size=args.batch_size, reduction=args.reduction)
    prompts = read_prompts(args.prompts) if args.prompts else None  # validated before the slow load
    check_out_dir(args.out)
    model, tokenizer, saved = load_from_args(args)
    if saved is not None:
        if args.with_saved_wemask:
            apply_wemask(model, saved, tokenizer=tokenizer)
        describe_saved(saved, "applied (--with-saved-wemask)" if args.with_saved_wemask
                       else "not applied: this scans the bare model (--with-saved-wemask scans it masked)")
    elif args.with_saved_wemask:
        raise MelayerError(f"--with-saved-wemask: {args.model} was not saved with a WeMask")
    report = scan(model, tokenizer, prompts, config)
    print_summary(report)
    paths = write_scan_report(report, args.out, config)
    write_record(args.out, model, files_read() + ([Path(args.prompts)] if args.prompts else []))
    print(f"ME layer: {describe_me_layer(report.me_layer)}, 0-based; emergence {report.emergence.kind}  "
          f"report: {paths['markdown']}")
    return 0
