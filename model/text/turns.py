"""The teacher's user turn, the same in every stage: the document, a blank line, the question.

The teacher stage, evaluation, the toy model's training data and the toy benchmark all build it here, so
that what the teacher saw and what the student is compared against never drift apart.
"""

from __future__ import annotations

__all__ = ["teacher_prompt"]


def teacher_prompt(document: str | None, question: str) -> str:
    """`document`, a blank line, `question` (both stripped); the question alone when there is no document."""
    document, question = (document or "").strip(), question.strip()
    return f"{document}\n\n{question}" if document else question
