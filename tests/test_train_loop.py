"""The hypernetwork training loop: KL falls, kill -9 + resume is exact, multi-chunk batches, no pickles."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.training.checkpoint import UnsafeCheckpointError, load_hypernet
from model.hypernet.config import HyperConfig
from model.training.config import TrainConfig
from model.training.data import (
    DataOrder, build_batch, draw_chunk_counts, epoch_batches, split_context, split_held_out,
)
from model.training.loop import lr_factor, train
from model.training.run_folder import latest_checkpoint
from support.tiny_models import tiny_teacher_setup

TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@contextlib.contextmanager
def deterministic_cpu():
    """One thread and deterministic algorithms (restored afterwards)."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def tiny_setup(tok_dir, n_docs: int = 24, questions: int = 4):
    """A tiny random Llama as teacher and student base, and teacher rows of the gold answers from it."""
    model, tok, _, rows = tiny_teacher_setup(tok_dir, n_docs, questions, seed=3, gold_answers=True)
    return model, tok, rows


def tiny_hyper() -> HyperConfig:
    return HyperConfig(target_modules=["down_proj", "up_proj"], rank=4, latent_dim=32, latent_count=4, depth=1, heads=2)


RESUME_CFG = dict(lr=5e-3, warmup_steps=3, total_steps=16, batch_size=8, grad_accum=2, eval_every=8,
                  eval_batches=2, checkpoint_every=4, seed=5, multi_chunk=True, l1_weight=0.01)


@pytest.fixture(scope="module")
def toy(tiny_tokenizer_dir):
    return tiny_setup(tiny_tokenizer_dir)


def run_resume_child(tok_dir: str, out_dir: str, sleep: float) -> None:
    """Entry point of the subprocess in test_kill_and_resume (slowed down so that it can be killed)."""
    model, tok, rows = tiny_setup(tok_dir)
    train_rows, eval_rows = split_held_out(rows, 0.25)
    with deterministic_cpu():
        train(model, tok, tiny_hyper(), TrainConfig(**RESUME_CFG), train_rows, eval_rows, out_dir,
              on_metrics=lambda row: time.sleep(sleep), progress=False)


def final_eval_kl(history, step):
    return next(r["eval_kl"] for r in history if r["kind"] == "eval" and r["step"] == step)


def test_heldout_kl_falls(toy, tmp_path):
    model, tok, rows = toy
    train_rows, eval_rows = split_held_out(rows, 0.25)
    assert {r["doc_id"] for r in train_rows}.isdisjoint({r["doc_id"] for r in eval_rows}) and eval_rows
    cfg = TrainConfig(lr=5e-3, warmup_steps=5, total_steps=60, batch_size=8, eval_every=20, checkpoint_every=0,
                      multi_chunk=False, l1_weight=0.0)
    seen = []
    with deterministic_cpu():
        res = train(model, tok, tiny_hyper(), cfg, train_rows, eval_rows, tmp_path / "run", on_metrics=seen.append,
                    progress=False)
    hist = res["history"]
    assert seen == hist and res["compact_logits"] is True
    kl0, kl = final_eval_kl(hist, 0), final_eval_kl(hist, 60)
    assert kl < 0.75 * kl0, (kl0, kl)
    train_rows_m = [r for r in hist if r["kind"] == "train"]
    assert len(train_rows_m) == 60 and all(k in train_rows_m[0] for k in
                                           ("loss", "distill", "l1", "lr", "grad_norm", "tokens_per_s"))
    first, last = train_rows_m[0]["loss"], sum(r["loss"] for r in train_rows_m[-10:]) / 10
    assert last < 0.9 * first
    lrs = [r["lr"] for r in train_rows_m]
    assert lrs[0] == pytest.approx(1e-3) and max(lrs) == pytest.approx(5e-3) and lrs[-1] < 2e-4
    # the final checkpoint is loadable by load_hypernet and equals the returned network
    assert res["checkpoint"] == latest_checkpoint(tmp_path / "run") and res["checkpoint"].name == "step-00000060"
    net = load_hypernet(res["checkpoint"])
    assert all(torch.equal(v, res["hypernet"].state_dict()[k]) for k, v in net.state_dict().items())
    assert TrainConfig.load(tmp_path / "run") == cfg
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == json.loads(json.dumps(hist))


