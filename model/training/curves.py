"""Training curves as a PNG: the train stage's `training.png` and the toy benchmark's learning curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training(history: list[dict[str, Any]], path: str | Path, title: str = "hypernetwork training") -> Path:
    """Train loss per step and held-out CE/KL per evaluation, side by side. Kept as it is when it is newer
    than the run's metrics.jsonl beside it (a finished run rerun: nothing new to draw)."""
    path = Path(path)
    metrics = path.parent / "metrics.jsonl"
    if path.exists() and metrics.exists() and path.stat().st_mtime >= metrics.stat().st_mtime:
        return path
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r.get("kind") == "train"]
    evals = [r for r in history if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss (distill + L1)")
    if evals:
        for key in ("eval_ce", "eval_kl"):
            axes[1].plot([r["step"] for r in evals], [r[key] for r in evals], marker="o", label=key)
        ax2 = axes[1].twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_agreement"] for r in evals], "g--", label="top-1 agreement")
        if all("eval_exact" in r for r in evals):
            ax2.plot([r["step"] for r in evals], [r["eval_exact"] for r in evals], "m-", marker=".",
                     label="answers exact (greedy = teacher)")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("agreement")
        # one legend for both axes, under the plot: inside it, it covered the curves' ends
        lines = axes[1].get_lines() + ax2.get_lines()
        axes[1].legend(lines, [ln.get_label() for ln in lines], loc="upper center", bbox_to_anchor=(0.5, -0.2),
                       ncol=2, fontsize=8, frameon=False)
        axes[1].set_ylabel("CE / KL to the teacher (nats)")
    axes[1].set_xlabel("step")
    axes[1].set_title("held-out documents")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
