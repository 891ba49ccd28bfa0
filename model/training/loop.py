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

Files under ``out_dir``::

    train_config.json, hyper_config.json
    metrics.jsonl                       one JSON row per logged step / evaluation
    checkpoints/step-00000120/          model/optimizer/scheduler/RNG state (model/training/checkpoint.py:
                                        safetensors + JSON, never pickle); loadable by load_hypernet()
    checkpoints/latest                  the name of the newest complete checkpoint folder

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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from model.training import data as td
from storage.fsutil import atomic_write
from model.hypernet.lora import apply_adapter, freeze, merge_chunks
from model.training.checkpoint import load_checkpoint, save_checkpoint
from model.hypernet.encoder import ContextEncoder
from model.training.distributed import DistContext, all_reduce_step, rows_digest, shard_batch, shard_loss
from model.training.distributed import current as current_dist
from model.training.loss import LossParts, answer_logits, distill_loss
from model.hypernet.config import HyperConfig
from model.hypernet.network import HyperNetwork
from model.training.config import TrainConfig

CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"
STEP_PREFIX = "step-"


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


# ----------------------------------------------------------------------------------------------- files
def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name[len(STEP_PREFIX):])
    except ValueError:
        return -1


def _complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / "state.json").exists() and (folder / "model.safetensors").exists()


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir`` (the `latest` pointer, else a scan)."""
    root = checkpoint_root(out_dir)
    pointer = root / LATEST
    if pointer.is_file():
        folder = root / pointer.read_text().strip()
        if _complete(folder):
            return folder
    found = [p for p in root.glob(STEP_PREFIX + "*") if _complete(p) and _step_of(p) >= 0] if root.is_dir() else []
    return max(found, key=_step_of) if found else None


def _prune(root: Path, keep: int) -> None:
    folders = sorted((p for p in root.glob(STEP_PREFIX + "*") if p.is_dir()), key=_step_of)
    for p in folders[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if row.get("step", 0) <= upto_step:
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- forward
def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg


def _compact_parts(model: nn.Module):
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if prefix else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        return None
    return backbone, head


def student_logits(model: nn.Module, batch: Mapping[str, Any], compact: bool = True) -> tuple[Tensor, dict]:
    """Student logits and the batch to score them with.

    ``compact``: run the backbone, then the LM head only at the answer positions: logits [B, N, V] with
    ``answer_start`` rewritten to 1 (so ``answer_logits`` picks position j for answer token j). Same loss
    as the full logits [B, T, V] for models whose logits are ``lm_head(last_hidden_state)`` (+ Gemma's
    final soft-capping); ``train`` checks that once and falls back to full logits otherwise.
    """
    device = next(model.parameters()).device
    ids, attn = batch["student_ids"].to(device), batch["attention_mask"].to(device)
    parts = _compact_parts(model) if compact else None
    if parts is None:
        return model(input_ids=ids, attention_mask=attn, use_cache=False).logits, dict(batch)
    backbone, head = parts
    h = backbone(input_ids=ids, attention_mask=attn, use_cache=False)[0]
    n_pos = batch["answer_mask"].shape[1]
    pos = batch["answer_start"].to(device)[:, None] - 1 + torch.arange(n_pos, device=device)
    pos = pos.clamp(0, h.shape[1] - 1)
    logits = head(h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1])))
    cap = getattr(_text_config(model), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    out = dict(batch)
    out["answer_start"] = torch.ones_like(batch["answer_start"])
    return logits, out


@torch.no_grad()
def compact_logits_agree(model: nn.Module, batch: Mapping[str, Any]) -> bool:
    """Do the compact answer-position logits equal the full forward's (on this batch, no adapter), up to
    rounding (1e-4 of the logits' scale in float32, 2e-2 in half precision)?"""
    if _compact_parts(model) is None:
        return False
    full, fb = student_logits(model, batch, compact=False)
    comp, cb = student_logits(model, batch, compact=True)
    n_pos = batch["answer_mask"].shape[1]
    a = answer_logits(full.float(), fb["answer_start"], n_pos)
    b = answer_logits(comp.float(), cb["answer_start"], n_pos)
    mask = batch["answer_mask"].to(a.device)
    a, b = a[mask], b[mask]
    tol = (1e-4 if full.dtype == torch.float32 else 2e-2) * max(1.0, float(a.abs().max()))
    return bool((a - b).abs().max() <= tol)


def batch_adapters(net: HyperNetwork, encoder: ContextEncoder, tb: td.TrainBatch, merge: str):
    """(generated per-piece adapter, merged per-context adapter with the bias LoRA)."""
    feats, mask = encoder.encode_ids(tb.chunks)
    generated = net(feats, mask)
    merged = merge_chunks(generated, tb.chunks_per_context, merge, bias=net.bias_adapter(1))
    return generated, merged


def forward_loss(
    base_model: nn.Module, net: HyperNetwork, encoder: ContextEncoder, tb: td.TrainBatch, merge: str,
    l1_weight: float, renormalise: bool = False, compact: bool = True,
) -> tuple[LossParts, Tensor, dict]:
    """The loss of one micro-batch (and the student logits + the batch they are scored with)."""
    generated, merged = batch_adapters(net, encoder, tb, merge)
    with apply_adapter(base_model, merged, sample_index=tb.row_context):
        logits, scored = student_logits(base_model, tb.batch, compact)
    return distill_loss(logits, scored, generated, l1_weight, renormalise), logits, scored


def _teacher_p(lp: Tensor, renormalise: bool) -> Tensor:
    finite = torch.isfinite(lp)
    if renormalise:
        return torch.softmax(lp.masked_fill(~finite, -1e30), -1) * finite
    return lp.exp()


@torch.no_grad()
def evaluate(
    base_model: nn.Module, net: HyperNetwork, encoder: ContextEncoder, batches: Sequence[td.TrainBatch],
    merge: str, renormalise: bool = False, compact: bool = True, autocast=contextlib.nullcontext,
) -> dict[str, float]:
    """Held-out metrics of the adapted student against the teacher's top-k on the answer tokens.

    ``eval_ce``: the distillation cross-entropy (as the loss: per answer, then per document);
    ``eval_kl``: KL(p_T || q_S) over the teacher's top-k (``sum_k p log p - sum_k p log q``; the mass
    outside the top-k is dropped as in the loss), averaged the same way; ``eval_agreement``: the share of
    answer tokens where the student's argmax is the teacher's top-1 token.
    """
    was = net.training
    net.eval()
    per_doc: dict[Any, list[tuple[float, float]]] = {}
    agree = tokens = answers = 0
    try:
        for tb in batches:
            with autocast():
                parts, logits, scored = forward_loss(base_model, net, encoder, tb, merge, 0.0, renormalise, compact)
            b = tb.batch
            lp = b["topk_logprobs"].to(logits.device)
            mask = b["answer_mask"].to(logits.device)
            p = _teacher_p(lp, renormalise)
            ent_tok = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1) * mask
            ent_ans = ent_tok.sum(1) / mask.sum(1).clamp(min=1)
            sel = answer_logits(logits.float(), scored["answer_start"], mask.shape[1])
            top1 = b["topk_ids"].to(logits.device).gather(-1, lp.argmax(-1, keepdim=True))[..., 0]
            agree += int(((sel.argmax(-1) == top1) & mask).sum())
            tokens += int(mask.sum())
            for i in range(len(b["sample_ids"])):
                doc = b["doc_ids"][int(b["doc_index"][i])]
                ce = float(parts.per_answer[i])
                per_doc.setdefault(doc, []).append((ce, ce - float(ent_ans[i])))
                answers += 1
    finally:
        net.train(was)
    docs = [(sum(c for c, _ in v) / len(v), sum(k for _, k in v) / len(v)) for v in per_doc.values()]
    return {
        "eval_ce": sum(c for c, _ in docs) / max(1, len(docs)),
        "eval_kl": sum(k for _, k in docs) / max(1, len(docs)),
        "eval_agreement": agree / max(1, tokens),
        "eval_answers": answers,
        "eval_docs": len(docs),
        "eval_tokens": tokens,
    }


