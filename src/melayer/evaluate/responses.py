"""The answers of an evaluation sweep, logged as they are computed: what makes ``melayer eval`` resumable."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from ..errors import MelayerError
from ..io import JsonlLog

RESPONSES_NAME = "responses.jsonl"


class MissingAnswers(MelayerError):
    """Rescoring met requests the log has no answer for: a condition the run did not finish."""


def request_key(kind: str, args) -> str:
    """A stable id of one lm-eval request (its kind and arguments: prompt, continuation, generation settings)."""
    return hashlib.sha256(json.dumps([kind, list(args)], sort_keys=True, default=str).encode("utf-8")).hexdigest()


class ResponseLog:
    """Every answer of a sweep, one JSONL row per request and condition: what makes ``melayer eval`` resumable.

    Rows are appended as batches finish (fsynced, under the log's lock), so a killed run loses at most the batch
    in flight; lm-eval then asks again and gets the logged answers instantly.
    """

    def __init__(self, path: Path):
        self.log = JsonlLog(path, required=("cond", "key", "response"))
        self._known: dict[tuple[str, str], object] = {(r["cond"], r["key"]): r["response"] for r in self.log.read()}

    def get(self, cond: str, key: str):
        return self._known.get((cond, key))

    def has(self, cond: str, key: str) -> bool:
        return (cond, key) in self._known

    def add(self, cond: str, kind: str, keys: Sequence[str], responses: Sequence) -> None:
        rows = [{"cond": cond, "kind": kind, "key": k, "response": r} for k, r in zip(keys, responses)]
        self.log.extend(rows)
        self._known.update({(cond, k): r for k, r in zip(keys, responses)})

    def conditions(self) -> set[str]:
        return {c for c, _ in self._known}
