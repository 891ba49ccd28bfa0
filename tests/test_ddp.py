"""Data-parallel training: `torchrun --nproc_per_node 2` on CPU (gloo) trains what one process trains.

The child (this file run by torchrun, see `child_main`) trains the tiny setup of test_train_loop.py with the
process group from the environment; rank 0 writes its metrics history and final weights as JSON and
safetensors. The parent trains the same config in one process and compares:

- the loss, distillation and L1 terms, gradient norm, sample and token counts of every step, and the
  held-out evaluations: equal within LOSS_RTOL (relative; float rounding from summing two ranks' gradients
  and from the per-rank padding is ~1e-7 here);
- the final hypernetwork weights: max |difference| <= WEIGHT_ATOL.

Resume: the run is killed (SIGKILL, the whole process group) after its first checkpoint, relaunched, and
ends bit-identical to an uninterrupted 2-rank run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5
DDP_CFG = dict(lr=5e-3, warmup_steps=2, total_steps=8, batch_size=8, grad_accum=2, eval_every=4, eval_batches=2,
               checkpoint_every=2, seed=5, multi_chunk=True, l1_weight=0.01)
STRIP = ("seconds", "samples_per_s", "tokens_per_s")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _setup(tok_dir: str):
    sys.path[:0] = [str(REPO), str(TESTS)]
    from test_train_loop import split_held_out, tiny_hyper, tiny_setup

    model, tok, rows = tiny_setup(tok_dir)
    train_rows, eval_rows = split_held_out(rows, 0.25)
    return model, tok, tiny_hyper(), train_rows, eval_rows


def child_main(tok_dir: str, out_dir: str, result: str, sleep: float) -> None:
    """Under torchrun: train the tiny config data-parallel; rank 0 saves the history and the weights."""
    from safetensors.torch import save_file

    from model.training.distributed import init_from_env, shutdown
    from model.training.config import TrainConfig
    from model.training.loop import train

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist = init_from_env()
    assert dist.enabled and dist.backend == "gloo", dist
    model, tok, hyper, train_rows, eval_rows = _setup(tok_dir)
    res = train(model, tok, hyper, TrainConfig(**DDP_CFG), train_rows, eval_rows, out_dir, progress=False,
                on_metrics=(lambda row: time.sleep(sleep)) if sleep else None, dist=dist)
    if dist.is_main:
        save_file({k: v.contiguous() for k, v in res["hypernet"].state_dict().items()}, f"{result}.safetensors")
        Path(f"{result}.json").write_text(json.dumps({"history": res["history"], "resumed_from": res["resumed_from"],
                                                      "world_size": dist.world_size}))
    shutdown()


def torchrun(tok_dir: Path, out_dir: Path, result: Path, sleep: float = 0.0, launcher: str = "torchrun",
             **popen) -> subprocess.Popen:
    if launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(_free_port())]
    else:  # accelerate's multi-process launcher (torch.distributed.run inside; gloo when there is no GPU)
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port())]
    cmd = launch + [str(TESTS / "test_ddp.py"), str(tok_dir), str(out_dir), str(result), str(sleep)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **popen)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load(result: Path):
    from safetensors.torch import load_file

    return json.loads(Path(f"{result}.json").read_text()), load_file(f"{result}.safetensors")


def _strip(history):
    return [{k: v for k, v in r.items() if k not in STRIP} for r in history]


@pytest.fixture(scope="module")
def single_process(tiny_tokenizer_dir, tmp_path_factory):
    """The reference: the same config trained in one process (one thread, deterministic)."""
    from model.training.config import TrainConfig
    from model.training.loop import train

    model, tok, hyper, train_rows, eval_rows = _setup(str(tiny_tokenizer_dir))
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        res = train(model, tok, hyper, TrainConfig(**DDP_CFG), train_rows, eval_rows,
                    tmp_path_factory.mktemp("single"), progress=False)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    return res["history"], res["hypernet"].state_dict()


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shares_partition_the_batch_and_add_up_to_its_loss_and_gradient(tiny_tokenizer_dir, world):
    """`shard_batch` gives every context (with all its rows and pieces) to exactly one rank, and the ranks'
    `shard_loss` values and gradients add up to the single-process ones (no process group needed)."""
    from model.training import data as td
    from model.hypernet.encoder import ContextEncoder
    from model.training.distributed import shard_batch, shard_loss
    from model.hypernet.network import HyperNetwork
    from model.training.forward import forward_loss

    model, tok, hyper, train_rows, _ = _setup(str(tiny_tokenizer_dir))
    hcfg = hyper.resolve(model)
    torch.manual_seed(0)
    net = HyperNetwork(hcfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # B and its scales away from 0: a real gradient everywhere
    encoder = ContextEncoder(model, tok, hcfg.layer_indices)
    rows = train_rows[:12]
    ctx = [td.context_ids_of(r, tok) for r in rows]
    prefix, suffix = td.affixes(tok)
    tb = td.build_batch(rows, ctx, prefix, suffix, td.pad_id_of(tok), lambda n: [1 + i % 3 for i in range(n)])

    def loss_and_grad(batch_loss):
        net.zero_grad()
        batch_loss.backward()
        return float(batch_loss), torch.cat([p.grad.reshape(-1) for p in net.parameters()])

    full, g_full = loss_and_grad(forward_loss(model, net, encoder, tb, "concat", 0.01)[0].loss)
    total, g_total, seen = 0.0, torch.zeros_like(g_full), []
    for rank in range(world):
        shard = shard_batch(tb, rank, world)
        assert shard is not None  # 12 rows from several documents: every rank gets contexts
        seen += shard.tb.batch["sample_ids"]
        assert sum(shard.tb.chunks_per_context) == len(shard.tb.chunks)
        parts = forward_loss(model, net, encoder, shard.tb, "concat", 0.01)[0]
        value, grad = loss_and_grad(shard_loss(parts, shard, 0.01)[0])
        total, g_total = total + value, g_total + grad
    assert sorted(seen) == sorted(tb.batch["sample_ids"])
    assert total == pytest.approx(full, rel=1e-6)
    assert float((g_total - g_full).abs().max()) <= 1e-6 * max(1.0, float(g_full.abs().max()))


def _compare(ddp_history, single_history):
    assert [(r["kind"], r["step"]) for r in ddp_history] == [(r["kind"], r["step"]) for r in single_history]
    worst = 0.0
    for a, b in zip(_strip(ddp_history), _strip(single_history)):
        for k, v in b.items():
            if isinstance(v, float) and k != "lr":
                rel = abs(a[k] - v) / max(1e-8, abs(v))
                worst = max(worst, rel)
                assert rel <= LOSS_RTOL, (a["kind"], a["step"], k, a[k], v)
            else:
                assert a[k] == v, (a["kind"], a["step"], k, a[k], v)
    return worst


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_ranks_match_one_process(tiny_tokenizer_dir, tmp_path, single_process, launcher):
    single_history, single_weights = single_process
    result = tmp_path / "ddp"
    t0 = time.perf_counter()
    proc = torchrun(tiny_tokenizer_dir, tmp_path / "run", result, launcher=launcher)
    assert proc.wait(300) == 0, proc.stderr.read().decode()[-4000:]
    seconds = time.perf_counter() - t0
    info, weights = _load(result)
    assert info["world_size"] == 2 and info["resumed_from"] is None
    worst = _compare(info["history"], single_history)
    assert weights.keys() == single_weights.keys()
    dw = max(float((weights[k] - single_weights[k]).abs().max()) for k in weights)
    assert dw <= WEIGHT_ATOL, dw
    final = [r for r in info["history"] if r["kind"] == "train"][-1]
    print(f"{launcher} 2 ranks: {seconds:.1f} s; final loss {final['loss']:.6f}; worst relative difference to one "
          f"process {worst:.2e}; max weight difference {dw:.2e}")
    # only rank 0 wrote: one metrics file with one row per step/eval, one checkpoint folder
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [r["step"] for r in info["history"]]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*")] == ["step-00000008"]


def test_torchrun_killed_then_resumed_equals_uninterrupted(tiny_tokenizer_dir, tmp_path, single_process):
    import psutil

    from model.training.run_folder import latest_checkpoint

    out = tmp_path / "crashy"
    proc = torchrun(tiny_tokenizer_dir, out, tmp_path / "killed", sleep=0.5)
    try:
        deadline = time.time() + 240
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:  # the whole job dies at once, as in a machine crash: the ranks (own sessions) and the launcher
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(signal.SIGKILL)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = int(json.loads((latest_checkpoint(out) / "state.json").read_text())["step"])
    assert 0 < killed_at < DDP_CFG["total_steps"]

    resumed = torchrun(tiny_tokenizer_dir, out, tmp_path / "resumed")
    straight = torchrun(tiny_tokenizer_dir, tmp_path / "straight", tmp_path / "straight")
    assert resumed.wait(300) == 0, resumed.stderr.read().decode()[-4000:]
    assert straight.wait(300) == 0, straight.stderr.read().decode()[-4000:]
    (r_info, r_w), (s_info, s_w) = _load(tmp_path / "resumed"), _load(tmp_path / "straight")
    assert r_info["resumed_from"] == killed_at and s_info["resumed_from"] is None
    assert all(torch.equal(r_w[k], s_w[k]) for k in s_w)  # bit-identical to the uninterrupted 2-rank run
    assert _strip(r_info["history"]) == _strip(s_info["history"])
    _compare(r_info["history"], single_process[0])  # and within tolerance of one process


@pytest.mark.slow
def test_torchrun_d2l_train_only_rank0_writes_the_store(prefect_server, tmp_path, tiny_tokenizer_dir):
    """`torchrun --nproc_per_node 2 -m flows.cli train` on teacher samples made by the pipeline: rank 0 runs
    the train flow (one `runs` row, `train_metrics`, checkpoints), rank 1 trains and writes nothing."""
    from support.env import subprocess_env
    from flows.pipeline import pipeline_flow
    from storage.catalog import Catalog
    from storage.sql import run_query
    from test_runners import build_stub_model, config_for, make_corpus

    stub = build_stub_model(tiny_tokenizer_dir, tmp_path / "stub")
    store = tmp_path / "store"
    pipeline_flow(config_for(store, stub, make_corpus(tmp_path / "corpus")))
    hyper = "{target_modules: [down_proj, up_proj], rank: 2, latent_dim: 16, latent_count: 2, depth: 1, heads: 1}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "flows.cli", "train", "--store", str(store), "--base-model", str(stub), "--no-progress",
           "--set", "train.name=ddp", "--set", "train.threads=1", "--set", f"train.hyper={hyper}",
           "--set", "train.optim={total_steps: 4, warmup_steps: 1, batch_size: 4, eval_every: 2, checkpoint_every: 2}"]
    env = dict(subprocess_env(prefect_server), OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"torchrun -m flows.cli train (2 ranks, 4 steps): {time.perf_counter() - t0:.1f} s")
    cat = Catalog(store)
    assert run_query(cat, "SELECT status FROM runs WHERE flow = 'train'")[1] == [("completed",)]
    steps = run_query(cat, "SELECT kind, step FROM train_metrics WHERE name = 'ddp' ORDER BY kind, step")[1]
    assert [s for s in steps if s[0] == "train"] == [("train", 1), ("train", 2), ("train", 3), ("train", 4)]
    assert {s for s in steps if s[0] == "eval"} <= {("eval", 0), ("eval", 2), ("eval", 4)}
    run = store / "hypernets" / "ddp"
    assert [p.name for p in (run / "checkpoints").glob("step-*")] == ["step-00000004"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(steps)
    assert not (store / "writer.lock").exists() or (store / "writer.lock").read_text() == ""


if __name__ == "__main__":  # the torchrun child
    child_main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
