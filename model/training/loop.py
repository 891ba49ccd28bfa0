"""The hypernetwork's training loop: frozen base model, AdamW on the hypernetwork, exact resume.

One optimizer step = ``grad_accum`` micro-batches. For each micro-batch:

1. the rows' contexts are split into their drawn number of pieces (``TrainConfig.chunk_dist``), each
   piece wrapped in the user-turn affixes (``model/training/data.py``);
2. the frozen base model encodes the pieces (``ContextEncoder``, no grad); the hypernetwork writes one
   LoRA per piece; ``merge_chunks`` concatenates each context's piece LoRAs (``merge``: "concat" sums the
   updates, "mean" scales each by 1/n) and appends the bias LoRA;
3. the student (the base model with each row's merged adapter, question-only prompt) is scored on the
   answer tokens against the teacher's top-k (``distill_loss``: per answer, then per document, + L1 on
   the generated A and B); gradients reach only the hypernetwork.

Then gradient clipping, AdamW (weight decay on weight matrices only), the warmup + cosine schedule.
bf16 autocast wraps the forward passes only when the base model is on CUDA.

Files under ``out_dir``: model/training/run_folder.py. The forward pass and loss of one micro-batch:
model/training/forward.py; held-out metrics: model/training/held_out.py.

Resume: the newest checkpoint restores the hypernetwork, AdamW moments, the scheduler and the RNG
states; the data order and chunk draws are pure functions of (seed, epoch, micro-batch index), so the
resumed run computes exactly what an uninterrupted run computes (bit-identical on the same device and
thread count). ``metrics.jsonl`` is truncated to the checkpoint's step; rows after it are produced again
(with the same values except timings), so a consumer should upsert metrics by (kind, step).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.hypernet.config import HyperConfig
from model.hypernet.encoder import ContextEncoder
from model.hypernet.lora import freeze
from model.hypernet.network import HyperNetwork
from model.training import data as td
from model.training import run_folder as rf
from model.training.checkpoint import load_checkpoint
from model.training.config import TrainConfig
from model.training.distributed import DistContext, all_reduce_step, rows_digest, shard_batch, shard_loss
from model.training.distributed import current as current_dist
from model.training.forward import compact_logits_agree, forward_loss
from model.training.held_out import evaluate
from model.training.run_folder import latest_checkpoint
from storage.fsutil import atomic_write

__all__ = ["Run", "build_optimizer", "latest_checkpoint", "lr_factor", "optimizer_step", "prepare", "train"]


# ----------------------------------------------------------------------------------------------- optim
def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the optimizer step that follows `step` completed steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _no_decay(name: str, p: nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        p.ndim < 2
        or "norm" in name
        or name.startswith(("scale_A", "scale_B"))
        or leaf in ("b1", "b2", "bias")
        or name in ("latents", "layer_emb", "queries")
    )


def build_optimizer(net: nn.Module, cfg: TrainConfig):
    """AdamW over the hypernetwork's parameters (decay on weight matrices only) + warmup/cosine LambdaLR."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    return opt, sched


# ----------------------------------------------------------------------------------------------- a run
def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