def test_kill_and_resume_equals_uninterrupted_run(tiny_tokenizer_dir, toy, tmp_path):
    out = tmp_path / "crashy"
    script = (f"import sys; sys.path[:0] = [{str(TESTS.parent)!r}, {str(TESTS)!r}]\n"
              "import test_train_loop as t\n"
              f"t.run_resume_child({str(tiny_tokenizer_dir)!r}, {str(out)!r}, 0.3)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(TESTS.parent))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = int(json.loads((latest_checkpoint(out) / "state.json").read_text())["step"])
    assert 0 < killed_at < RESUME_CFG["total_steps"]

    model, tok, rows = toy
    train_rows, eval_rows = split_held_out(rows, 0.25)
    cfg = TrainConfig(**RESUME_CFG)
    with deterministic_cpu():
        resumed = train(model, tok, tiny_hyper(), cfg, train_rows, eval_rows, out, progress=False)
        straight = train(model, tok, tiny_hyper(), cfg, train_rows, eval_rows, tmp_path / "straight", progress=False)
    assert resumed["resumed_from"] == killed_at and straight["resumed_from"] is None
    a, b = resumed["hypernet"].state_dict(), straight["hypernet"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s", "tokens_per_s")} for r in h]
    assert strip(resumed["history"]) == strip(straight["history"])  # same losses, grad norms, evals, step by step
    assert [p.name for p in (out / "checkpoints").iterdir()] and len(list((out / "checkpoints").glob("step-*"))) == 1
    # a finished run resumes to nothing
    again = train(model, tok, tiny_hyper(), cfg, train_rows, eval_rows, out, progress=False)
    assert again["resumed_from"] == cfg.total_steps and strip(again["history"]) == strip(straight["history"])


def test_multi_chunk_batches(tiny_tokenizer_dir, tmp_path):
    model, tok, rows = tiny_setup(tiny_tokenizer_dir, n_docs=6, questions=2)
    # pieces: near-equal, wrapped in the affixes; never more pieces than tokens
    assert [len(p) for p in split_context(list(range(10)), 3)] == [4, 3, 3]
    assert split_context([1, 2], 5) == [[1], [2]] and split_context([], 3) == [[]]
    tb = build_batch(rows[:4], [r["context_ids"] for r in rows[:4]], [1, 5], [2, 7], 0, lambda n: [3] * n)
    assert tb.chunks_per_context == [3, 3] and tb.row_context.tolist() == [0, 0, 1, 1]
    assert all(c[:2] == [1, 5] and c[-2:] == [2, 7] for c in tb.chunks)
    assert sum(len(c) - 4 for c in tb.chunks[:3]) == len(rows[0]["context_ids"])
    # chunk draws: a pure function of (seed, micro-batch), distributed as configured
    cfg = TrainConfig()
    ns, ps = cfg.chunk_probs()
    assert ns == list(range(1, 9)) and ps[:3] == [0.5, 0.125, 0.0625]
    draws = [n for m in range(2000) for n in draw_chunk_counts(0, m, 2, ns, ps)]
    assert draws[:50] == [n for m in range(25) for n in draw_chunk_counts(0, m, 2, ns, ps)]
    assert abs(draws.count(1) / len(draws) - 0.5) < 0.03 and abs(draws.count(2) / len(draws) - 0.125) < 0.02
    assert TrainConfig(multi_chunk=False).chunk_probs() == ([1], [1.0])
    for merge in ("concat", "mean"):
        cfg = TrainConfig(total_steps=3, warmup_steps=1, batch_size=4, chunk_dist={2: 0.5, 4: 0.5}, merge=merge,
                          eval_every=0, checkpoint_every=0)
        res = train(model, tok, tiny_hyper(), cfg, rows, rows[:4], tmp_path / merge, progress=False)
        steps = [r for r in res["history"] if r["kind"] == "train"]
        assert len(steps) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
        assert all(r["chunks"] >= 4 for r in steps)  # 2 contexts a batch, >= 2 pieces each
        assert math.isfinite(res["final_eval"]["eval_kl"])


def test_data_order_is_a_pure_function_and_bucketed():
    lengths = [(i * 37) % 50 + 5 for i in range(100)]
    a, b = DataOrder(lengths, 8, seed=1), DataOrder(lengths, 8, seed=1)
    assert a.batches_per_epoch == 13
    assert [b(m) for m in (30, 2, 14)] == [a(m) for m in (30, 2, 14)]
    epoch0 = epoch_batches(lengths, 8, 1, 0)
    assert sorted(i for bt in epoch0 for i in bt) == list(range(100)) and epoch0 != epoch_batches(lengths, 8, 1, 1)
    assert epoch0 != epoch_batches(lengths, 8, 2, 0)
    spread = [max(lengths[i] for i in bt) - min(lengths[i] for i in bt) for bt in epoch0]
    unbucketed = [max(lengths[i] for i in bt) - min(lengths[i] for i in bt)
                  for bt in epoch_batches(lengths, 8, 1, 0, bucket_by_length=False)]
    assert sum(spread) < 0.5 * sum(unbucketed)
    rows = [{"doc_id": f"doc{i % 17}"} for i in range(170)]
    tr, ho = split_held_out(rows, 0.3)
    assert {r["doc_id"] for r in tr}.isdisjoint({r["doc_id"] for r in ho}) and 0 < len(ho) < 170
    assert split_held_out(rows[::-1], 0.3)[1] == ho[::-1]


def test_schedule_and_config_json(tmp_path):
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110, chunk_dist={1: 1.0, 3: 1.0})
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)
    cfg.save(tmp_path)
    assert TrainConfig.load(tmp_path) == cfg and TrainConfig.load(tmp_path).chunk_dist == {1: 1.0, 3: 1.0}
    with pytest.raises(ValueError):
        TrainConfig.from_dict({"lr": 1.0, "nope": 1})


