"""Data-parallel evaluation: one sweep split over processes (GPUs, nodes, jobs) by document, merged after.

``melayer eval … --shard I/N --out runs/x/shard-I`` evaluates every N-th document of each task from the I-th (the
same seeded ``--limit`` subset as the unsharded run, under every WeMask condition), in its own folder, with no
communication between shards: they may run on any GPUs, nodes or schedulers, at any time, and each resumes on its
own. ``melayer eval --merge runs/x/shard-* --out runs/x`` checks that the shards are one sweep (same settings,
indices 0..N-1, each once), joins their answer logs and scores the whole sweep from them, exactly as
``--score-only`` does: the merged report equals an unsharded run's, document by document.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import MelayerError
from ..io import JsonlLog, atomic_write_json, read_config_json
from ..provenance import RECORD_NAME
from .responses import RESPONSES_NAME
from .runner import CONFIG_NAME, EvalConfig, run_eval

if TYPE_CHECKING:
    from .summary import EvalSummary

PER_SHARD = ("out", "shard_index", "device", "score_only")  # may differ between the shards of one sweep


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: shard I (0-based) of N."""
    try:
        index, total = (int(part) for part in text.split("/"))
    except ValueError:
        raise MelayerError(f"--shard must be I/N (shard I of N, 0-based), got {text!r}") from None
    if not 0 <= index < total:
        raise MelayerError(f"--shard must be I/N with 0 <= I < N, got {text!r}")
    return index, total


def _shard_configs(folders: Sequence[Path]) -> list[EvalConfig]:
    configs = []
    for folder in folders:
        if not (folder / RESPONSES_NAME).is_file():
            raise MelayerError(f"--merge: {folder} holds no {RESPONSES_NAME} (not a melayer eval folder, or empty)")
        configs.append(EvalConfig(**read_config_json(EvalConfig, folder, CONFIG_NAME, "eval config")))
    total = configs[0].num_shards
    indices = sorted(c.shard_index for c in configs)
    if any(c.num_shards != total for c in configs) or indices != list(range(total)):
        found = ", ".join(f"{c.shard_index}/{c.num_shards}" for c in configs)
        raise MelayerError(f"--merge needs shards 0/{total} to {total - 1}/{total}, each once; got {found}")
    first = dataclasses.asdict(configs[0])
    for folder, cfg in zip(folders[1:], configs[1:]):
        other = dataclasses.asdict(cfg)
        diff = [f"{k}: {first[k]!r} vs {other[k]!r}" for k in first if k not in PER_SHARD and first[k] != other[k]]
        if diff:
            raise MelayerError(f"--merge: {folder} is not a shard of {folders[0]}'s sweep ({'; '.join(diff)})")
    return configs


def merge_shards(folders: Sequence[str | Path], out: str | Path, data_dir: str | None = None,
                 model: str | None = None, progress_bar: bool = True) -> "EvalSummary":
    """Join the answer logs of a sharded sweep into ``out`` and score the whole sweep from them (no model).

    Scoring needs the answering model's tokenizer (it builds the prompts that key the answers): the shards'
    saved model, or ``model`` where the shards ran on another machine. It is found before anything is written.
    """
    from ..load import local_location

    folders = [Path(f) for f in folders]
    out = Path(out)
    if not folders:
        raise MelayerError("--merge: give the shard folders")
    if (out / RESPONSES_NAME).exists():
        raise MelayerError(f"--merge: {out} already holds {RESPONSES_NAME}; merge into a new folder")
    configs = _shard_configs(folders)
    try:
        tokenizer_at = local_location(model or configs[0].model)[1]  # resolved once: scoring reuses it
    except MelayerError as e:
        raise MelayerError(f"--merge needs the tokenizer of the model that answered: {e}; pass that model (or a "
                           "copy of it) as the model argument") from None
    rows: dict[tuple[str, str], dict] = {}
    for folder in folders:
        for row in JsonlLog(folder / RESPONSES_NAME, required=("cond", "key", "response")).read():
            key = (row["cond"], row["key"])
            if key in rows and rows[key]["response"] != row["response"]:
                raise MelayerError(f"--merge: {folder} answers a request of condition {row['cond']!r} differently "
                                   "from another shard")
            rows[key] = row
    merged = dataclasses.replace(configs[0], out=str(out), shard_index=0, num_shards=1, score_only=False,
                                 device=None, data_dir=data_dir or configs[0].data_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_NAME, merged)
    records = [json.loads((f / RECORD_NAME).read_text(encoding="utf-8")) if (f / RECORD_NAME).is_file() else None
               for f in folders]
    by_index = sorted(zip(configs, records), key=lambda pair: pair[0].shard_index)
    record = dict(by_index[0][1] or {})
    record["shards"] = [{"shard": f"{c.shard_index}/{c.num_shards}", "out": c.out, "provenance": r}
                        for c, r in by_index]
    atomic_write_json(out / RECORD_NAME, record)
    partial = out / f".{RESPONSES_NAME}.merging"
    partial.unlink(missing_ok=True)
    JsonlLog(partial).extend(rows.values())
    partial.replace(out / RESPONSES_NAME)  # whole or absent: a merge cut short is simply run again
    return run_eval(EvalConfig(model=tokenizer_at, out=str(out), tasks=None, score_only=True,
                               data_dir=merged.data_dir), progress_bar=progress_bar)
