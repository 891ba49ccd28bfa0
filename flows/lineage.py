"""Which unit feeds which: every stage's key is derived from its upstream unit's key, so the chain of
keys for one documents shard can be recomputed at any time from the manifest and the config."""

from __future__ import annotations

from dataclasses import dataclass

from flows.config import PipelineConfig
from tasks.chunk import chunk_key
from tasks.common import Manifest, ShardEntry, Store
from tasks.synthesize import synth_key
from tasks.teacher import teacher_key


@dataclass
class Lineage:
    documents: ShardEntry
    chunk_key: str
    synth_key: str
    teacher_key: str

    def entry(self, manifest: Manifest, stage: str, table: str) -> ShardEntry | None:
        key = {"chunk": self.chunk_key, "synthesize": self.synth_key, "teacher": self.teacher_key}[stage]
        return next((e for e in manifest.get((stage, key), []) if e.table == table), None)


def lineages(manifest: Manifest, config: PipelineConfig, tokenizer_fp: str, question_gen_id: str,
             teacher_id: str) -> list[Lineage]:
    """One chain of keys per ingested documents shard, in a stable order."""
    docs = sorted((e for entries in manifest.values() for e in entries if e.table == "documents"),
                  key=lambda e: e.path)
    out = []
    for d in docs:
        ck = chunk_key(d.key, tokenizer_fp, config.chunk)
        sk = synth_key(ck, question_gen_id, config.synthesize)
        out.append(Lineage(d, ck, sk, teacher_key(sk, ck, teacher_id, config.teacher)))
    return out


def unit_labels(store: Store) -> dict[str, str]:
    """Ingest unit key -> the source it was read from (for task run names: `teacher` followed by the source file)."""
    if not store.catalog.path.exists():
        return {}
    with store.catalog.read() as con:
        rows = con.execute("SELECT unit_key, min(source) FROM source_scans GROUP BY 1").fetchall()
    return {k: (s if len(s) <= 80 else "..." + s[-77:]) for k, s in rows}


def current_lineages(config: PipelineConfig, store_root: str) -> tuple[str, Manifest, list[Lineage]]:
    """Resolve the base model, read the manifest, and derive every chain of keys for this config."""
    from tasks.chunk import tokenizer_id
    from tasks.generation import generator_identity
    from tasks.models import resolve_model

    model_dir = resolve_model(config.base_model, store_root)
    manifest = Store(store_root).catalog.manifest()
    chains = lineages(manifest, config, tokenizer_id(model_dir),
                      generator_identity(config.synthesize.generator, model_dir),
                      generator_identity(config.teacher.generator, model_dir))
    return model_dir, manifest, chains
