"""Context groups: several contexts of a micro-batch merged into one adapter in training (TrainConfig.context_groups)."""

from __future__ import annotations

import math

import pytest
import torch

from model.hypernet.config import HyperConfig
from model.training.config import TrainConfig
from model.training.data import build_batch, draw_group_size, group_contexts
from model.training.loop import train
from support.tiny_models import tiny_teacher_setup

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def row(doc: str, question: list[int], answer: list[int], context: list[int]) -> dict:
    n, k = len(answer), 2
    return {"doc_id": doc, "student_ids": question + answer, "answer_start": len(question), "n_answer_tokens": n,
            "topk": k, "topk_ids": [t for a in answer for t in (a, 0)], "topk_logprobs": [-0.1, -2.5] * n,
            "context_ids": context}


def batch(rows):
    return build_batch(rows, [r["context_ids"] for r in rows], [1], [2], 0, lambda n: [2] * n)


def test_groups_merge_consecutive_contexts_and_never_one_question_twice():
    rows = [row("a", [5, 6], [7], [10, 11, 12]), row("a", [5, 8], [9], [10, 11, 12]),
            row("b", [5, 9], [7], [13, 14]), row("c", [5, 6], [8], [15, 16, 17, 18]),  # c is asked a's question
            row("d", [5, 3], [4], [19, 20])]
    tb = batch(rows)
    assert tb.chunks_per_context == [2, 2, 2, 2] and tb.row_context.tolist() == [0, 0, 1, 2, 3]
    assert group_contexts(tb, 1) is tb
    two = group_contexts(tb, 2)
    assert two.chunks_per_context == [4, 4] and two.row_context.tolist() == [0, 0, 0, 1, 1]
    assert two.chunks == tb.chunks and two.batch is tb.batch  # the pieces and rows stay; only the adapters merge
    # a + b in one group; c is asked "5 6" as a is, so it opens the next group even though 4 would fit
    four = group_contexts(tb, 4)
    assert four.chunks_per_context == [4, 4] and four.row_context.tolist() == [0, 0, 0, 1, 1]
    assert sum(four.chunks_per_context) == len(four.chunks)


def test_group_sizes_are_drawn_per_micro_batch_after_the_start_fraction():
    cfg = TrainConfig(total_steps=100, context_groups={1: 1.0, 4: 3.0}, context_groups_from=0.5)
    assert cfg.group_probs(49) == ([1], [1.0])
    sizes, probs = cfg.group_probs(50)
    assert sizes == [1, 4] and probs == [0.25, 0.75]
    draws = [draw_group_size(3, m, sizes, probs) for m in range(2000)]
    assert draws[:40] == [draw_group_size(3, m, sizes, probs) for m in range(40)]  # a pure function of (seed, m)
    assert abs(draws.count(4) / len(draws) - 0.75) < 0.03
    assert TrainConfig().group_probs(0) == ([1], [1.0])  # off by default
    for bad in ({}, {0: 1.0}, {2: -1.0}, {2: 0.0}):
        with pytest.raises(ValueError, match="context_groups"):
            TrainConfig(context_groups=bad)
    with pytest.raises(ValueError, match="context_groups_from"):
        TrainConfig(context_groups_from=1.5)


def test_config_json_keeps_the_groups(tmp_path):
    cfg = TrainConfig(context_groups={1: 1.0, 4: 2.0}, context_groups_from=0.7)
    cfg.save(tmp_path)
    back = TrainConfig.load(tmp_path)
    assert back == cfg and back.context_groups == {1: 1.0, 4: 2.0}
    assert "context_groups" in cfg.result_dict() and "context_groups_from" in cfg.result_dict()


def test_training_with_groups_scores_every_row_with_its_groups_adapter(tiny_tokenizer_dir, tmp_path):
    model, tok, _, rows = tiny_teacher_setup(tiny_tokenizer_dir, 12, 2, seed=3, gold_answers=True)
    hyper = HyperConfig(target_modules=["down_proj"], rank=4, latent_dim=32, latent_count=4, depth=1, heads=2)
    cfg = TrainConfig(total_steps=4, warmup_steps=1, batch_size=8, rows_per_context=2, multi_chunk=False,
                      eval_every=0, eval_at_start=False, checkpoint_every=0, context_groups={4: 1.0},
                      context_groups_from=0.5, seed=1)
    seen = []
    import model.training.forward as fwd

    real = fwd.merge_chunks

    def spy(chunks, per, merge, bias=None):
        seen.append(list(per))
        return real(chunks, per, merge, bias)

    fwd.merge_chunks = spy
    try:
        res = train(model, tok, hyper, cfg, rows, rows[:4], tmp_path, progress=False)
    finally:
        fwd.merge_chunks = real
    steps = [r for r in res["history"] if r["kind"] == "train"]
    assert len(steps) == 4 and all(math.isfinite(r["loss"]) for r in steps)
    train_calls = seen[: len(steps)]  # the held-out evaluation comes after the last step
    assert all(len(p) == 4 for p in train_calls[:2])  # steps 1-2: one adapter per context (4 contexts a batch)
    assert all(len(p) == 1 and p[0] == 4 for p in train_calls[2:4])  # steps 3-4: the 4 contexts share one
    assert math.isfinite(res["final_eval"]["eval_kl"])
