"""Atomic file writes and append-only JSONL logs: nothing a user sees is ever half-written."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from .errors import MelayerError


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSONL file (blank lines skipped); a bad line is a one-line error naming file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MelayerError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, paths and numpy/torch values become plain, strict JSON values (NaN and ±inf: null)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars, torch tensors
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):  # NaN and Infinity are not JSON
        return None
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text of ``obj`` (never a bare NaN or Infinity)."""
    return json.dumps(to_jsonable(obj), ensure_ascii=False, allow_nan=False, **kwargs)


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj, indent=2) + "\n")


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure atomically (PNG by the suffix)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def read_config_json(cls, path: str | os.PathLike, filename: str, what: str) -> dict:
    """The fields of a dataclass saved as JSON (``path`` is the file or the folder holding ``filename``).

    Unreadable files, invalid JSON and unknown fields are one-line user errors.
    """
    path = Path(path)
    if path.is_dir():
        path = path / filename
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise MelayerError(f"cannot read {what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise MelayerError(f"{what} {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict) or set(data) - fields:
        extra = sorted(set(data) - fields) if isinstance(data, dict) else data
        raise MelayerError(f"{what} {path} has unknown fields: {extra}")
    return data


class JsonlLog:
    """Append-only JSONL log that survives SIGKILL and shares its file safely between processes.

    One fsynced write per batch of records, under a file lock (``<log>.lock``) that every writer and
    :meth:`rewrite` take, so several commands can append to one log while another rescores it. On open, a last
    line without its newline is kept when it parses (the process died after writing it); a truly torn one is
    moved aside to ``<log>.torn-<n>`` with a warning, never deleted. Reading names the file and line of a
    corrupt row or of a row that lacks one of ``required`` fields, instead of skipping it.
    """

    def __init__(self, path: str | os.PathLike, required: Sequence[str] = ()):
        self.path = Path(path)
        self.required = tuple(required)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._repair()

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.path) + ".lock")

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        tail = data[start:]
        try:
            ok = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, ValueError):
            ok = False
        with open(self.path, "r+b") as f:
            if ok:  # a complete record whose newline never made it: keep it
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
            else:
                n = 1 + sum(1 for _ in self.path.parent.glob(f"{self.path.name}.torn-*"))
                aside = self.path.with_name(f"{self.path.name}.torn-{n}")
                aside.write_bytes(tail)
                f.truncate(start)
                warnings.warn(f"{self.path}: its last line was cut off by a killed writer ({len(tail)} bytes); "
                              f"moved to {aside.name}", stacklevel=3)
            f.flush()
            os.fsync(f.fileno())

    def __iter__(self) -> Iterator[dict]:
        return iter(self.read())

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        with open(self.path, encoding="utf-8", errors="strict") as f:
            try:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise MelayerError(f"{self.path}:{n}: not a JSON record ({e}); fix or delete that line") \
                            from None
                    missing = [k for k in self.required if not isinstance(row, dict) or k not in row]
                    if missing:
                        raise MelayerError(f"{self.path}:{n}: not a row of this log (no {', '.join(missing)})")
                    rows.append(row)
            except UnicodeDecodeError:
                raise MelayerError(f"{self.path}: not UTF-8 text (line {n})") from None
        return rows

    def append(self, record: dict) -> None:
        self.extend([record])

    def extend(self, records: Iterable[dict]) -> None:
        lines = "".join(dumps(r) + "\n" for r in records)
        if not lines:
            return
        with self._lock(), open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def update(self, fn) -> int:
        """Rewrite the log as ``fn(rows)`` returns it, atomically and under the lock (no concurrent append is lost);
        returns the number of rows written."""
        with self._lock():
            rows = fn(self.read())
            atomic_write_text(self.path, "".join(dumps(r) + "\n" for r in rows))
        return len(rows)
