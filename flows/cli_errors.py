"""Errors on the command line: one line with the real cause and a non-zero exit; tracebacks with --debug.

Checks that can fail before any work (a base model folder that does not exist, a run whose every source is
missing) run before the flow starts, so no Prefect log or traceback buries the message. An exception from
inside a flow is reduced to its innermost cause in one line.
"""

from __future__ import annotations

import glob
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import typer

DEBUG_ENV = "D2L_DEBUG"
NEEDS_MODEL = {"pipeline", "chunk", "synthesize", "teacher", "train", "evaluate"}
NEEDS_SOURCES = {"pipeline", "ingest"}


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_debug(on: bool) -> None:
    if on:
        os.environ[DEBUG_ENV] = "1"


def _source_present(source: str) -> bool:
    if "://" in source:  # synthetic:// and datasets:// are checked (and rejected with a reason) by ingest
        return True
    path = os.path.expanduser(source)
    return Path(path).exists() or bool(glob.glob(path, recursive=True))


def check_sources(sources: list[str]) -> None:
    """Fail when not one source exists (with --allow-missing, ingest records the missing ones as rejects)."""
    if sources and not any(_source_present(s) for s in sources):
        shown = ", ".join(sources[:5]) + (f" and {len(sources) - 5} more" if len(sources) > 5 else "")
        raise UserError(f"none of the {len(sources)} source(s) exists: {shown} (cwd {Path.cwd()})")


def check_base_model(name: str, store: str) -> None:
    """Fail early on a base model that is neither a built-in, nor a model folder, nor a reachable hub id."""
    from tasks.models import BUILTIN_MODELS, prepare_model

    if name.lower() in BUILTIN_MODELS:
        return  # built (or converted) into the store by the run itself
    try:
        prepare_model(name, store)
    except Exception as exc:  # noqa: BLE001 - a folder that is missing or holds no model, an offline hub id
        msg = one_line(exc)
        raise UserError(msg if "base model" in msg.lower() else f"base model {name!r}: {msg}") from exc


def preflight(flow_name: str, cfg) -> None:
    """The checks that need no work done: before the flow, so their message is all the user sees."""
    from tasks.common import preflight as store_preflight

    if flow_name in NEEDS_SOURCES:
        check_sources(list(cfg.sources))
    if flow_name in NEEDS_MODEL:
        check_base_model(str(cfg.base_model), str(cfg.store))
    store_preflight(flow_name, str(cfg.store), list(cfg.sources), cfg.ingest)  # catalog opens; sources known


def read_document(document: str) -> str:
    """A path to a text file, or the text itself (a long text is not a file name: no OSError for it)."""
    try:
        path = Path(document).expanduser()
        is_file = len(document) < 4096 and "\n" not in document and path.is_file()
    except (OSError, ValueError):  # "File name too long", an embedded NUL
        is_file = False
    if not is_file:
        return document
    try:
        return path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read {document}: {exc.strerror or exc}") from exc


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception of a chain (`raise ... from`, or raised while handling another)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
        if nxt is None:
            break
        exc = nxt
    return exc


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line (the first line of a long message)."""
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text and name not in ("UserError", "BaseModelError") else (text or name)


@contextmanager
def reported(what: str = "d2l") -> Iterator[None]:
    """Turn any exception of the block into one red line and exit 1 (2 for a UserError); --debug re-raises."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
        raise
    except UserError as exc:
        if debug_enabled():
            raise
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    except Exception as exc:  # noqa: BLE001 - the point of this module
        if debug_enabled():
            raise
        from tasks.common import USER_ERRORS, StoreLockedError

        if isinstance(exc, USER_ERRORS):  # the project's own errors already say what to do, in one line
            typer.secho(" ".join(str(exc).split()), fg="red", err=True)
            raise typer.Exit(3 if isinstance(exc, StoreLockedError) else 2) from None
        cause = root_cause(exc)
        line = one_line(cause) if cause is exc else f"{one_line(exc)} (cause: {one_line(cause)})"
        typer.secho(f"error: {what} failed: {line}", fg="red", err=True)
        typer.secho("(run again with --debug for the traceback)", err=True)
        sys.stderr.flush()
        raise typer.Exit(1) from None
