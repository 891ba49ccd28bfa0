"""The benchmark table cannot claim success in a smoke run, nor over a teacher that cannot answer."""

from __future__ import annotations

from model.toy.bench import one_table
from model.toy.verdict import TEACHER_EM_FLOOR, verdict


def summary(teacher_em: float, d2l_em: float) -> dict:
    method = {"f1": 0.5, "agrees_with_teacher": 0.5, "kl_to_teacher": 0.1, "questions": 10, "docs": 2}
    return {"methods": {"teacher": dict(method, exact_match=teacher_em), "no_doc": dict(method, exact_match=0.1),
                        "d2l": dict(method, exact_match=d2l_em, adapter_seconds=0.004),
                        "cd": dict(method, exact_match=0.9, adapter_seconds=3.0)},
            "ratios": {"d2l_over_teacher_em": d2l_em / teacher_em, "cd_over_d2l_seconds": 750.0,
                       "d2l_kl_gap_closed": -32.631}}


LONG = {"curves": {"d2l_concat": {"1": 0.5, "4": 0.5}}}


def test_smoke_run_never_says_met():
    table = one_table(summary(teacher_em=0.104, d2l_em=0.104), LONG, cd_steps=10, smoke=True)
    assert "met" not in table.replace("MISSED", "")  # the ratios are 1.0 and 750x: above every target
    assert f"n/a (teacher EM 0.104 below {TEACHER_EM_FLOOR:g})" in table
    assert "-32.631" not in table  # the KL gap over a teacher that cannot answer is not printed as a number


def test_smoke_run_with_a_good_teacher_is_still_not_evidence():
    table = one_table(summary(teacher_em=0.99, d2l_em=0.99), LONG, cd_steps=10, smoke=True)
    assert "met" not in table.replace("MISSED", "")
    assert "n/a (smoke run" in table


def test_full_run_judges_against_the_targets():
    table = one_table(summary(teacher_em=0.99, d2l_em=0.95), LONG, cd_steps=10, smoke=False)
    assert "(target >= 0.9: met)" in table and "(target >= 500x: met)" in table
    table = one_table(summary(teacher_em=0.99, d2l_em=0.30), LONG, cd_steps=10, smoke=False)
    assert "(target >= 0.9: MISSED)" in table
    # a full run whose teacher cannot answer: no verdict either
    assert verdict(1.0, 0.9, teacher_em=0.2, smoke=False).startswith("n/a (teacher EM 0.200")
    assert verdict(None, 0.9, teacher_em=0.99, smoke=False) == "-"


def test_full_run_judges_the_kl_gap_long_documents_and_the_needle():
    good = dict(summary(teacher_em=0.99, d2l_em=0.95))
    good["ratios"] = dict(good["ratios"], d2l_kl_gap_closed=0.90)
    long = {"curves": {"d2l_concat": {"1": 0.9, "4": 0.60}, "d2l_mean": {"1": 0.9, "4": 0.75}},
            "needle": {"teacher": {"0.0": 1.0, "1.0": 1.0}, "d2l_concat": {"0.0": 0.9, "1.0": 0.8},
                       "d2l_mean": {"0.0": 0.5, "1.0": 0.5}}, "needle_factor": 4}
    table = one_table(good, long, cd_steps=10, smoke=False)
    assert "0.900 (target >= 0.85: met)" in table  # the KL gap closed
    assert "0.833 (target >= 0.8: met)" in table  # the better merge at 4x / 1x (mean: 0.75 / 0.9)
    assert "0.850 (target >= 0.8: met)" in table  # the needle: the better D2L merge's mean, never the teacher's
    long["needle"]["d2l_concat"] = {"0.0": 0.9, "1.0": 0.6}
    long["curves"]["d2l_mean"]["4"] = 0.70
    table = one_table(dict(good, ratios=dict(good["ratios"], d2l_kl_gap_closed=0.5)), long, cd_steps=10, smoke=False)
    assert "0.500 (target >= 0.85: MISSED)" in table
    assert "0.778 (target >= 0.8: MISSED)" in table and "0.750 (target >= 0.8: MISSED)" in table
