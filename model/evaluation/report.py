"""Evaluation results for people: aggregates per method, Markdown tables, ratio lines and the plot."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


METHODS = ("teacher", "no_doc", "d2l", "cd")
LONG_METHODS = ("teacher", "no_doc", "d2l_concat", "d2l_mean", "d2l_whole")
METHOD_LABELS = {
    "teacher": "teacher (doc in prompt)",
    "no_doc": "base, no doc",
    "d2l": "base + D2L adapter",
    "cd": "base + per-doc CD",
}


# ----------------------------------------------------------------------------------------------- summary
def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(vals) / len(vals) if vals else None


def meta_of(row: Mapping[str, Any]) -> dict[str, Any]:
    m = row.get("meta")
    if isinstance(m, dict):
        return m
    try:
        return json.loads(m) if m else {}
    except (TypeError, ValueError):
        return {}


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means of the metrics over rows (questions); adapter time and sizes as means over documents."""
    per_doc_s: dict[str, float] = {}
    per_doc_ab: dict[str, int] = {}
    per_doc_kv: dict[str, int] = {}
    for r in rows:
        m = meta_of(r)
        key = m.get("context_id", r.get("doc_id"))
        if r.get("adapter_seconds") is not None:
            per_doc_s[key] = r["adapter_seconds"]
        if m.get("adapter_bytes") is not None:
            per_doc_ab[key] = m["adapter_bytes"]
        if m.get("kv_cache_bytes") is not None:
            per_doc_kv[key] = m["kv_cache_bytes"]
    return {
        "questions": len(rows),
        "docs": len({meta_of(r).get("context_id", r.get("doc_id")) for r in rows}),
        "exact_match": _mean([r.get("exact_match") for r in rows]),
        "f1": _mean([r.get("f1") for r in rows]),
        "agrees_with_teacher": _mean([r.get("agrees_with_teacher") for r in rows]),
        "kl_to_teacher": _mean([r.get("kl_to_teacher") for r in rows]),
        "adapter_seconds": _mean(list(per_doc_s.values())),
        "adapter_bytes": _mean(list(per_doc_ab.values())),
        "kv_cache_bytes": _mean(list(per_doc_kv.values())),
    }


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per method (and CD / D2L split by whether CD trained on the question), ratios, costs."""
    by: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by[r["method"]].append(r)
    out: dict[str, Any] = {"methods": {m: aggregate(by[m]) for m in METHODS if by.get(m)}}
    groups = {}
    cd_docs = {meta_of(r).get("context_id") for r in by.get("cd", [])}
    for m in ("cd", "d2l"):
        rs = [r for r in by.get(m, []) if meta_of(r).get("context_id") in cd_docs]
        for flag, name in ((True, "trained_on"), (False, "unseen")):
            sel = [r for r in rs if meta_of(r).get("cd_trained_on") is flag]
            if sel:
                groups[f"{m}:{name}"] = aggregate(sel)
        if rs and m == "d2l":
            groups["d2l:cd_docs"] = aggregate(rs)
    out["cd_split"] = groups
    meth = out["methods"]

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    em = {m: meth[m]["exact_match"] for m in meth}
    ratios = {}
    if "d2l" in meth and "teacher" in meth:
        ratios["d2l_over_teacher_em"] = ratio(em["d2l"], em["teacher"])
        ratios["d2l_over_teacher_agreement"] = meth["d2l"]["agrees_with_teacher"]
    if "d2l" in meth and "cd" in meth:
        ratios["d2l_over_cd_em"] = ratio(groups.get("d2l:cd_docs", {}).get("exact_match"), em["cd"])
        ratios["d2l_over_cd_em_trained_on"] = ratio(groups.get("d2l:trained_on", {}).get("exact_match"),
                                                    groups.get("cd:trained_on", {}).get("exact_match"))
        ratios["cd_over_d2l_seconds"] = ratio(meth["cd"]["adapter_seconds"], meth["d2l"]["adapter_seconds"])
    if all(m in meth for m in ("no_doc", "teacher", "d2l")):
        gap = meth["no_doc"]["kl_to_teacher"]
        if gap:
            ratios["d2l_kl_gap_closed"] = 1.0 - (meth["d2l"]["kl_to_teacher"] or 0.0) / gap
    if "d2l" in meth and meth["d2l"].get("kv_cache_bytes"):
        ratios["d2l_adapter_over_kv_bytes"] = ratio(meth["d2l"]["adapter_bytes"], meth["d2l"]["kv_cache_bytes"])
    out["ratios"] = ratios
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if math.isnan(x):
            return "-"
        return f"{x:.{digits}f}"
    return str(x)


def fmt_seconds(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("MB", 1e6), ("KB", 1e3)):
        if x >= div:
            return f"{x / div:.1f} {unit}"
    return f"{x:.0f} B"


def method_table(summary: Mapping[str, Any]) -> list[dict[str, str]]:
    """The summary as table rows (one per method and CD split), strings ready to print."""
    table = []
    meth = summary.get("methods", {})
    lines = [(m, METHOD_LABELS[m], meth[m]) for m in METHODS if m in meth]
    for key, label in (("cd:trained_on", "  CD, questions it trained on"), ("cd:unseen", "  CD, questions it did not"),
                       ("d2l:trained_on", "  D2L, same questions as CD trained on"),
                       ("d2l:unseen", "  D2L, same questions as CD's unseen")):
        if key in summary.get("cd_split", {}):
            lines.append((key, label, summary["cd_split"][key]))
    for key, label, a in lines:
        table.append({
            "method": label, "docs": str(a["docs"]), "questions": str(a["questions"]),
            "exact_match": _fmt(a["exact_match"]), "f1": _fmt(a["f1"]),
            "agrees_with_teacher": _fmt(a["agrees_with_teacher"]), "kl_to_teacher": _fmt(a["kl_to_teacher"], 4),
            "adapter_time": fmt_seconds(a["adapter_seconds"]), "adapter_bytes": fmt_bytes(a["adapter_bytes"]),
            "kv_cache_bytes": fmt_bytes(a["kv_cache_bytes"]),
        })
    return table


def markdown_table(rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    head = "| " + " | ".join(cols) + " |\n|" + "|".join("---" for _ in cols) + "|\n"
    return head + "".join("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |\n" for r in rows)


def ratio_lines(summary: Mapping[str, Any]) -> list[str]:
    r = summary.get("ratios", {})
    labels = {
        "d2l_over_teacher_em": "D2L / teacher, exact match",
        "d2l_over_teacher_agreement": "D2L agreement with the teacher's answer",
        "d2l_over_cd_em": "D2L / CD, exact match (all questions of CD's documents)",
        "d2l_over_cd_em_trained_on": "D2L / CD, exact match (questions CD trained on)",
        "cd_over_d2l_seconds": "adapter creation time, CD / D2L (batch 1)",
        "cd_over_d2l_flops": "adapter creation FLOPs, CD / D2L (the time ratio at equal speed per operation)",
        "d2l_kl_gap_closed": "share of the no-doc -> teacher KL gap D2L closes",
        "d2l_adapter_over_kv_bytes": "D2L adapter bytes / document KV-cache bytes",
    }
    return [f"- {labels[k]}: {_fmt(v)}" for k, v in r.items() if k in labels]


def plot_results(summary: Mapping[str, Any], path, long_summary: Mapping[str, Any] | None = None,
                 title: str = "doc2lora evaluation") -> Any:
    """PNG: methods side by side (exact match, agreement with the teacher, KL); score vs document length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    meth = summary.get("methods", {})
    names = [m for m in METHODS if m in meth]
    n_panels = 3 if long_summary else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5.2 * n_panels, 3.8))
    x = range(len(names))
    w = 0.38
    em = [meth[m]["exact_match"] or 0.0 for m in names]
    ag = [meth[m]["agrees_with_teacher"] or 0.0 for m in names]
    axes[0].bar([i - w / 2 for i in x], em, w, label="exact match (gold)")
    axes[0].bar([i + w / 2 for i in x], ag, w, label="agrees with teacher")
    axes[0].set_xticks(list(x), names)
    axes[0].set_ylim(0, 1.05)
    axes[0].set_title("held-out questions")
    axes[0].legend(fontsize=8, loc="upper right")
    kl = [meth[m]["kl_to_teacher"] or 0.0 for m in names]
    axes[1].bar(list(x), kl, 0.6, color="tab:red")
    axes[1].set_xticks(list(x), names)
    axes[1].set_title("KL to the teacher (answer tokens)")
    if long_summary:
        ax = axes[2]
        for method, pts in sorted(long_summary.get("curves", {}).items()):
            xs = sorted(pts, key=float)
            ax.plot([float(f) for f in xs], [pts[f] for f in xs], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("document length (x trained length)")
        ax.set_ylabel("exact match")
        ax.set_ylim(0, 1.05)
        ax.set_title("score vs document length")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



def long_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``curves``: method -> {length factor: exact match} (suite "long"); ``needle``: method -> {depth: EM}."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    needle: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        m = meta_of(r)
        if r.get("exact_match") is None:
            continue
        if m.get("suite") == "long":
            acc[(r["method"], m["length_factor"])].append(r["exact_match"])
        elif m.get("suite") == "needle":
            needle[(r["method"], m["depth"])].append(r["exact_match"])
    order = {m: i for i, m in enumerate(LONG_METHODS)}
    curves: dict[str, dict[str, float]] = defaultdict(dict)
    for (method, f), v in sorted(acc.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        curves[method][str(f)] = sum(v) / len(v)
    hay: dict[str, dict[str, float]] = defaultdict(dict)
    for (method, d), v in sorted(needle.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0])):
        hay[method][f"{d:g}"] = sum(v) / len(v)
    factor = next((meta_of(r)["length_factor"] for r in rows if meta_of(r).get("suite") == "needle"), None)
    return {"curves": dict(curves), "needle": dict(hay), "needle_factor": factor}


