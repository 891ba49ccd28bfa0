"""The repository root and the environment of a `d2l` subprocess."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def subprocess_env(api_url: str | None = None) -> dict[str, str]:
    """The environment for a `d2l` subprocess, pointed at the session's Prefect server."""
    env = dict(os.environ)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