def test_checkpoint_with_a_pickle_is_refused(tiny_tokenizer_dir, tmp_path):
    model, tok, rows = tiny_setup(tiny_tokenizer_dir, n_docs=4, questions=2)
    cfg = TrainConfig(total_steps=2, warmup_steps=0, batch_size=4, checkpoint_every=1, eval_every=0, multi_chunk=False)
    res = train(model, tok, tiny_hyper(), cfg, rows, None, tmp_path / "run", progress=False)
    ckpt = res["checkpoint"]
    (ckpt / "extra_state.pt").write_bytes(pickle.dumps({"payload": 1}))
    with pytest.raises(UnsafeCheckpointError):
        load_hypernet(ckpt)
    with pytest.raises(UnsafeCheckpointError):
        train(model, tok, tiny_hyper(), cfg, rows, None, tmp_path / "run", progress=False)
    (ckpt / "extra_state.pt").unlink()
    (ckpt / "notes").write_bytes(b"\x80\x04K\x01.")  # pickle bytes under an innocent name
    with pytest.raises(UnsafeCheckpointError):
        load_hypernet(ckpt)
    # a changed training config does not silently continue an old run
    (ckpt / "notes").unlink()
    with pytest.raises(ValueError, match="training config differs"):
        train(model, tok, tiny_hyper(), TrainConfig(**{**cfg.to_dict(), "lr": 0.5}), rows, None, tmp_path / "run",
              progress=False)


@pytest.mark.parametrize("arch", ["llama", "lfm2"])
def test_compact_logits_give_the_full_loss(toy, arch):
    from transformers import Lfm2Config, Lfm2ForCausalLM

    from model.hypernet.lora import freeze
    from model.hypernet.encoder import ContextEncoder
    from model.hypernet.network import HyperNetwork
    from model.training.data import affixes
    from model.training.forward import compact_logits_agree, forward_loss

    model, tok, rows = toy
    patterns = ["down_proj", "up_proj"]
    if arch == "lfm2":
        torch.manual_seed(0)
        model = freeze(Lfm2ForCausalLM(Lfm2Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, layer_types=["conv", "full_attention", "conv"], block_auto_adjust_ff_dim=False,
            initializer_range=0.2, pad_token_id=tok.pad_token_id))).eval()
        patterns = ["w2", "out_proj"]
    torch.manual_seed(0)
    net = HyperNetwork.for_model(HyperConfig(target_modules=patterns, rank=4, latent_dim=16, latent_count=2, depth=1,
                                             heads=2), model)
    with torch.no_grad():  # a non-zero update
        for k in net.scale_B:
            net.scale_B[k].fill_(1.0)
    tb = build_batch(rows[:6], [r["context_ids"] for r in rows[:6]], *affixes(tok), tok.pad_token_id, lambda n: [2] * n)
    enc = ContextEncoder(model, tok, net.config.layer_indices)
    assert compact_logits_agree(model, tb.batch)
    full = forward_loss(model, net, enc, tb, "concat", 0.1, compact=False)[0]
    comp = forward_loss(model, net, enc, tb, "concat", 0.1, compact=True)[0]
    assert torch.allclose(full.loss, comp.loss, rtol=1e-5, atol=1e-6) and full.n_tokens == comp.n_tokens
    assert torch.allclose(full.per_answer, comp.per_answer, rtol=1e-5, atol=1e-6)