# ----------------------------------------------------------------------------------------------- train
def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def _tqdm(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="hypernet", unit="step", dynamic_ncols=True)


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
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_dict(dict(train_cfg))
    hcfg = hyper_cfg if isinstance(hyper_cfg, HyperConfig) else HyperConfig.from_dict(dict(hyper_cfg))
    freeze(base_model).eval()
    hcfg = hcfg.resolve(base_model)
    device = next(base_model.parameters()).device
    merge = cfg.merge or hcfg.merge
    l1_weight = hcfg.l1_weight if cfg.l1_weight is None else cfg.l1_weight
    use_bf16 = bool(cfg.bf16 and device.type == "cuda")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    # -- data (validated and tokenised once)
    train_rows, eval_rows = list(train_rows), list(eval_rows or [])
    if not train_rows:
        raise ValueError("no training rows")
    for r in (*train_rows, *eval_rows):
        td.validate_row(r)
    dist.check_same((rows_digest(train_rows), rows_digest(eval_rows)), "the training rows")
    train_ctx = [td.context_ids_of(r, tokenizer) for r in train_rows]
    eval_ctx = [td.context_ids_of(r, tokenizer) for r in eval_rows]
    prefix, suffix = td.affixes(tokenizer)
    pad_id = td.pad_id_of(tokenizer)
    order = td.DataOrder([len(r["student_ids"]) for r in train_rows], cfg.batch_size, cfg.seed,
                         cfg.bucket_by_length, cfg.bucket_batches, cfg.drop_last)
    counts, probs = cfg.chunk_probs()

    def micro_batch(m: int) -> td.TrainBatch:
        epoch, idx = order(m)
        return td.build_batch(
            [train_rows[i] for i in idx], [train_ctx[i] for i in idx], prefix, suffix, pad_id,
            lambda n: td.draw_chunk_counts(cfg.seed, m, n, counts, probs), cfg.min_piece_tokens, epoch)

    eval_tbs: list[td.TrainBatch] = []
    if eval_rows:
        ebs = cfg.eval_batch_size or cfg.batch_size
        for idx in td.eval_batches([len(r["student_ids"]) for r in eval_rows], ebs, cfg.seed, cfg.eval_batches):
            eval_tbs.append(td.build_batch([eval_rows[i] for i in idx], [eval_ctx[i] for i in idx],
                                           prefix, suffix, pad_id))

    # -- model, optimizer (the init is a function of the seed; the caller's RNG is left alone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        net = HyperNetwork(hcfg)
    net = net.to(device).train()
    opt, sched = build_optimizer(net, cfg)
    encoder = ContextEncoder(base_model, tokenizer, hcfg.layer_indices)

    # -- resume or start over
    root = checkpoint_root(out_dir)
    metrics_path = out_dir / METRICS
    start_step, resumed_from = 0, None
    ckpt = dist.broadcast_object(latest_checkpoint(out_dir) if resume else None)  # rank 0 chooses
    if ckpt is not None:
        saved_train = json.loads((ckpt / "state.json").read_text()).get("extra", {}).get("train_config")
        if saved_train is not None and not _same(saved_train, cfg.result_dict()):
            raise ValueError(f"{out_dir}: the training config differs from the checkpointed run's; "
                             "use another out_dir or resume=False")
        info = load_checkpoint(ckpt, net, opt, sched, restore_rng=True, map_location=device)
        if info["config"] is not None and not _same(info["config"], hcfg.to_dict()):
            raise ValueError(f"{ckpt}: the hypernetwork config differs from the checkpointed one")
        start_step = resumed_from = int(info["step"])
    elif root.exists() and dist.is_main:
        shutil.rmtree(root)
    for stale in root.glob(".*") if root.exists() and dist.is_main else []:  # a checkpoint write cut by a crash
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    history = _read_metrics(metrics_path, start_step) if ckpt is not None else []
    dist.broadcast_parameters(net)  # equal already (same seed / checkpoint); made sure
    if dist.is_main:
        atomic_write(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
        cfg.save(out_dir)
        hcfg.save(out_dir)

    compact = cfg.compact_logits
    if compact and start_step < cfg.total_steps:
        compact = compact_logits_agree(base_model, micro_batch(0).batch)  # the same batch on a resume
    compact = dist.broadcast_object(compact)

    def emit(row: dict[str, Any]) -> None:
        history.append(row)
        if not dist.is_main:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if on_metrics is not None:
            on_metrics(row)

    def run_eval(step: int) -> dict[str, Any] | None:
        if not eval_tbs or not dist.is_main:
            return None
        t0 = time.perf_counter()
        row = {"kind": "eval", "step": step, **evaluate(base_model, net, encoder, eval_tbs, merge,
                                                       cfg.renormalise, compact, autocast)}
        row["seconds"] = time.perf_counter() - t0
        emit(row)
        return row

    def checkpoint(step: int, epoch: int) -> Path | None:
        if not dist.is_main:
            return None
        root.mkdir(parents=True, exist_ok=True)
        folder = save_checkpoint(root / f"{STEP_PREFIX}{step:08d}", net, hcfg, opt, sched, step=step,
                                 extra={"epoch": epoch, "micro_batches": step * cfg.grad_accum,
                                        "train_config": cfg.result_dict()})
        atomic_write(root / LATEST, folder.name + "\n")
        _prune(root, cfg.keep_last)
        return folder

    final_eval = next((r for r in reversed(history) if r.get("kind") == "eval"), None)
    if start_step == 0 and cfg.eval_at_start:
        final_eval = run_eval(0) or final_eval
    params = [p for p in net.parameters() if p.requires_grad]
    clip = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
    bar = _tqdm(cfg.total_steps, start_step, progress and dist.is_main)
    epoch = order.epoch_of(start_step * cfg.grad_accum)
    try:
        for step in range(start_step + 1, cfg.total_steps + 1):
            t0 = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            loss = distill = l1 = 0.0
            samples = tokens = ans_tokens = n_chunks = 0
            for a in range(cfg.grad_accum):
                tb = micro_batch((step - 1) * cfg.grad_accum + a)
                epoch = tb.epoch
                shard = shard_batch(tb, dist.rank, dist.world_size) if dist.enabled else None
                if shard is not None:
                    tb = shard.tb
                elif dist.enabled:  # no context of this micro-batch for this rank
                    continue
                with autocast():
                    parts, _, _ = forward_loss(base_model, net, encoder, tb, merge, l1_weight, cfg.renormalise, compact)
                total, part_distill, part_l1 = (parts.loss, parts.distill, parts.l1) if shard is None else \
                    shard_loss(parts, shard, l1_weight)
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
                opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            dt = time.perf_counter() - t0
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                emit({"kind": "train", "step": step, "epoch": epoch, "loss": loss, "distill": distill, "l1": l1,
                      "lr": lr, "grad_norm": grad_norm, "skipped": skipped, "samples": samples,
                      "tokens": tokens, "answer_tokens": ans_tokens, "chunks": n_chunks, "seconds": dt,
                      "samples_per_s": samples / dt, "tokens_per_s": tokens / dt})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step == cfg.total_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                final_eval = run_eval(step) or final_eval
            if step == cfg.total_steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                checkpoint(step, epoch)
    finally:
        bar.close()
    dist.barrier()  # rank 0's last checkpoint is complete before anyone looks for it
    newest = latest_checkpoint(out_dir)
    return {
        "step": cfg.total_steps,
        "total_steps": cfg.total_steps,
        "checkpoint": newest,
        "history": history,
        "final_eval": final_eval,
        "resumed_from": resumed_from,
        "hypernet": net,
        "out_dir": out_dir,
        "compact_logits": compact,
    }
