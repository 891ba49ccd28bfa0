"""Scale-out task runners: the same stages on threads, processes, Dask (a real LocalCluster with 2 worker
processes, or an existing scheduler) and Ray (a real local runtime) give the same catalog contents.

The model-bound stages use a stub model: a 1-layer Llama (16 dims) made from the tiny tokenizer whose weights
are set so that it answers every prompt with one fixed token and then its end-of-turn token. It is a real
transformers model folder, so synthesize and teacher run their ordinary code (question LLM, greedy answers,
top-k log-probs) in milliseconds; the questions the LLM "writes" are unparsable and become rejects, the toy
documents' gold QA becomes questions and samples.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from support.corpus import make_corpus
from flows.config import PipelineConfig, load_config
from flows.runners import RunnerConfig, UnitsFailed, build_task_runner, run_units
from storage.catalog import Catalog
from storage.sql import run_query

VIEWS = {"documents": "doc_id", "chunks": "chunk_id", "questions": "question_id", "samples": "sample_id",
         "rejects": "stage, source, item, reason, detail"}


def build_stub_model(tok_dir: Path, out: Path) -> Path:
    """A transformers model folder (the tiny tokenizer + a 1-layer Llama) that answers any prompt with one
    fixed token, then its end-of-turn token: every layer's weights are zero (the residual stream carries the
    last token's embedding), the embeddings put the answer token on one axis and every other token on
    another, and the LM head maps "not the answer token" to the answer token and "the answer token" to eos."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    shutil.copytree(tok_dir, out, dirs_exist_ok=True)
    d = 16
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    answer = tok.convert_tokens_to_ids(tok.tokenize(" yes"))[-1]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.zero_()
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        emb = torch.zeros(len(tok), d)
        emb[:, 0] = 1.0
        emb[answer] = 0.0
        emb[answer, 1] = 1.0
        emb[:, 2:] = 0.01 * torch.randn(len(tok), d - 2, generator=gen)  # distinct, small: varied top-k tails
        model.model.embed_tokens.weight.copy_(emb)
        head = 0.01 * torch.randn(len(tok), d, generator=gen)
        head[answer, 0] = 5.0
        head[tok.eos_token_id, 1] = 5.0
        model.lm_head.weight.copy_(head)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def stub_model_dir(tiny_tokenizer_dir, tmp_path_factory) -> Path:
    return build_stub_model(tiny_tokenizer_dir, tmp_path_factory.mktemp("stub-model"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "docs", n=6)


def config_for(store: Path, model: Path, corpus: Path, runner: dict | None = None, stages: str = "[synthesize, teacher]",
               **extra) -> PipelineConfig:
    sets = [f"store={store}", f"base_model={model}", "chunk.max_tokens=48", "progress=false", f"stages={stages}",
            "synthesize.questions_per_round=2", "synthesize.max_new_tokens=16", "teacher.max_new_tokens=8",
            "teacher.topk=4"]
    sets += [f"runner.{k}={v}" for k, v in (runner or {}).items()]
    sets += [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(None, sets)
    return cfg.model_copy(update={"sources": [str(corpus), "synthetic://facts?n=5&seed=3"]})


def catalog_contents(store: Path) -> dict[str, list]:
    """Every row of the data views (sorted) and the manifest's (stage, key, table, rows, checksum)."""
    cat = Catalog(store)
    cat.refresh_views()
    out = {}
    for view, order in VIEWS.items():
        out[view] = [tuple(str(v) for v in r) for r in run_query(cat, f"SELECT * FROM {view} ORDER BY {order}")[1]]
    out["manifest"] = run_query(cat, "SELECT stage, key, table_name, rows, checksum FROM manifest ORDER BY ALL")[1]
    return out


@pytest.fixture(scope="module")
def threads_reference(prefect_server, tmp_path_factory, stub_model_dir, corpus):
    """The pipeline on the default runner (threads): the contents every other runner must reproduce."""
    from flows.pipeline import pipeline_flow

    store = tmp_path_factory.mktemp("threads") / "store"
    t0 = time.perf_counter()
    stats = pipeline_flow(config_for(store, stub_model_dir, corpus))
    seconds = time.perf_counter() - t0
    contents = catalog_contents(store)
    assert stats["teacher"]["written"] == 8 and len(contents["samples"]) == 40  # 5 toy docs x 8 gold QA
    assert {r[3] for r in contents["questions"]} == {"gold"}
    assert any(r[0] == "synthesize" for r in contents["rejects"])  # the stub LLM writes no questions
    print(f"threads pipeline: {seconds:.1f} s")
    return store, stats, contents


# ----------------------------------------------------------------------------------------------- config
def test_runner_config_and_builders():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    cfg = PipelineConfig()
    assert cfg.runner.kind == "threads" and cfg.runner.window(model_bound=True) == 1
    assert isinstance(build_task_runner(cfg.runner), ThreadPoolTaskRunner)
    assert isinstance(build_task_runner(RunnerConfig(kind="processes", workers=2)), ProcessPoolTaskRunner)
    assert RunnerConfig(kind="dask").window(model_bound=True) == 4  # not limited: each worker has its own model
    assert RunnerConfig(kind="dask", model_concurrency=2).window(model_bound=True) == 2
    with pytest.raises(ValueError, match="address"):
        load_config(None, ["runner.address=tcp://10.0.0.1:8786"])  # threads take no address
    with pytest.raises(ValueError):
        load_config(None, ["runner.kind=spark"])

    pytest.importorskip("prefect_dask")
    from prefect_dask import DaskTaskRunner

    local = build_task_runner(load_config(None, ["runner.kind=dask", "runner.workers=3"]).runner)
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs == {"n_workers": 3, "threads_per_worker": 1, "processes": True,
                                    "dashboard_address": None}
    remote = build_task_runner(RunnerConfig(kind="dask", address="tcp://scheduler:8786"))
    assert remote.address == "tcp://scheduler:8786" and not remote.cluster_kwargs


def test_ray_runner_builds():
    pytest.importorskip("prefect_ray")
    from prefect_ray import RayTaskRunner

    local = build_task_runner(RunnerConfig(kind="ray", workers=2))
    assert isinstance(local, RayTaskRunner) and local.address is None
    assert local.init_kwargs["num_cpus"] == 2 and local.init_kwargs["include_dashboard"] is False
    remote = build_task_runner(RunnerConfig(kind="ray", address="ray://head:10001"))
    assert remote.address == "ray://head:10001" and "num_cpus" not in remote.init_kwargs


# ----------------------------------------------------------------------------------------------- units
def test_run_units_window_skips_and_failures(prefect_server):
    """At most `max_in_flight` units run at once; skipped units are counted; a failing unit does not stop the
    others, whose results all reach `done` before UnitsFailed names the failure."""
    import threading

    from prefect import task

    lock = threading.Lock()
    running, peak = [0], [0]

    @task
    def unit(x: int) -> dict:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        if x == 3:
            raise RuntimeError("unit 3 is broken")
        return {"x": x}

    stats: dict = {}
    got = []
    with pytest.raises(UnitsFailed, match=r"1 of 8 units failed.*unit 3 is broken") as err:
        run_units(RunnerConfig(workers=4, max_in_flight=2), unit, list(range(10)),
                  lambda x: "done_before" if x >= 8 else {"x": x}, lambda x, res: got.append(res["x"]),
                  stats=stats, stage="test", progress=False)
    assert sorted(got) == [0, 1, 2, 4, 5, 6, 7] and stats == {"done_before": 2, "failed": 1}
    assert peak[0] <= 2 and err.value.failures[0][0] == 3


def test_failed_unit_keeps_the_others_and_rerun_finishes(prefect_server, tmp_path, stub_model_dir, corpus,
                                                         monkeypatch):
    """A unit that raises fails the stage only after every other unit is registered; a rerun does the rest."""
    import tasks.ingest as ingest_tasks
    from flows.ingest import ingest_flow

    real = ingest_tasks.read_unit

    def flaky(unit, cfg):
        if unit.source.endswith("doc03.txt"):
            raise OSError("disk on fire")
        return real(unit, cfg)

    monkeypatch.setattr(ingest_tasks, "read_unit", flaky)
    cfg = config_for(tmp_path / "store", stub_model_dir, corpus, stages="[]")
    with pytest.raises(UnitsFailed, match="1 of 8 units failed"):
        ingest_flow(cfg)
    cat = Catalog(cfg.store)
    assert run_query(cat, "SELECT count(*) FROM manifest WHERE table_name = 'documents'")[1] == [(7,)]
    assert run_query(cat, "SELECT status, stats::JSON->>'failed' FROM runs")[1] == [("failed", "1")]
    monkeypatch.setattr(ingest_tasks, "read_unit", real)
    again = ingest_flow(cfg)
    assert again["written"] == 1 and again["done_before"] == 7


# ----------------------------------------------------------------------------------------------- engines
def test_dask_local_cluster_gives_the_same_catalog_as_threads(threads_reference, tmp_path, stub_model_dir, corpus):
    """ingest -> chunk -> synthesize -> teacher on a real Dask LocalCluster (2 worker processes, 1 thread
    each): the same rows in every view and the same shards (keys, row counts, checksums) as on threads."""
    pytest.importorskip("prefect_dask")
    from flows.pipeline import pipeline_flow

    _, ref_stats, expected = threads_reference
    cfg = config_for(tmp_path / "store", stub_model_dir, corpus, runner={"kind": "dask", "workers": 2})
    t0 = time.perf_counter()
    stats = pipeline_flow(cfg)
    print(f"dask pipeline (LocalCluster, 2 workers): {time.perf_counter() - t0:.1f} s")
    for stage in ("ingest", "chunk", "synthesize", "teacher"):
        drop = ("scan_id", "seconds")
        assert {k: v for k, v in stats[stage].items() if k not in drop} == \
            {k: v for k, v in ref_stats[stage].items() if k not in drop}, stage
    assert catalog_contents(tmp_path / "store") == expected
    # the units ran as task runs of their stage's flow run, reported from the workers to the API
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cat = Catalog(tmp_path / "store")
    for stage in ("ingest", "chunk", "synthesize", "teacher"):
        run_id = run_query(cat, f"SELECT run_id FROM runs WHERE flow = '{stage}'")[1][0][0]
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
        units = [r for r in runs if r.name.startswith(f"{stage} ") or r.name.startswith(f"{stage}-")]
        assert len(units) == 8 and all(r.state.is_completed() for r in units), (stage, [r.name for r in runs])
    again = pipeline_flow(cfg)  # a rerun does nothing, and starts no cluster
    assert all(again[s]["written"] == 0 for s in ("ingest", "chunk", "synthesize", "teacher"))


def test_dask_existing_scheduler_address(prefect_server, tmp_path, stub_model_dir, corpus, threads_reference):
    """`runner.address`: the units go to a scheduler someone else started (its worker is another process)."""
    pytest.importorskip("prefect_dask")
    from distributed import LocalCluster

    from flows.ingest import ingest_flow

    cfg = config_for(tmp_path / "store", stub_model_dir, corpus, stages="[]")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        cfg = cfg.model_copy(update={"runner": RunnerConfig(kind="dask", address=cluster.scheduler_address)})
        stats = ingest_flow(cfg)
    assert stats["written"] == 8
    assert catalog_contents(tmp_path / "store")["documents"] == threads_reference[2]["documents"]


@pytest.mark.slow
def test_ray_local_runtime_gives_the_same_catalog_as_threads(threads_reference, tmp_path, stub_model_dir, corpus):
    """The same pipeline on a real local Ray runtime (2 CPUs)."""
    pytest.importorskip("prefect_ray")
    from flows.pipeline import pipeline_flow

    cfg = config_for(tmp_path / "store", stub_model_dir, corpus, runner={"kind": "ray", "workers": 2})
    t0 = time.perf_counter()
    pipeline_flow(cfg)
    print(f"ray pipeline (local runtime, 2 CPUs): {time.perf_counter() - t0:.1f} s")
    assert catalog_contents(tmp_path / "store") == threads_reference[2]


@pytest.mark.slow
def test_process_pool_gives_the_same_catalog_as_threads(threads_reference, tmp_path, stub_model_dir, corpus):
    from flows.pipeline import pipeline_flow

    cfg = config_for(tmp_path / "store", stub_model_dir, corpus, runner={"kind": "processes", "workers": 2})
    t0 = time.perf_counter()
    pipeline_flow(cfg)
    print(f"process-pool pipeline (2 processes): {time.perf_counter() - t0:.1f} s")
    assert catalog_contents(tmp_path / "store") == threads_reference[2]