@dataclass
class Run:
    """Everything one training run holds between steps."""

    cfg: TrainConfig
    hcfg: HyperConfig
    base_model: nn.Module
    net: HyperNetwork
    opt: Any
    sched: Any
    encoder: ContextEncoder
    order: td.DataOrder
    micro_batch: Callable[[int], td.TrainBatch]
    eval_batches: list[td.TrainBatch]
    out_dir: Path
    dist: DistContext
    merge: str
    l1_weight: float
    use_bf16: bool
    compact: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)
    on_metrics: Callable[[dict[str, Any]], None] | None = None

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.use_bf16 else contextlib.nullcontext()

    def emit(self, row: dict[str, Any]) -> None:
        """Record a metrics row (rank 0 appends it to metrics.jsonl and calls on_metrics)."""
        self.history.append(row)
        if not self.dist.is_main:
            return
        with open(self.out_dir / rf.METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(row)

    def run_eval(self, step: int) -> dict[str, Any] | None:
        """Held-out metrics at `step` (rank 0 only; None without held-out rows)."""
        if not self.eval_batches or not self.dist.is_main:
            return None
        t0 = time.perf_counter()
        row = {"kind": "eval", "step": step, **evaluate(self.base_model, self.net, self.encoder, self.eval_batches,
                                                       self.merge, self.cfg.renormalise, self.compact, self.autocast)}
        row["seconds"] = time.perf_counter() - t0
        self.emit(row)
        return row

    def checkpoint(self, step: int, epoch: int) -> Path | None:
        """Save the checkpoint of `step` (rank 0 only)."""
        if not self.dist.is_main:
            return None
        return rf.save_step(self.out_dir, step, self.cfg.keep_last, self.net, self.hcfg, self.opt, self.sched,
                            extra={"epoch": epoch, "micro_batches": step * self.cfg.grad_accum,
                                   "train_config": self.cfg.result_dict()})


def _batches(cfg: TrainConfig, tokenizer, train_rows: list, eval_rows: list):
    """(data order, micro-batch builder, held-out batches): rows validated and tokenised once."""
    for r in (*train_rows, *eval_rows):
        td.validate_row(r)
    train_ctx = [td.context_ids_of(r, tokenizer) for r in train_rows]
    eval_ctx = [td.context_ids_of(r, tokenizer) for r in eval_rows]
    prefix, suffix = td.affixes(tokenizer)
    pad_id = td.pad_id_of(tokenizer)
    groups = [td.context_key(r, c) for r, c in zip(train_rows, train_ctx)] if cfg.rows_per_context > 1 else None
    order = td.DataOrder([len(r["student_ids"]) for r in train_rows], cfg.batch_size, cfg.seed,
                         cfg.bucket_by_length, cfg.bucket_batches, cfg.drop_last, groups, cfg.rows_per_context)
    counts, probs = cfg.chunk_probs()

    def micro_batch(m: int) -> td.TrainBatch:
        epoch, idx = order(m)
        tb = td.build_batch(
            [train_rows[i] for i in idx], [train_ctx[i] for i in idx], prefix, suffix, pad_id,
            lambda n: td.draw_chunk_counts(cfg.seed, m, n, counts, probs), cfg.min_piece_tokens, epoch)
        sizes, size_probs = cfg.group_probs(m // cfg.grad_accum)
        return td.group_contexts(tb, td.draw_group_size(cfg.seed, m, sizes, size_probs))

    eval_tbs: list[td.TrainBatch] = []
    if eval_rows:
        ebs = cfg.eval_batch_size or cfg.batch_size
        for idx in td.eval_batches([len(r["student_ids"]) for r in eval_rows], ebs, cfg.seed, cfg.eval_batches):
            eval_tbs.append(td.build_batch([eval_rows[i] for i in idx], [eval_ctx[i] for i in idx],
                                           prefix, suffix, pad_id))
    return order, micro_batch, eval_tbs


def prepare(base_model: nn.Module, tokenizer, hyper_cfg: HyperConfig | Mapping[str, Any],
            train_cfg: TrainConfig | Mapping[str, Any], train_rows: Sequence[Mapping[str, Any]],
            eval_rows: Sequence[Mapping[str, Any]] | None, out_dir: str | Path, dist: DistContext,
            on_metrics: Callable[[dict[str, Any]], None] | None = None) -> Run:
    """Configs, data, a fresh hypernetwork (its init a function of the seed; the caller's RNG is left alone),
    the optimizer and the context encoder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_dict(dict(train_cfg))
    hcfg = hyper_cfg if isinstance(hyper_cfg, HyperConfig) else HyperConfig.from_dict(dict(hyper_cfg))
    freeze(base_model).eval()
    hcfg = hcfg.resolve(base_model)
    device = next(base_model.parameters()).device
    train_rows, eval_rows = list(train_rows), list(eval_rows or [])
    if not cfg.use_unfinished:  # a missing `finished` (rows from before the column) means finished
        train_rows = [r for r in train_rows if r.get("finished") is not False]
    if not train_rows:
        raise ValueError("no training rows" + ("" if cfg.use_unfinished else " with a finished answer"))
    dist.check_same((rows_digest(train_rows), rows_digest(eval_rows)), "the training rows")
    order, micro_batch, eval_tbs = _batches(cfg, tokenizer, train_rows, eval_rows)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = HyperNetwork(hcfg)
    net = net.to(device).train()
    opt, sched = build_optimizer(net, cfg)
    return Run(cfg=cfg, hcfg=hcfg, base_model=base_model, net=net, opt=opt, sched=sched,
               encoder=ContextEncoder.for_config(base_model, tokenizer, hcfg), order=order,
               micro_batch=micro_batch, eval_batches=eval_tbs, out_dir=out_dir, dist=dist,
               merge=cfg.merge or hcfg.merge, l1_weight=hcfg.l1_weight if cfg.l1_weight is None else cfg.l1_weight,
               use_bf16=bool(cfg.bf16 and device.type == "cuda"), on_metrics=on_metrics)


def _resume(run: Run, resume: bool) -> tuple[int, int | None]:
    """Load the newest checkpoint (configs must match) or clear the run folder; (start step, resumed from)."""
    dist, out_dir = run.dist, run.out_dir
    root = rf.checkpoint_root(out_dir)
    ckpt = dist.broadcast_object(latest_checkpoint(out_dir) if resume else None)  # rank 0 chooses
    start_step = 0
    if ckpt is not None:
        saved_train = json.loads((ckpt / "state.json").read_text()).get("extra", {}).get("train_config")
        if saved_train is not None:  # a field added since that checkpoint ran with its default
            saved_train = {**TrainConfig().result_dict(), **saved_train}
        if saved_train is not None and not _same(saved_train, run.cfg.result_dict()):
            raise ValueError(f"{out_dir}: the training config differs from the checkpointed run's; "
                             "use another out_dir or resume=False")
        info = load_checkpoint(ckpt, run.net, run.opt, run.sched, restore_rng=True,
                               map_location=next(run.base_model.parameters()).device)
        if info["config"] is not None and not _same(info["config"], run.hcfg.to_dict()):
            raise ValueError(f"{ckpt}: the hypernetwork config differs from the checkpointed one")
        start_step = int(info["step"])
    elif root.exists() and dist.is_main:
        shutil.rmtree(root)
    if dist.is_main:
        rf.clear_partial(out_dir)  # a checkpoint write cut by a crash
    metrics_path = out_dir / rf.METRICS
    run.history = rf.read_metrics(metrics_path, start_step) if ckpt is not None else []
    dist.broadcast_parameters(run.net)  # equal already (same seed / checkpoint); made sure
    if dist.is_main and start_step < run.cfg.total_steps:  # a finished run's files stay untouched
        atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in run.history))
        run.cfg.save(out_dir)
        run.hcfg.save(out_dir)
    return start_step, (start_step if ckpt is not None else None)


def optimizer_step(run: Run, step: int, params: list[nn.Parameter], clip: float) -> dict[str, Any]:
    """One optimizer step over `grad_accum` micro-batches (this rank's share of each); its metrics row."""
    cfg, dist = run.cfg, run.dist
    t0 = time.perf_counter()
    lr = run.opt.param_groups[0]["lr"]
    loss = distill = l1 = 0.0
    samples = tokens = ans_tokens = n_chunks = 0
    epoch = run.order.epoch_of((step - 1) * cfg.grad_accum)
    for a in range(cfg.grad_accum):
        tb = run.micro_batch((step - 1) * cfg.grad_accum + a)
        epoch = tb.epoch
        shard = shard_batch(tb, dist.rank, dist.world_size) if dist.enabled else None
        if shard is not None:
            tb = shard.tb
        elif dist.enabled:  # no context of this micro-batch for this rank
            continue
        with run.autocast():
            parts, _, _ = forward_loss(run.base_model, run.net, run.encoder, tb, run.merge, run.l1_weight,
                                       cfg.renormalise, run.compact)
        total, part_distill, part_l1 = (parts.loss, parts.distill, parts.l1) if shard is None else \
            shard_loss(parts, shard, run.l1_weight)
        (total / cfg.grad_accum).backward()
        loss += float(total.detach()) / cfg.grad_accum
        distill += float(part_distill.detach()) / cfg.grad_accum
        l1 += float(part_l1.detach()) / cfg.grad_accum
        samples += tb.n_samples
        tokens += int(tb.batch["attention_mask"].sum())
        ans_tokens += parts.n_tokens
        n_chunks += len(tb.chunks)
    if dist.enabled:  # sum the ranks' gradients and statistics: the single-process values
        loss, distill, l1, samples, tokens, ans_tokens, n_chunks = all_reduce_step(
            params, [loss, distill, l1, samples, tokens, ans_tokens, n_chunks])
        samples, tokens, ans_tokens, n_chunks = int(samples), int(tokens), int(ans_tokens), int(n_chunks)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    skipped = not math.isfinite(grad_norm)
    if not skipped:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.sched.step()
    dt = time.perf_counter() - t0
    return {"kind": "train", "step": step, "epoch": epoch, "loss": loss, "distill": distill, "l1": l1, "lr": lr,
            "grad_norm": grad_norm, "skipped": skipped, "samples": samples, "tokens": tokens,
            "answer_tokens": ans_tokens, "chunks": n_chunks, "seconds": dt, "samples_per_s": samples / dt,
            "tokens_per_s": tokens / dt}


def _tqdm(total: int, initial: int, enabled: bool):
    from model.bars import progress_bar

    return progress_bar(total=total, initial=initial, progress=enabled, desc="hypernet", unit="step",
                        dynamic_ncols=True)


def train(
    base_model: nn.Module,
    tokenizer,
    hyper_cfg: HyperConfig | Mapping[str, Any],
    train_cfg: TrainConfig | Mapping[str, Any],
    train_rows: Sequence[Mapping[str, Any]],
    eval_rows: Sequence[Mapping[str, Any]] | None,
    out_dir: str | Path,
    resume: bool = True,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    dist: DistContext | None = None,
) -> dict[str, Any]:
    """Train a hypernetwork for `base_model` on teacher rows; returns a summary dict.

    `train_rows` / `eval_rows`: see ``model/training/data.py`` (``samples`` columns + ``context_ids`` or
    ``context_text``). ``resume=True`` continues from the newest checkpoint under `out_dir` (exactly; the
    configs must match the saved ones), ``resume=False`` deletes previous checkpoints and metrics there.
    `on_metrics(row)` gets every metrics row produced by this call (``kind`` "train" or "eval").

    Returns ``{"step", "total_steps", "checkpoint" (Path of the newest checkpoint), "history" (all metrics
    rows of the run, including those before a resume), "final_eval", "resumed_from" (step or None),
    "hypernet" (the trained HyperNetwork, on the base model's device), "out_dir"}``.

    Data-parallel (``model/training/distributed.py``; `dist` defaults to the process group this process joined, if
    any): every rank trains on its share of each global micro-batch, gradients are summed across ranks, and
    only rank 0 evaluates and writes files or calls `on_metrics`; the result equals single-process training
    up to float rounding.
    """
    dist = dist or current_dist()
    run = prepare(base_model, tokenizer, hyper_cfg, train_cfg, train_rows, eval_rows, out_dir, dist, on_metrics)
    cfg = run.cfg
    start_step, resumed_from = _resume(run, resume)
    if cfg.compact_logits and start_step < cfg.total_steps:
        run.compact = compact_logits_agree(base_model, run.micro_batch(0).batch)  # the same batch on a resume
    else:
        run.compact = cfg.compact_logits
    run.compact = dist.broadcast_object(run.compact)
    final_eval = next((r for r in reversed(run.history) if r.get("kind") == "eval"), None)
    if start_step == 0 and cfg.eval_at_start:
        final_eval = run.run_eval(0) or final_eval
    params = [p for p in run.net.parameters() if p.requires_grad]
    clip = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
    bar = _tqdm(cfg.total_steps, start_step, progress and dist.is_main)
    try:
        for step in range(start_step + 1, cfg.total_steps + 1):
            row = optimizer_step(run, step, params, clip)
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                run.emit(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if step == cfg.total_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                final_eval = run.run_eval(step) or final_eval
            if step == cfg.total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                run.checkpoint(step, row["epoch"])
    finally:
        bar.close()
    dist.barrier()  # rank 0's last checkpoint is complete before anyone looks for it
    return {"step": cfg.total_steps, "total_steps": cfg.total_steps, "checkpoint": latest_checkpoint(out_dir),
            "history": run.history, "final_eval": final_eval, "resumed_from": resumed_from, "hypernet": run.net,
            "out_dir": run.out_dir, "compact_logits": run.compact, "unfinished_rows": _unfinished(train_rows, cfg)}


def _unfinished(rows: Sequence[Mapping[str, Any]], cfg: TrainConfig) -> dict[str, int]:
    """How many training rows were cut at the teacher's token limit, and how many of them were trained on."""
    n = sum(r.get("finished") is False for r in rows)
    return {"rows": n, "used": n if cfg.use_unfinished else 0}
