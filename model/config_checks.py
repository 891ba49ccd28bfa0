"""Checks shared by the config dataclasses (HyperConfig, TrainConfig), kept free of torch imports."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def from_dict_strict(cls: type[T], d: dict[str, Any]) -> T:
    """``cls(**d)`` after checking that every key of `d` is a field of `cls` (a typo is an error, not a no-op)."""
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


MERGE_MODES = ("concat", "mean")


def merge_mode(value: str) -> str:
    """Validate a chunk-merge mode; the old name "scaled" reads as "mean"."""
    value = "mean" if value == "scaled" else value
    if value not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {value!r}")
    return value


def read_config_json(folder_or_file: str | Path, name: str) -> dict[str, Any]:
    """The JSON object of a config file: `folder_or_file` itself, or `name` inside it when it is a folder."""
    p = Path(folder_or_file)
    return json.loads((p / name if p.is_dir() else p).read_text())