def long_table(summary: dict[str, Any]) -> list[dict[str, str]]:
    """Rows: one per method, columns per length factor (exact match), then the 4x/1x ratio."""
    curves = summary.get("curves", {})
    factors = sorted({f for pts in curves.values() for f in pts}, key=float)
    out = []
    for method, pts in curves.items():
        row = {"method": method}
        for f in factors:
            row[f"{f}x"] = f"{pts[f]:.3f}" if f in pts else "-"
        base, four = pts.get("1"), pts.get("4")
        row["4x / 1x"] = f"{four / base:.3f}" if base and four is not None else "-"
        out.append(row)
    return out


def needle_table(summary: dict[str, Any]) -> list[dict[str, str]]:
    hay = summary.get("needle", {})
    depths = sorted({d for pts in hay.values() for d in pts}, key=float)
    return [{"method": m, **{f"depth {d}": f"{pts[d]:.3f}" if d in pts else "-" for d in depths}}
            for m, pts in hay.items()]


def write_report(folder: Path, summary: dict[str, Any], long: dict[str, Any] | None, title: str,
                 notes: list[str] | None = None) -> dict[str, Path]:
    """report.md, results.png and summary.json in `folder`; returns their paths."""

    folder.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}\n", "## Held-out questions, four methods\n", markdown_table(method_table(summary)), "",
          *ratio_lines(summary), ""]
    if long and long.get("curves"):
        md += ["## Documents longer than the trained length (exact match)\n", markdown_table(long_table(long)), ""]
    if long and long.get("needle"):
        md += [f"## Needle test ({long.get('needle_factor')}x haystack, exact match by depth)\n",
               markdown_table(needle_table(long)), ""]
    md += [f"- {n}" for n in notes or []]
    paths = {"report": folder / "report.md", "plot": folder / "results.png", "summary": folder / "summary.json"}
    paths["report"].write_text("\n".join(md) + "\n")
    plot_results(summary, paths["plot"], long if long and long.get("curves") else None, title=title)
    paths["summary"].write_text(json.dumps({"summary": summary, "long": long, "title": title}, indent=1,
                                           default=str))
    return paths


__all__ = ["LONG_METHODS", "long_summary", "long_table", "needle_table", "write_report", "METHODS", "METHOD_LABELS", "aggregate", "fmt_bytes", "fmt_seconds", "markdown_table", "meta_of", "method_table", "plot_results", "ratio_lines", "summarize"]
