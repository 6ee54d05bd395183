"""`melayer cache verify`: re-hash every dequantised model in melayer's cache; --fix removes what is damaged."""
from __future__ import annotations

import shutil

from ..model_cache import cache_root, stale_builds, verify_all
from ..report import console_table, say
from .common import add_parser


def register(sub) -> None:
    p = add_parser(sub, "cache", "check melayer's model cache")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    v = add_parser(actions, "verify", "re-hash every cached model (a load checks sizes and changed files only)")
    v.add_argument("--fix", action="store_true", help="remove damaged entries and killed builds (rebuilt on the "
                                                      "next load)")
    v.set_defaults(handler=run)


def run(args) -> int:
    checks = verify_all(deep=True)
    stale = stale_builds()
    console_table(f"melayer cache: {cache_root() / 'gguf'}", ["entry", "source", "status"],
                  [(c.folder.name[:16], c.source, c.problem or "ok") for c in checks]
                  + [(p.name, "killed build", "stale") for p in stale])
    damaged = [c.folder for c in checks if c.problem] + stale
    if damaged and args.fix:
        for folder in damaged:
            shutil.rmtree(folder, ignore_errors=True)
        say(f"removed {len(damaged)} damaged or stale entries; they are rebuilt on the next load")
        return 0
    if damaged:
        say(f"{len(damaged)} damaged or stale entries: `melayer cache verify --fix` removes them")
        return 1
    return 0
