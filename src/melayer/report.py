"""Shared output plumbing: console tables, Markdown tables, progress bars and atomic report folders.

Every command writes the same trio (``report.json``, ``report.md``, PNG plots) through
:func:`write_report`, so nothing a user opens is ever half-written.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from .io import atomic_savefig, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "–" if v is None else str(v)


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")  # "|h|" must not split a cell

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def console_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Print a readable table to the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    console = Console(stderr=False)
    if not console.is_terminal:  # a pipe or a file: no terminal width to respect, so cut nothing
        console = Console(stderr=False, width=400)
    console.print(table)


def say(message: str) -> None:
    """A status line on stderr (stdout stays for tables and results)."""
    print(f"melayer: {message}", file=sys.stderr)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, **kw):
    """A tqdm progress bar with ETA (to stderr, so stdout stays clean for tables)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, **kw)


def new_figure(*args, **kwargs):
    """A matplotlib figure on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def write_report(out_dir: str | Path, data: Mapping[str, Any], markdown: str,
                 figures: Optional[Mapping[str, Any]] = None, name: str = "report") -> dict[str, Path]:
    """Write ``name.json`` (with ``schema_version``), ``name.md`` and ``<key>.png`` per figure, atomically.

    The JSON is written last, so its presence means the whole report is complete.
    """
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for key, fig in (figures or {}).items():
        paths[key] = atomic_savefig(fig, out / f"{key}.png", dpi=130, bbox_inches="tight")
        plt.close(fig)
    paths["markdown"] = atomic_write_text(out / f"{name}.md", markdown)
    paths["json"] = atomic_write_json(out / f"{name}.json", {"schema_version": SCHEMA_VERSION, **data})
    return paths


def data_frame(rows: list[dict]):
    """``rows`` as a pandas DataFrame (pandas is an optional dependency: the ``eval`` extra has it)."""
    try:
        import pandas as pd
    except ImportError:
        from .errors import MelayerError

        raise MelayerError("to_pandas() needs pandas: pip install pandas") from None
    return pd.DataFrame(rows)
