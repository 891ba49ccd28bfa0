"""Synthetic sources (`synthetic://WORLD?k=v&...`): a registry of generated worlds.

storage knows only the URI form and how to turn a world's documents into `documents` rows; the worlds
themselves are registered from outside (the toy world of model/toy/world.py is registered by tasks/ingest.py),
so that storage imports nothing of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SyntheticDocument", "SyntheticWorld", "register_world", "registered_worlds", "world_named"]


@dataclass(frozen=True)
class SyntheticDocument:
    """One generated document: its text, gold question/answer pairs and free metadata."""

    text: str
    gold_qa: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SyntheticWorld:
    """A generator of documents, parameterised by integers with defaults.

    `check(params)` returns "" or a one-line problem (the spec is rejected with it); `documents(params)`
    yields the documents for checked parameters, deterministically."""

    name: str
    defaults: dict[str, int]
    check: Callable[[dict[str, int]], str]
    documents: Callable[[dict[str, int]], Iterable[SyntheticDocument]]


_WORLDS: dict[str, SyntheticWorld] = {}


def register_world(world: SyntheticWorld) -> None:
    """Make `synthetic://<world.name>?...` readable (registering the same name again replaces it)."""
    _WORLDS[world.name] = world


def world_named(name: str) -> SyntheticWorld | None:
    """The registered world of that name, or None."""
    return _WORLDS.get(name)


def registered_worlds() -> list[str]:
    """Names of the registered worlds, sorted."""
    return sorted(_WORLDS)
