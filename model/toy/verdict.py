"""Whether a benchmark number meets its target, and when the question has no answer.

A ratio over the teacher (D2L / teacher EM, the KL gap closed) means nothing when the teacher itself cannot
answer, and a smoke run (tiny sizes, a few seconds) is a test of the path, never evidence: in both cases
the verdict is "n/a" with the reason, never "met"."""

from __future__ import annotations

# the method-quality bars (the toy benchmark's table prints each with its verdict)
TARGETS = {"d2l_over_teacher_em": 0.90, "d2l_kl_gap_closed": 0.85, "cd_over_d2l_seconds": 500.0,
           "long4x_over_1x": 0.80, "needle_mean_em": 0.80}
TEACHER_EM_FLOOR = 0.5  # below this the teacher cannot answer; ratios over it are noise


def not_applicable(teacher_em: float | None, smoke: bool, floor: float = TEACHER_EM_FLOOR) -> str | None:
    """Why no verdict can be given (None: a verdict can be given)."""
    if teacher_em is None or teacher_em < floor:
        shown = "-" if teacher_em is None else f"{teacher_em:.3f}"
        return f"n/a (teacher EM {shown} below {floor:g})"
    if smoke:
        return "n/a (smoke run: sizes too small to judge)"
    return None


def verdict(value: float | None, goal: float, teacher_em: float | None, smoke: bool) -> str:
    """'met', 'MISSED', '-' (no value), or 'n/a (why)'."""
    why = not_applicable(teacher_em, smoke)
    if why:
        return why
    if value is None:
        return "-"
    return "met" if value >= goal else "MISSED"
