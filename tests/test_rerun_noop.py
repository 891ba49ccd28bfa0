"""`make run` twice, on a small config: the second run writes nothing at all (no shard, no checkpoint, the
demo adapter, training.png and metrics.jsonl untouched) and its summary says so."""

from __future__ import annotations

import pytest

from flows.config import load_config
from flows.pipeline import pipeline_flow
from flows.summary import print_pipeline_summary

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HYPER = "{target_modules: [w2], rank: 2, latent_dim: 16, latent_count: 2, depth: 1, heads: 1}"


def files(store) -> dict[str, tuple[int, int]]:
    """Every file under the store except the catalog, its read replica and its locks (they record the run itself): (mtime_ns, size)."""
    return {str(p.relative_to(store)): (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*")
            if p.is_file() and not p.name.startswith(("catalog.", "catalog-replica.", "writer.lock"))}


def summary_text(stats, capsys) -> str:
    capsys.readouterr()
    print_pipeline_summary(stats)
    return capsys.readouterr().out


def test_second_run_writes_nothing(prefect_server, tmp_path, toy_model_dir, capsys):
    store = tmp_path / "store"
    doc = tmp_path / "demo.md"
    doc.write_text("the color of zorb is teal . the size of blick is small .")
    sets = [f"store={store}", f"base_model={toy_model_dir}", "progress=false", "stages=[synthesize,teacher,train]",
            "synthesize.questions_per_round=2", "synthesize.max_new_tokens=12", "teacher.topk=8",
            "teacher.max_new_tokens=6", "chunk.max_tokens=64", f"demo_document={doc}", "train.name=demo",
            f"train.hyper={HYPER}", "train.optim={total_steps: 3, warmup_steps: 1, batch_size: 2, eval_every: 0, "
            "checkpoint_every: 0, eval_batches: 1}"]
    cfg = load_config(None, sets).model_copy(update={"sources": ["synthetic://facts?n=2&seed=1"]})
    first = pipeline_flow(cfg)
    assert first["train"]["steps"] == 3 and first["adapter"]["written"]
    run = store / "hypernets" / "demo"
    watched = [run / "training.png", run / "metrics.jsonl", store / "adapters" / "demo" / "adapter_model.safetensors"]
    assert all(p.exists() for p in watched)
    before = files(store)

    second = pipeline_flow(cfg)
    assert files(store) == before  # nothing written, nothing touched
    for stage in ("ingest", "chunk", "synthesize", "teacher"):
        assert second[stage]["written"] == 0, (stage, second[stage])
    assert second["train"]["resumed_from"] == 3 and second["adapter"]["written"] is False

    text = summary_text(second, capsys)
    row = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
           for line in text.splitlines() if line.count("│") >= 4}
    assert row["train"] == ["3 steps", "0 steps"] and row["adapter"] == ["1", "0"], text
    assert all(row[s][1] == "0" for s in ("ingest", "chunk", "synthesize", "teacher")), text
    # the commands to paste are whole lines, outside any table
    asks = [line for line in text.splitlines() if line.startswith("d2l ask --adapter ")]
    assert asks == [f'd2l ask --adapter {store / "adapters" / "demo"} "How is the hypernetwork trained?"']
    assert any(line.startswith('d2l sql "SELECT') and line.endswith(f"--store {store}") for line in text.splitlines())
    assert "it has not learned enough to answer from the document" in text
