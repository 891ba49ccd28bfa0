"""Data-loss floors: what each stage kept and dropped, and the run's final state when a stage kept too little.

A stage that kept less than its floor (`data_loss.<stage>`, a fraction of what it handled) does not fail the
work already done; the run ends in a `Completed` state named `DataLoss` with a message that names the stage,
the numbers and the setting (or `Failed` with `data_loss.strict: true`), and logs a WARNING line.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DataLossConfig", "LOSS_STATE", "check_floors", "final_state", "kept_rows"]

LOSS_STATE = "DataLoss"

# stage -> (stats key of what was kept, stats key of what was dropped, what to change when it is low)
_COUNTS = {
    "ingest": ("documents", "rejects", "the sources (see `d2l sql \"SELECT * FROM rejects\"`)"),
    "chunk": ("chunks", "rejects", "chunk.max_tokens"),
    "synthesize": ("questions", "rejects", "synthesize.max_new_tokens or the question LLM"),
    # usable answers: one cut at max_new_tokens is kept (finished=false); it counts as lost only when training
    # leaves such answers out (train.optim.use_unfinished: false)
    "teacher": ("samples", "rejects", "teacher.max_new_tokens (longer answers are cut there)"),
}


class DataLossConfig(BaseModel):
    """Floors on the share of its input each stage keeps; a run below one says so in its final state."""

    model_config = ConfigDict(extra="forbid")

    ingest: float = Field(0.5, ge=0, le=1, description="Least share of read documents kept (not rejected).")
    chunk: float = Field(0.5, ge=0, le=1, description="Least share of chunks among chunks + rejects.")
    synthesize: float = Field(0.25, ge=0, le=1, description="Least share of questions among questions + rejects.")
    teacher: float = Field(0.5, ge=0, le=1, description="Least share of questions answered usably (not failed; not "
                           "cut at teacher.max_new_tokens either when train.optim.use_unfinished is off).")
    strict: bool = Field(False, description="Fail the run (instead of a named warning state) below a floor.")


def kept_rows(stats: dict[str, Any], use_unfinished: bool = True) -> list[dict[str, Any]]:
    """One row per stage that ran this time: kept, dropped, kept share (None when it handled nothing).
    `use_unfinished`: training uses answers cut at the teacher's token limit (else they count as dropped)."""
    rows = []
    for stage, (kept_key, dropped_key, hint) in _COUNTS.items():
        s = stats.get(stage)
        if not isinstance(s, dict):
            continue
        kept, dropped = int(s.get(kept_key, 0) or 0), int(s.get(dropped_key, 0) or 0)
        if stage == "teacher" and not use_unfinished:  # cut answers training will not use are a loss to report
            cut = int(s.get("unfinished", 0) or 0)
            kept, dropped = kept - cut, dropped + cut
        total = kept + dropped
        rows.append({"stage": stage, "kept": kept, "dropped": dropped,
                     "kept_share": round(kept / total, 3) if total else None, "hint": hint,
                     **({"unfinished": int(s.get("unfinished", 0))} if stage == "teacher" else {})})
    return rows


def check_floors(stats: dict[str, Any], cfg: DataLossConfig, use_unfinished: bool = True) -> list[str]:
    """A sentence per stage below its floor (empty: the run kept enough everywhere)."""
    out = []
    for row in kept_rows(stats, use_unfinished):
        share, floor = row["kept_share"], getattr(cfg, row["stage"])
        if share is None or share >= floor:
            continue
        cut = row.get("unfinished") and not use_unfinished
        extra = f", {row['unfinished']} unfinished" if cut else ""
        hint = f"{row['hint']}, set train.optim.use_unfinished" if cut else row["hint"]
        out.append(f"{row['stage']} kept {row['kept']} of {row['kept'] + row['dropped']} ({share:.0%}{extra}), "
                   f"below the floor data_loss.{row['stage']}={floor:g}; change {hint} or lower the floor")
    return out


def final_state(stats: dict[str, Any], cfg: DataLossConfig, logger: Any = None, use_unfinished: bool = True):
    """None when every stage kept enough; else a named Completed state (or Failed when strict) carrying `stats`."""
    problems = check_floors(stats, cfg, use_unfinished)
    if not problems:
        return None
    from prefect.states import Completed, Failed

    for p in problems:
        if logger is not None:
            logger.warning("data loss: %s", p)
    message = "Data loss: " + "; ".join(problems)
    stats["data_loss"] = problems
    if cfg.strict:
        return Failed(message=message + " (data_loss.strict is on)")
    return Completed(name=LOSS_STATE, message=message, data=stats)
