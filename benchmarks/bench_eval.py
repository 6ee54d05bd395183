"""Items/s of the eval runner (batched, left padded) vs the paper's protocol (batch 1, fp32, one item at a time)
on the same GSM8K items, greedy, with the outputs compared token for token.

    python benchmarks/bench_eval.py --items 64 --max-new-tokens 128 --batch-size 32

The paper's protocol is its GSM8K script's loop: the prompt "Please reason step by step and put your final
answer within \\boxed{}.\\nQuestion: ..." without a chat template, ``model.generate`` on one item at a time.
Ours feeds the same prompts to :func:`melayer.generation.generate_from_ids` in length-sorted, left-padded
batches, through the engine ``melayer eval`` uses (``auto``: on CPU the compact engine, which drops finished
sequences from the batch; ``--engine hf`` measures plain batched ``generate``). Batched fp32 greedy decoding
can differ from unbatched decoding on rare near-ties of the top two logits; mismatches are counted and printed,
never hidden.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER_PROMPT = "Please reason step by step and put your final answer within \\boxed{{}}.\nQuestion: {q}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="auto", help="melayer's generation engine (auto = compact on CPU)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    from melayer import data, load_model
    from melayer.generation import GenerationConfig, generate_from_ids
    from melayer.text import encode_prompt, eos_ids

    model, tok = load_model(args.model, device="cpu", dtype="fp32")
    items = data.select(data.load("gsm8k", args.data_dir), args.items, args.seed)
    prompts = [encode_prompt(tok, PAPER_PROMPT.format(q=it["question"]), chat=False) for it in items]
    eos = eos_ids(tok, model)

    # the paper's protocol: one item at a time through plain generate
    t0 = time.perf_counter()
    paper = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
            paper.append(tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip())
    t_paper = time.perf_counter() - t0

    # ours: length-sorted left-padded batches (as the runner does)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, engine=args.engine)
    t0 = time.perf_counter()
    ours = [None] * len(prompts)
    for s in range(0, len(order), args.batch_size):
        idx = order[s:s + args.batch_size]
        for i, text in zip(idx, generate_from_ids(model, tok, [prompts[i] for i in idx], gen)):
            ours[i] = text
    t_ours = time.perf_counter() - t0

    mismatch = [i for i in range(len(prompts)) if ours[i] != paper[i]]
    res = {"items": len(prompts), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
           "engine": args.engine,
           "threads": torch.get_num_threads(), "paper_s": t_paper, "ours_s": t_ours,
           "paper_items_per_s": len(prompts) / t_paper, "ours_items_per_s": len(prompts) / t_ours,
           "speedup": t_paper / t_ours, "mismatches": len(mismatch), "mismatch_items": [items[i]["id"] for i in mismatch]}
    print(f"{'protocol':<28}{'seconds':>10}{'items/s':>10}")
    print(f"{'paper (batch 1, fp32)':<28}{t_paper:>10.1f}{res['paper_items_per_s']:>10.3f}")
    print(f"{'melayer (batch %d, left pad)' % args.batch_size:<28}{t_ours:>10.1f}{res['ours_items_per_s']:>10.3f}")
    print(f"speedup: {res['speedup']:.2f}x; identical greedy outputs: {len(prompts) - len(mismatch)}/{len(prompts)}")
    for i in mismatch:
        print(f"  mismatch {items[i]['id']}:\n    paper: {paper[i][:200]!r}\n    ours:  {ours[i][:200]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
