"""The toy benchmark's sizes: one ``Profile`` per run (``FULL`` is ``d2l bench toy``'s, ``SMOKE`` the tests').

Each field comments what it was measured against where it was chosen by measurement (docs/evaluation.md has
the runs); ``model/toy/bench.py --help`` lists every scalar field as a flag.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Profile:
    """Every size of one benchmark run (the full run and the smoke run differ only here)."""

    toy_steps: int | None = None  # None: the toy model's default (ToyTrainConfig)
    toy: dict = dataclasses.field(default_factory=dict)  # other ToyTrainConfig overrides ({}: the default model)
    docs: int = 4000  # toy documents generated (train + held out)
    held_out: float = 0.05
    topk: int = 8
    # hypernetwork optimizer steps: the stated training budget (~14 min of the benchmark's ~15 on 2 idle cores).
    # 15,000 -> 22,000 on seeds 0/7/1: D2L EM 0.956/0.961/0.954 -> 0.976/0.969/0.968, long 4x/1x up on each;
    # 22,000 -> 30,000 (2 threads): the one run of six below 0.8 on long 4x/1x and the needle (seed 0:
    # 0.774 / 0.775) went to 0.944 / 0.950
    steps: int = 30000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    # LFM2's MLP down projection (the reference's down_proj). Adding w1/w3 stopped learning altogether: two
    # facts per document went from 97% top-1 agreement after 300 steps (w2 only) to chance (w1, w3, w2)
    targets: tuple[str, ...] = ("w2",)
    rank: int = 8
    layers: int | None = None  # HyperConfig.layers: None = every layer of the toy model, N = the first N
    latent_dim: int = 128
    latent_count: int = 8  # = target kinds x rank: with rank_slots each latent is one rank slot
    depth: int = 2
    heads: int = 1
    feature_positions: str = "none"  # HyperConfig.feature_positions
    feature_source: str = "output"  # HyperConfig.feature_source: block 0's input is the bare embeddings
    slot_attention: bool = False  # HyperConfig.slot_attention
    # HyperConfig.latent_regions: rank slot i starts looking at the i-th eighth of the chunk. Without it the
    # slots pick tokens by content, each gathers every fact of "its" relation, and the adapter learns which
    # values a relation has but not whose they are (docs/evaluation.md, "binding"): 0.535 -> 0.651 at 3,000 steps
    latent_regions: float = 0.35
    rank_slots: bool = True  # HyperConfig.rank_slots (the reference's decoder did not learn 4+ facts here)
    scale_b_init: float = 0.1  # HyperConfig.scale_b_init (0: the reference's exactly-zero start)
    scale_b_zero_fraction: float = 0.0  # HyperConfig.scale_b_zero_fraction (0.5: half of B's slots start at 0)
    # HyperConfig.alpha, the direct scale on B @ A (0: its default 2 * rank ** 1.5 = 45.25). Under Adam the update
    # moves ~alpha x lr per step: 45.25 -> 8 -> 2 each learned faster at 3,000 steps; 8 won at 12,000
    alpha: float = 8.0
    min_lr_ratio: float = 0.05  # the cosine's floor as a fraction of lr (1: constant after the warmup)
    # extra training documents, (entities, relations per entity[, 1 = the same relations for every entity])
    # each, prof.docs of every kind; evaluation stays on the world's own documents. () = none. The default adds
    # 4,000 documents of 4 entities sharing one relation: there only binding a value to its entity lowers the
    # loss (0.651 -> 0.745 at 3,000 steps with latent_regions; 0.535 -> 0.671 without)
    train_mix: tuple[tuple[int, ...], ...] = ((4, 1, 1),)
    multi_chunk: bool = False  # single-chunk training: multi-chunk (the reference's mix) learned slower here
    chunk_dist: dict | None = None  # TrainConfig.chunk_dist (pieces per context -> probability); None: its default
    # TrainConfig.context_groups / _from: from 20% of the steps on, 2 or 4 documents of a batch share one merged
    # adapter (a 2x/4x document's condition); seed 0: long 4x/1x 0.588 -> 0.890, needle 0.600 -> 0.850
    context_groups: dict | None = dataclasses.field(default_factory=lambda: {1: 1.0, 2: 1.0, 4: 2.0})
    context_groups_from: float = 0.2
    # L1 on the generated A and B (HyperConfig's default: 0.1). At 0.1 the penalty shrank the generated
    # update ~40x within 500 steps, before the context signal was learned
    l1_weight: float = 0.0
    # TrainConfig.rows_per_context: questions of one document per batch, encoded once; 8 = all of a toy
    # document's questions: the same learning per step as 32 documents x 1, at ~1/3 of the step's time
    rows_per_context: int = 8
    eval_docs: int = 128
    cd_docs: int = 32
    cd_steps: int = 300
    cd_lr: float = 5e-3
    long_factors: tuple[int, ...] = (1, 2, 4, 8)
    long_docs: int = 16
    needle_factor: int = 4
    needle_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    needle_docs: int = 8
    eval_every: int = 1000


FULL = Profile()
SMOKE = Profile(toy_steps=60, toy={"batch_size": 16, "eval_docs": 8, "hidden_size": 64, "intermediate_size": 128},
                docs=240, held_out=0.1, steps=30, warmup=5, batch_size=16,
                latent_dim=32, latent_count=8, heads=2, depth=1, eval_docs=6, cd_docs=2, cd_steps=20, long_factors=(1, 2),
                long_docs=2, needle_factor=2, needle_depths=(0.0, 1.0), needle_docs=2, eval_every=0)
