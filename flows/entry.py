"""The `d2l` console entry. `d2l run` on a store whose stamp vouches for it (flows/uptodate.py) is answered
here, before the command-line framework is imported (typer and the pydantic it coerces values with cost
~0.1 s, more than the whole answer); every other command line, and every `run` the stamp does not settle,
goes to flows/cli.py unchanged. The options are read as typer reads them; anything this reader does not
know for certain (help, an unknown option, a bad value) is left to typer."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# `run`'s options (flows/cli.py; a test checks the two agree): those with a value -> field, flags -> (field, value)
VALUE_OPTIONS = {"--config": "config", "-c": "config", "--set": "sets", "-s": "sets", "--store": "store",
                 "--source": "source", "--base-model": "base_model", "--lock-timeout": "lock_timeout"}
FLAG_OPTIONS = {"--progress": ("progress", True), "--no-progress": ("progress", False),
                "--allow-missing": ("allow_missing", True)}
REPEATED = ("sets", "source")

__all__ = ["FLAG_OPTIONS", "VALUE_OPTIONS", "main", "parse_run"]


def parse_run(args: list[str]) -> dict | None:
    """The options of `d2l run ARGS` as typer would pass them; None when typer must decide."""
    out: dict = {"config": None, "sets": [], "store": None, "source": [], "base_model": None, "lock_timeout": None,
                 "progress": True, "allow_missing": False}
    i = 0
    while i < len(args):
        token = args[i]
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in FLAG_OPTIONS and not eq:
            field, value = FLAG_OPTIONS[name]
            out[field] = value
            i += 1
            continue
        if name not in VALUE_OPTIONS:
            return None  # --help, a typo, a positional argument, -cFILE: typer's to answer
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            return None
        field = VALUE_OPTIONS[name]
        if field in REPEATED:
            out[field].append(value)
        else:
            out[field] = value
    if out["lock_timeout"] is not None:
        try:
            out["lock_timeout"] = float(out["lock_timeout"])
        except ValueError:
            return None
    if out["config"] is not None:
        if not os.path.exists(out["config"]):
            return None  # typer says the file does not exist
        out["config"] = Path(out["config"])
    return out


def _answered_from_stamp(args: list[str]) -> bool:
    opts = parse_run(args)
    if opts is None:
        return False
    from flows.uptodate import CliRun

    extra = ["ingest.allow_missing=true"] if opts["allow_missing"] else []
    try:
        run = CliRun(opts["config"], [*opts["sets"], *extra], opts["store"], opts["source"], opts["base_model"])
        return run.shortcut(full_check=False)
    except Exception:  # noqa: BLE001 - e.g. a file gone mid-check: the full command line decides
        return False


def main() -> int:
    """`d2l`: a stamped `run` answered at once, everything else by the full command line."""
    argv = sys.argv[1:]
    if argv[:1] == ["run"] and _answered_from_stamp(argv[1:]):
        return 0
    from flows.cli import main as cli_main

    cli_main()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
