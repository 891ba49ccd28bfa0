"""Question synthesis: versioned prompt templates and a forgiving parser for what the question LLM writes.

Round 1 asks for plain questions about a chunk; round 2 shows round 1's questions and asks for new ones,
including reversals and questions that need two facts. The parser accepts numbered lists, bullets, JSON
(a list of strings or of {"question": ...}) and bare lines ending in "?", and says why it rejects the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources

PROMPT_VERSION = "v1"
_NUMBERED = re.compile(r"^\s*(?:\(?\d{1,3}[.):]|[-*\u2022]|Q\d*[:.])\s*")


def prompt_template(round_no: int, version: str = PROMPT_VERSION) -> str:
    """The template text of round 1 or 2 for a prompt version (files in model/text/prompts/)."""
    return resources.files("model.text").joinpath("prompts", f"questions_round{round_no}_{version}.txt").read_text()


def render_prompt(round_no: int, text: str, n: int, previous: list[str] | None = None,
                  version: str = PROMPT_VERSION) -> str:
    """The user message asking for `n` questions about `text` (round 2 lists the `previous` ones)."""
    prev = "\n".join(f"- {q}" for q in previous or []) or "- (none)"
    return prompt_template(round_no, version).format(n=n, text=text.strip(), previous=prev)


@dataclass
class ParsedQuestions:
    questions: list[str]
    rejected: list[tuple[str, str]]  # (reason, the offending text)


def _from_json(raw: str) -> list[str] | None:
    start, end = raw.find("["), raw.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(raw[start:end + 1])
    except ValueError:
        return None
    out = []
    for item in data if isinstance(data, list) else []:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict) and isinstance(item.get("question"), str):
            out.append(item["question"])
    return out or None


def _normalise(q: str) -> str:
    return re.sub(r"\s+", " ", q.strip().strip('"').strip()).lower()


def parse_questions(raw: str, seen: list[str] | None = None, max_chars: int = 300) -> ParsedQuestions:
    """Questions from an LLM reply; duplicates (also of `seen`), empties and non-questions are rejected."""
    if not raw or not raw.strip():
        return ParsedQuestions([], [("empty", "")])
    candidates = _from_json(raw)
    if candidates is None:
        candidates = []
        for line in raw.splitlines():
            stripped = line.strip()
            if not stripped:
                continue
            listed = bool(_NUMBERED.match(stripped))
            body = _NUMBERED.sub("", stripped).strip()
            if listed or body.endswith("?"):
                candidates.append(body)
    questions: list[str] = []
    rejected: list[tuple[str, str]] = []
    known = {_normalise(q) for q in seen or []}
    for c in candidates:
        q = re.sub(r"\s+", " ", c.strip().strip('"')).strip()
        key = _normalise(q)
        if not q:
            rejected.append(("empty", c))
        elif not q.endswith("?") or len(q) < 8 or len(q) > max_chars:
            rejected.append(("unparsable", q[:200]))
        elif key in known:
            rejected.append(("duplicate", q[:200]))
        else:
            known.add(key)
            questions.append(q)
    if not candidates:
        rejected.append(("unparsable", raw.strip()[:200]))
    return ParsedQuestions(questions, rejected)


