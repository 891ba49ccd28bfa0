"""Data-parallel training of the hypernetwork over ``torch.distributed`` (torchrun or accelerate launch).

Launch (see docs/scaling.md)::

    torchrun --nproc_per_node 2 -m flows.train_ddp --set train.optim.total_steps=2000      # CPU: gloo
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint head:29500 -m flows.train_ddp   # GPUs: NCCL
    accelerate launch --num_processes 2 -m flows.train_ddp                                  # same env://

Both launchers set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; `init_from_env` joins the
process group (NCCL when CUDA is available, else gloo; `D2L_DIST_BACKEND` overrides).

What every rank does (``model/training/loop.py`` with a ``DistContext``):

- it builds the SAME global micro-batch as a single process would (the data order and chunk draws are pure
  functions of the seed and the micro-batch index), then keeps its share of it (``shard_batch``): whole
  contexts (a context's rows share one generated adapter), balanced by row count;
- its loss is its exact share of the single-process loss: each row's per-answer loss is weighted by
  ``1 / (answers of its document in the global micro-batch x documents in it)`` (the loss averages per
  answer, then per document), and the L1 term by its share of the generated pieces. The shares add up to
  the single-process loss, so the SUM of the ranks' gradients is the single-process gradient;
- after the ``grad_accum`` micro-batches, one all-reduce (sum) of the flattened gradients and one of the
  step's statistics; then every rank clips and steps identically, so the replicas stay equal (a mismatch
  in the training rows or the starting checkpoint is detected and refused before the first step);
- only rank 0 evaluates, writes checkpoints, ``metrics.jsonl`` and (through the caller) the catalog; a
  resume loads the checkpoint rank 0 chose, on every rank.

No Prefect and no storage here: ``model`` stays a plain torch library.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from model.training.loss import LossParts

__all__ = ["DistContext", "Shard", "all_reduce_step", "current", "init_from_env", "launched", "rows_digest",
           "shard_batch", "shard_loss", "shutdown"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """Where this rank's models go: its own GPU under NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    # -- collectives (no-ops in a single process) ------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (picklable, small)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_same(self, value: Any, what: str) -> None:
        """Raise on every rank (not just the odd one: nobody is left waiting) unless all ranks have `value`."""
        if not self.enabled:
            return
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        if any(v != values[0] for v in values):
            raise RuntimeError(f"data-parallel ranks disagree on {what}: {values} (every rank must see the same "
                               "store and configuration)")

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (they should already be equal; this makes sure)."""
        if not self.enabled:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, src=0)


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process?"""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def current() -> DistContext:
    """The context of the process group this process has joined (single-process when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=str(dist.get_backend()))


def init_from_env(backend: str | None = None, timeout_minutes: float = 60.0) -> DistContext:
    """Join the process group the launcher describes in the environment (no-op without one).

    Backend: `backend`, else $D2L_DIST_BACKEND, else NCCL when CUDA is available, else gloo. The timeout
    bounds how long ranks wait for each other (rank 0 evaluates and checkpoints while the others wait)."""
    if not launched():
        return DistContext()
    if not dist.is_initialized():
        backend = backend or os.environ.get("D2L_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return current()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- data
def rows_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    """A cheap fingerprint of the training rows (ids, lengths, answer spans), to compare across ranks."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps([r.get("sample_id"), str(r.get("doc_id")), len(r["student_ids"]), int(r["answer_start"]),
                             int(r["n_answer_tokens"]), int(r["topk"])]).encode())
    return h.hexdigest()[:16]


@dataclass
class Shard:
    """One rank's part of a global micro-batch and the weights that make its loss its exact share."""

    tb: Any  # model.training.data.TrainBatch of the rank's rows and their contexts' pieces
    row_weight: Tensor  # [rows] weight of each row's per-answer loss
    l1_share: float  # the rank's pieces / all pieces of the micro-batch


