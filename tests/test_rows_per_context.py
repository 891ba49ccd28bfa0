"""TrainConfig.rows_per_context: batches of several questions per document, each document encoded once."""

from __future__ import annotations

from collections import Counter

import pytest

from model.training.config import TrainConfig
from model.training.data import DataOrder, epoch_batches


def test_grouped_batches_cover_every_row_once_with_whole_units_per_context():
    groups = [f"d{i // 8}" for i in range(8 * 12)]  # 12 documents x 8 questions
    batches = epoch_batches([5] * len(groups), 8, seed=3, epoch=0, groups=groups, rows_per_context=4)
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))
    for b in batches:
        assert len(b) == 8
        assert sorted(Counter(groups[i] for i in b).values()) in ([4, 4], [8])  # two units (maybe of one doc)
    again = epoch_batches([5] * len(groups), 8, seed=3, epoch=0, groups=groups, rows_per_context=4)
    other = epoch_batches([5] * len(groups), 8, seed=3, epoch=1, groups=groups, rows_per_context=4)
    assert again == batches and other != batches  # a pure function of (seed, epoch)


def test_grouped_order_packs_uneven_documents_and_plain_order_is_unchanged():
    groups = ["a"] * 3 + ["b"] * 5 + ["c"] * 2
    order = DataOrder([4] * 10, 4, seed=0, groups=groups, rows_per_context=2)
    seen = [i for m in range(order.batches_per_epoch) for i in order(m)[1]]
    assert sorted(seen) == list(range(10))
    plain = epoch_batches([4] * 10, 4, seed=0, epoch=0)
    assert plain == epoch_batches([4] * 10, 4, seed=0, epoch=0, groups=groups, rows_per_context=1)
    with pytest.raises(ValueError, match="rows_per_context"):
        TrainConfig(rows_per_context=0)
    assert "rows_per_context" in TrainConfig().result_dict()


def test_epochs_with_different_batch_counts_map_every_micro_batch():
    """Documents of 4 and of 8 questions, all of a document's questions in one unit: greedy packing into 12-row batches gives
    some epochs more batches than others. Every micro-batch still maps to a batch (the run that stopped at
    step 2,000 with an IndexError), each epoch covers every row once, and a fresh order asked for a late
    micro-batch first (a resumed run) gives the same batch as one that walked there."""
    groups = [f"s{i // 4}" for i in range(4 * 30)] + [f"l{i // 8}" for i in range(8 * 30)]
    kw = dict(groups=groups, rows_per_context=8, seed=1)
    counts = {len(epoch_batches([5] * len(groups), 12, epoch=e, **kw)) for e in range(20)}
    assert len(counts) > 1  # the case itself: batch counts differ between epochs
    walk = DataOrder([5] * len(groups), 12, **kw)
    total = sum(len(epoch_batches([5] * len(groups), 12, epoch=e, **kw)) for e in range(20))
    seen: dict[int, list[int]] = {}
    for m in range(total):
        epoch, rows = walk(m)
        seen.setdefault(epoch, []).extend(rows)
    assert sorted(seen) == list(range(20))
    assert all(sorted(rows) == list(range(len(groups))) for rows in seen.values())
    fresh = DataOrder([5] * len(groups), 12, **kw)
    assert fresh(total - 1) == walk(total - 1) and fresh.epoch_of(total - 1) == 19
