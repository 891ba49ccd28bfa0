"""Resolve the base model once per run: a local folder, a hub id, or a built-in converted into the store."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from model.base_models import BUILTIN_MODELS, resolve_base_model

__all__ = ["BUILTIN_MODELS", "prepare_model", "resolve_model"]


@task(name="resolve-base-model", task_run_name="resolve {name}")
def resolve_model(name: str, store_root: str) -> str:
    """The model folder for `name`, building or converting a built-in into the store once."""
    return str(resolve_base_model(name, Path(store_root) / "models"))


def prepare_model(name: str, store_root: str) -> str:
    """Outside a flow: the same resolution, for `d2l models --prepare`."""
    return str(resolve_base_model(name, Path(store_root).resolve() / "models"))