def assign_contexts(rows_per_context: Sequence[int], world_size: int) -> list[int]:
    """Rank of each context: largest first to the least-loaded rank (ties: lower rank). Deterministic."""
    load = [0] * world_size
    owner = [0] * len(rows_per_context)
    for c in sorted(range(len(rows_per_context)), key=lambda c: (-rows_per_context[c], c)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        owner[c] = r
        load[r] += rows_per_context[c]
    return owner


def _select_batch(batch: Mapping[str, Any], rows: list[int]) -> dict[str, Any]:
    """The collated batch restricted to `rows`, with the padding trimmed to those rows."""
    idx = torch.tensor(rows, dtype=torch.long)
    t_max = int(batch["attention_mask"][idx].sum(1).max())
    n_max = max(1, int(batch["answer_mask"][idx].sum(1).max()))
    old_docs = batch["doc_index"][idx].tolist()
    docs = list(dict.fromkeys(old_docs))
    return {
        "student_ids": batch["student_ids"][idx, :t_max],
        "attention_mask": batch["attention_mask"][idx, :t_max],
        "answer_start": batch["answer_start"][idx],
        "n_answer": batch["n_answer"][idx],
        "topk_ids": batch["topk_ids"][idx, :n_max],
        "topk_logprobs": batch["topk_logprobs"][idx, :n_max],
        "answer_mask": batch["answer_mask"][idx, :n_max],
        "doc_index": torch.tensor([docs.index(d) for d in old_docs], dtype=torch.long),
        "doc_ids": [batch["doc_ids"][d] for d in docs],
        "sample_ids": [batch["sample_ids"][i] for i in rows],
    }


def shard_batch(tb: Any, rank: int, world_size: int) -> Shard | None:
    """This rank's share of a global micro-batch (None when it gets no context this time)."""
    from model.training.data import TrainBatch

    b = tb.batch
    row_context = tb.row_context.tolist()
    n_ctx = len(tb.chunks_per_context)
    rows_per_context = [row_context.count(c) for c in range(n_ctx)]
    owner = assign_contexts(rows_per_context, world_size)
    mine = [c for c in range(n_ctx) if owner[c] == rank]
    if not mine:
        return None
    rows = [i for i, c in enumerate(row_context) if owner[c] == rank]
    starts = [0]
    for n in tb.chunks_per_context:
        starts.append(starts[-1] + n)
    chunks = [tb.chunks[j] for c in mine for j in range(starts[c], starts[c + 1])]
    local_ctx = {c: k for k, c in enumerate(mine)}
    sub = TrainBatch(
        batch=_select_batch(b, rows),
        chunks=chunks,
        chunks_per_context=[tb.chunks_per_context[c] for c in mine],
        row_context=torch.tensor([local_ctx[row_context[i]] for i in rows], dtype=torch.long),
        epoch=tb.epoch,
    )
    # the single-process loss: mean over documents of the mean over the document's answered rows
    valid = (b["answer_mask"].sum(1) > 0).float()
    doc_index = b["doc_index"]
    n_docs = int(doc_index.max()) + 1
    doc_rows = torch.zeros(n_docs).index_add(0, doc_index, valid)
    docs_with_rows = int((doc_rows > 0).sum())
    idx = torch.tensor(rows, dtype=torch.long)
    weight = valid[idx] / (doc_rows[doc_index[idx]].clamp(min=1) * max(1, docs_with_rows))
    return Shard(sub, weight, len(chunks) / max(1, len(tb.chunks)))


def shard_loss(parts: LossParts, shard: Shard, l1_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, distill, l1): this rank's exact share of the micro-batch's single-process values."""
    distill = (parts.per_answer * shard.row_weight.to(parts.per_answer.device)).sum()
    l1 = parts.l1 * shard.l1_share
    return distill + l1_weight * l1, distill, l1


def all_reduce_step(params: Sequence[torch.nn.Parameter], stats: Sequence[float]) -> list[float]:
    """Sum every rank's gradients (one flat all-reduce; a rank that had no rows adds zeros) and the step's
    statistics; returns the summed statistics."""
    flats = []
    for p in params:
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        flats.append(g.reshape(-1))
    flat = torch.cat(flats) if flats else torch.zeros(0)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        chunk = flat[offset: offset + n].view_as(p)
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.copy_(chunk)
        offset += n
    device = flat.device
    totals = torch.tensor(list(stats), dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return [float(x) for x in totals.tolist()]
