"""Progress bars: one rule for every tqdm bar of the project (flows/runners.py's included, through tasks).

A bar is drawn only when asked for AND stderr is a terminal: in a log file, a CI job or a Prefect worker a
bar is a stream of carriage returns and escape codes (the UI shows progress artifacts instead).
`TQDM_DISABLE=1` turns every bar off."""

from __future__ import annotations

import os
import sys


def bars_enabled(requested: bool = True) -> bool:
    """True when a progress bar should be drawn: requested, stderr is a terminal, and not TQDM_DISABLE."""
    if not requested or os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def library_bars_follow_terminal() -> None:
    """Hugging Face's own bars ("Loading weights", "Writing model shards") obey the same rule: off when stderr
    is not a terminal or TQDM_DISABLE is set (HF_HUB_DISABLE_PROGRESS_BARS, read when transformers loads; the
    caller's own setting wins)."""
    if bars_enabled():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def progress_bar(iterable=None, *, progress: bool = True, **kwargs):
    """`tqdm(iterable, **kwargs)`, disabled unless `bars_enabled(progress)`."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not bars_enabled(progress), **kwargs)
