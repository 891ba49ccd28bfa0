"""The toy world: made-up fact documents with gold question/answer pairs (the project's CPU benchmark).

A document states facts such as "the color of zorb is teal ." about a few entities; each question needs
both the entity and the relation ("what is the color of zorb ?" -> "teal"). Values are drawn per
document, so a model can only answer from the document. Pure Python, deterministic for a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

RELATIONS: dict[str, list[str]] = {
    "color": ["red", "blue", "green", "teal", "amber", "violet", "black", "white", "grey", "pink"],
    "shape": ["round", "square", "flat", "oval", "long", "curved", "spiky", "hollow", "thin", "wide"],
    "food": ["rice", "plums", "bread", "beans", "figs", "corn", "nuts", "kelp", "pears", "oats"],
    "home": ["cave", "tower", "swamp", "hill", "lake", "forest", "cliff", "meadow", "dune", "island"],
}

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["b", "d", "g", "k", "m", "n", "p", "r", "t", "x", "z"]


def entity_names(pool: int, seed: int = 1234) -> list[str]:
    """`pool` distinct made-up names (consonant-vowel-consonant), fixed for a seed."""
    rng = random.Random(seed)
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < pool:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) + rng.choice(_VOWELS)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


@dataclass(frozen=True)
class ToyWorldConfig:
    """Shape of the generated world."""

    pool: int = 32  # distinct entity names (a small pool trains much faster)
    entities_per_doc: int = 4
    relations_per_entity: int = 2
    name_seed: int = 1234  # the entity pool is fixed across document seeds
    # True: every entity of a document gets the same relations (drawn once per document), so a question's
    # relation alone never tells its answer apart from the document's other values (training mixes only)
    shared_relations: bool = False


@dataclass
class ToyDocument:
    text: str
    facts: list[tuple[str, str, str]]  # (entity, relation, value)
    qa: list[dict[str, str]] = field(default_factory=list)


def fact_sentence(entity: str, relation: str, value: str) -> str:
    return f"the {relation} of {entity} is {value} ."


def question_for(entity: str, relation: str) -> str:
    return f"what is the {relation} of {entity} ?"


def make_document(rng: random.Random, cfg: ToyWorldConfig) -> ToyDocument:
    """One document: `entities_per_doc` entities, each with `relations_per_entity` facts, in random order."""
    names = entity_names(cfg.pool, cfg.name_seed)
    if cfg.entities_per_doc > len(names):
        raise ValueError(f"entities_per_doc={cfg.entities_per_doc} exceeds the pool of {len(names)}")
    if cfg.relations_per_entity > len(RELATIONS):
        raise ValueError(f"relations_per_entity={cfg.relations_per_entity} exceeds {len(RELATIONS)} relations")
    facts = []
    shared = rng.sample(sorted(RELATIONS), cfg.relations_per_entity) if cfg.shared_relations else None
    for entity in rng.sample(names, cfg.entities_per_doc):
        for relation in shared or rng.sample(sorted(RELATIONS), cfg.relations_per_entity):
            facts.append((entity, relation, rng.choice(RELATIONS[relation])))
    rng.shuffle(facts)
    text = " ".join(fact_sentence(*f) for f in facts)
    qa = [{"question": question_for(e, r), "answer": v} for e, r, v in facts]
    return ToyDocument(text=text, facts=facts, qa=qa)


def generate(n: int, seed: int = 0, cfg: ToyWorldConfig | None = None) -> list[ToyDocument]:
    """`n` documents, deterministic for (`seed`, `cfg`)."""
    cfg = cfg or ToyWorldConfig()
    rng = random.Random(seed)
    return [make_document(rng, cfg) for _ in range(n)]


def vocabulary(cfg: ToyWorldConfig | None = None) -> list[str]:
    """Every word the toy world can produce, for building a word-level tokenizer."""
    cfg = cfg or ToyWorldConfig()
    words = {"the", "of", "is", "what", "?", "."}
    words.update(RELATIONS)
    for values in RELATIONS.values():
        words.update(values)
    words.update(entity_names(cfg.pool, cfg.name_seed))
    return sorted(words)


def max_pool() -> int:
    """How many distinct entity names the world can make."""
    return len(_ONSETS) * len(_VOWELS) ** 2 * len(_CODAS)


SYNTHETIC_DEFAULTS = {"n": 100, "seed": 0, "entities": 4, "relations": 2, "pool": 32, "name_seed": 1234}


def _check_spec(p: dict[str, int]) -> str:
    """'' when synthetic://facts parameters make a world, else the problem."""
    return ("n must be at least 1" if p["n"] < 1 else
            f"relations must be 1..{len(RELATIONS)}" if not 1 <= p["relations"] <= len(RELATIONS) else
            f"pool must be 1..{max_pool()}" if not 1 <= p["pool"] <= max_pool() else
            "entities must be 1..pool" if not 1 <= p["entities"] <= p["pool"] else "")


def _spec_documents(p: dict[str, int]):
    """The documents of a checked synthetic://facts spec, as storage's SyntheticDocument."""
    from storage.synthetic import SyntheticDocument

    world = ToyWorldConfig(pool=p["pool"], entities_per_doc=p["entities"], relations_per_entity=p["relations"],
                           name_seed=p["name_seed"])
    for doc in generate(p["n"], p["seed"], world):
        yield SyntheticDocument(doc.text, gold_qa=doc.qa, meta={"facts": [list(f) for f in doc.facts]})


def synthetic_world():
    """The toy world as the `synthetic://facts?n=..&seed=..&entities=..&relations=..&pool=..&name_seed=..`
    source of the ingest stage."""
    from storage.synthetic import SyntheticWorld

    return SyntheticWorld("facts", dict(SYNTHETIC_DEFAULTS), _check_spec, _spec_documents)
