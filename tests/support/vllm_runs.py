"""What the tests against a real vLLM server share: a short document, the config of a pipeline whose
generators are OpenAI-compatible servers."""

from __future__ import annotations

from flows.config import PipelineConfig
from storage.catalog import Catalog
from storage.sql import run_query

SHORT_DOC = ("# Lanterns of Veldmoor\n\nThe town of Veldmoor lights three hundred copper lanterns every evening. "
             "The lanterns were made by a smith named Odile in the year 1820. They burn olive oil.\n")
TOY = "synthetic://facts?n=1&seed=5"  # one toy-world document with 8 gold questions


def openai_generator(url: str, model: str, **more) -> dict:
    return {"backend": "openai", "base_urls": [url], "model": model, **more}


def make_config(store, model_dir, sources, synth_gen=None, teacher_gen=None, **sections) -> PipelineConfig:
    tree = {"store": str(store), "base_model": str(model_dir), "progress": False, "sources": list(sources),
            "stages": ["synthesize", "teacher"],  # the data stages under test; training is tested elsewhere
            "chunk": {"max_tokens": 200},
            "synthesize": {"questions_per_round": 2, "max_new_tokens": 64},
            "teacher": {"max_new_tokens": 32, "topk": 16}}
    for name, value in sections.items():
        tree.setdefault(name, {}).update(value)
    if synth_gen:
        tree["synthesize"]["generator"] = synth_gen
    if teacher_gen:
        tree["teacher"]["generator"] = teacher_gen
    return PipelineConfig.model_validate(tree)


def rows(cat: Catalog, sql: str) -> list[tuple]:
    return run_query(cat, sql)[1]


def check_server(server) -> None:
    assert server.alive(), f"the vLLM server died; log tail:\n{server.log_tail()}"
