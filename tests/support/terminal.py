"""A line in pytest's terminal summary: the numbers a test measures, shown even when output is captured."""

from __future__ import annotations


def report(request, line: str) -> None:
    """Write `[doc2lora] line` to the terminal, past pytest's capture."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            reporter.write_line(f"[doc2lora] {line}")
    else:  # pragma: no cover
        print(f"[doc2lora] {line}")
