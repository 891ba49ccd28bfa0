"""Teacher answers cut at max_new_tokens: kept with finished=false, counted, and left out of training on request."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from model.samples import sample_row
from model.training.config import TrainConfig
from storage.schemas import to_table


def _row(i: int, finished: bool) -> dict:
    return sample_row(sample_id=f"s{i}", doc_id=f"d{i}", chunk_id=f"d{i}", student_prefix=[1, 2, 3],
                      answer_ids=[4, 5], topk_ids=[[4, 6], [5, 6]], topk_logprobs=[[-0.1, -2.0], [-0.2, -3.0]], k=2,
                      finished=finished, context_ids=[7, 8, 9])


def test_sample_row_finished_column_round_trips_through_the_samples_schema():
    rows = [_row(0, True), _row(1, False)]
    table = to_table("samples", [{k: v for k, v in r.items() if k != "context_ids"} for r in rows])
    assert table.column("finished").to_pylist() == [True, False]
    assert sample_row(sample_id="x", doc_id="d", chunk_id="d", student_prefix=[1], answer_ids=[2],
                      topk_ids=[2], topk_logprobs=[0.0], k=1)["finished"] is True  # the default


def test_use_unfinished_is_a_result_field_defaulting_on():
    assert TrainConfig().use_unfinished is True
    assert "use_unfinished" in TrainConfig(use_unfinished=False).result_dict()
    assert TrainConfig.from_dict(TrainConfig(use_unfinished=False).to_dict()).use_unfinished is False


def _tiny_base():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


class _Tok:
    """The minimum the loop needs from a tokenizer when rows carry context_ids (no chat template)."""

    pad_token_id = 0
    eos_token_id = 0
    chat_template = None

    def __call__(self, text, **kw):
        return {"input_ids": [1 + (ord(c) % 10) for c in text]}


def test_training_keeps_unfinished_rows_by_default_and_leaves_them_out_on_request(tmp_path, monkeypatch):
    from model.training import data as td
    from model.training import loop

    monkeypatch.setattr(td, "affixes", lambda tok: ([1], [2]))
    rows = [_row(i, finished=i % 2 == 0) for i in range(6)]
    hyper = {"target_modules": ["down_proj"], "rank": 2, "latent_dim": 16, "latent_count": 4, "depth": 1,
             "heads": 1, "mlp_ratio": 1}
    seen = {}
    for use in (True, False):
        cfg = TrainConfig(total_steps=1, warmup_steps=0, batch_size=8, use_unfinished=use, eval_at_start=False,
                          multi_chunk=False, checkpoint_every=0)
        run = loop.prepare(_tiny_base(), _Tok(), hyper, cfg, rows, None, tmp_path / str(use), loop.current_dist())
        seen[use] = sorted(run.micro_batch(0).batch["sample_ids"])
    assert seen[True] == [f"s{i}" for i in range(6)]
    assert seen[False] == ["s0", "s2", "s4"]
    with pytest.raises(ValueError, match="finished answer"):
        loop.prepare(_tiny_base(), _Tok(), hyper, TrainConfig(total_steps=1, warmup_steps=0, use_unfinished=False),
                     [_row(1, False)], None, tmp_path / "none", loop.current_dist())


def test_teacher_unit_keeps_answers_cut_at_the_token_limit(tmp_path, toy_model_dir):
    from tasks.generation import BackendConfig
    from tasks.teacher import TeacherConfig, teacher_unit

    chunk = {"chunk_id": "c0", "doc_id": "d0", "chunk_index": 0, "n_chunks": 1,
             "text": "the color of zorb is red . the size of zorb is big ."}
    questions = [{"question_id": f"q{i}", "chunk_id": "c0", "doc_id": "d0", "kind": "gold", "question": q}
                 for i, q in enumerate(["what is the color of zorb ?", "what is the size of zorb ?"])]
    qp, cp = tmp_path / "q.parquet", tmp_path / "c.parquet"
    pq.write_table(to_table("questions", questions), qp)
    pq.write_table(to_table("chunks", [chunk]), cp)
    out = {}
    for limit in (1, 8):
        cfg = TeacherConfig(topk=4, max_new_tokens=limit, generator=BackendConfig(backend="transformers"))
        res = teacher_unit.fn(str(tmp_path / f"store{limit}"), str(qp), str(cp), str(toy_model_dir), cfg, "toy",
                              key=f"k{limit}")
        path = next(e["path"] for e in res["entries"] if e["table"] == "samples")
        out[limit] = (res["stats"], pq.read_table(path).to_pylist())
    stats, rows = out[1]  # one token: every answer is cut before its end token, and kept
    assert stats["samples"] == 2 and stats["unfinished"] == 2 and stats["rejects"] == 0
    assert [r["finished"] for r in rows] == [False, False] and all(r["n_answer_tokens"] == 1 for r in rows)
    stats, rows = out[8]  # room to finish: no answer is flagged
    assert stats["samples"] == 2 and stats["unfinished"] == 0 and all(r["finished"] for r in rows)
    assert rows[0]["student_ids"][rows[0]["answer_start"]] == out[1][1][0]["student_ids"][out[1][1][0]["answer_start"]]
