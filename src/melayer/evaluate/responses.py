"""The answers of an evaluation sweep, logged as they are computed: what makes ``melayer eval`` resumable."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import MelayerError
from ..io import JsonlLog
from ..report import progress

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


def _restore(kind: str, response):
    """JSON turns loglikelihood's (float, bool) tuples into lists; lm-eval wants tuples back."""
    return tuple(response) if kind == "loglikelihood" else response


class LoggedLM:
    """Mixin of melayer's lm-eval models (HF, vLLM, log only): the three request kinds answered from a
    :class:`ResponseLog` first; what is missing is computed by ``compute`` (in chunks, each logged when done) or,
    without it, is an error."""

    log: Optional[ResponseLog] = None
    cond: str = "0"
    chunk = {"loglikelihood": 1024, "loglikelihood_rolling": 16}  # generate_until: two batches
    auto_chunk = 256  # generate_until with batch_size "auto" (vLLM batches by itself)

    def _chunk_size(self, kind: str) -> int:
        if kind != "generate_until":
            return self.chunk[kind]
        size = getattr(self, "batch_size", 1) or 1
        return 2 * int(size) if str(size).isdigit() else self.auto_chunk

    def _answer(self, kind: str, requests, compute: Optional[Callable]) -> list:
        if self.log is None:
            return compute(requests)
        keys = [request_key(kind, r.args) for r in requests]
        todo = [i for i, k in enumerate(keys) if not self.log.has(self.cond, k)]
        if todo and compute is None:
            raise MissingAnswers(f"{len(todo)} of {len(requests)} {kind} requests of condition {self.cond!r} have no "
                                 "logged answer: run without --score-only to compute them")
        size = self._chunk_size(kind)
        bar = progress(None, desc=f"{kind} @ {self.cond}", total=len(todo), disable=not todo, unit="req")
        for start in range(0, len(todo), size):
            part = todo[start:start + size]
            answers = compute([requests[i] for i in part])
            self.log.add(self.cond, kind, [keys[i] for i in part], answers)
            bar.update(len(part))
        bar.close()
        return [_restore(kind, self.log.get(self.cond, k)) for k in keys]

    def _compute(self, kind: str) -> Optional[Callable]:
        """What answers ``kind`` when the log does not: the lm-eval model after this mixin (HFLM, VLLM)."""
        method = getattr(super(), kind)
        return lambda requests: method(requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = True):
        return self._answer("generate_until", requests, self._compute("generate_until"))

    def loglikelihood(self, requests, disable_tqdm: bool = True):
        return self._answer("loglikelihood", requests, self._compute("loglikelihood"))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = True):
        return self._answer("loglikelihood_rolling", requests, self._compute("loglikelihood_rolling"))
