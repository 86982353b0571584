"""Results tables and plots shared by the evaluation scripts.

    results = aggregate(predictions)                 # one row per (task, length, policy, budget)
    write_results(results, out_dir)                  # results.jsonl, results.md, score_vs_kv.png
    print_table(results)                             # rich table on stdout
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from namm.shards import atomic_write_bytes

FULL = "full"


def policy_label(policy: str, budget) -> str:
    """Column name of a policy run: ``full`` or ``name@budget``."""
    return policy if budget is None else f"{policy}@{budget}"


def row_label(row: Mapping) -> str:
    """Column name of a prediction or results row: its run ``label`` (``evaluate.label_runs``), or
    ``policy@budget`` for rows written before labels existed."""
    return row.get("label") or policy_label(row["policy"], row.get("budget"))


def row_method(row: Mapping) -> str:
    """A row's policy run without its budget: one line of the score-vs-kv plot joins a method's budgets."""
    return row.get("method") or row["policy"]


def task_label(task: str, length) -> str:
    """Row name of a task: ``task@1024`` for generated lengths, else the task name."""
    return task if length is None else f"{task}@{length}"


def aggregate(predictions: Iterable[Mapping]) -> list[dict]:
    """Per-prompt rows -> one row per (task, length, run label): score = 100 x mean in [0, 100].

    Each row carries the run's ``label``, ``method`` and full resolved ``policy_config`` (when the
    predictions have them), so that a table can be traced back to what was run.
    """
    groups: dict[tuple, list[Mapping]] = defaultdict(list)
    for p in predictions:
        groups[(p["task"], p.get("length"), row_label(p))].append(p)
    out = []
    for (task, length, label), ps in groups.items():
        n = len(ps)
        first = ps[0]
        out.append({
            "task": task, "length": length, "policy": first["policy"], "budget": first.get("budget"),
            "label": label, "method": row_method(first), "policy_config": first.get("policy_config"),
            "score": round(100 * sum(float(p["score"]) for p in ps) / n, 2),
            "kv_fraction": round(sum(float(p["kv_fraction_prefill"]) for p in ps) / n, 4),
            "kv_fraction_decode": round(sum(float(p["kv_fraction_decode"]) for p in ps) / n, 4),
            "n": n,
            "prompt_tokens": round(sum(int(p["prompt_tokens"]) for p in ps) / n, 1),
            "truncated": sum(bool(p.get("truncated")) for p in ps),
            "wall_s": round(sum(float(p["wall_s"]) for p in ps), 2),
        })
    return sorted(out, key=_order)


def _order(r: Mapping):
    return (r["task"], -1 if r.get("length") is None else r["length"], r["policy"] != FULL, row_method(r),
            -math.inf if r.get("budget") is None else _num(r["budget"]))


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.inf


def columns(results: Sequence[Mapping]) -> list[str]:
    seen: list[str] = []
    for r in results:
        label = row_label(r)
        if label not in seen:
            seen.append(label)
    return sorted(seen, key=lambda c: (c != FULL, c))


def pivot(results: Sequence[Mapping], key: str = "score") -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(row labels, column labels, {(row, col): value}) with tasks as rows and policy@budget as columns."""
    rows: list[str] = []
    cells = {}
    for r in results:
        t = task_label(r["task"], r.get("length"))
        if t not in rows:
            rows.append(t)
        cells[(t, row_label(r))] = r[key]
    return rows, columns(results), cells


def column_means(results: Sequence[Mapping], key: str = "score") -> dict[str, float]:
    """Mean over task rows of each column (unweighted, as LongBench averages tasks)."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in results:
        acc[row_label(r)].append(float(r[key]))
    return {c: round(sum(v) / len(v), 2) for c, v in acc.items()}


def normalised_scores(results: Sequence[Mapping]) -> dict[str, float]:
    """Per column, the mean over task rows of score / full-cache score (the paper's normalised score).

    A task row is a task at one context length (``passkey@1024``), as in the tables; task rows whose
    full-cache score is 0 are left out. ``experiments.tables`` merges the lengths of a task first unless
    given ``--by-length``, so its default normalised score can differ from this one.
    """
    full = {(r["task"], r.get("length")): float(r["score"]) for r in results if r["policy"] == FULL}
    acc: dict[str, list[float]] = defaultdict(list)
    for r in results:
        ref = full.get((r["task"], r.get("length")))
        if ref:
            acc[row_label(r)].append(float(r["score"]) / ref)
    return {c: round(sum(v) / len(v), 4) for c, v in acc.items() if v}


def bootstrap_normalised(predictions: Sequence[Mapping], n_boot: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Per column, a percentile bootstrap interval of ``normalised_scores`` over the prompts.

    Paired: each resample draws the prompts of a task row (task at one length) with replacement, and the
    policy and the full cache are scored on the same draw; a task row whose resampled full-cache score is 0
    is left out of that resample, as ``normalised_scores`` leaves it out. Seeded: the same predictions give
    the same interval.
    """
    import numpy as np

    cells: dict[tuple, dict[str, float]] = defaultdict(dict)     # (task, length, label) -> {_id: score}
    for p in predictions:
        cells[(p["task"], p.get("length"), row_label(p))][str(p["_id"])] = float(p["score"])
    rng = np.random.default_rng(seed)
    out = {}
    for label in sorted({k[2] for k in cells} - {FULL}):
        ratios, weights = [], []
        for (task, length, lab), scores in cells.items():
            full = cells.get((task, length, FULL))
            ids = sorted(set(scores) & set(full or {}))
            if lab != label or not ids:
                continue
            pick = rng.integers(0, len(ids), (n_boot, len(ids)))
            pol = np.asarray([scores[i] for i in ids])[pick].mean(1)
            ref = np.asarray([full[i] for i in ids])[pick].mean(1)
            ok = ref > 0
            ratios.append(np.where(ok, pol / np.where(ok, ref, 1.0), 0.0))
            weights.append(ok)
        if ratios:
            w = np.asarray(weights, float)
            counted = w.sum(0)
            norm = (np.asarray(ratios) * w).sum(0)[counted > 0] / counted[counted > 0]
            if norm.size:
                lo, hi = np.quantile(norm, [(1 - level) / 2, (1 + level) / 2])
                out[label] = (round(float(lo), 4), round(float(hi), 4))
    return out


def paired_bootstrap(predictions: Sequence[Mapping], n_boot: int = 2000, seed: int = 0
                     ) -> tuple[dict[str, float], dict[str, "np.ndarray"], dict[str, int],
                                dict[str, dict[str, float]]]:
    """Per column, the normalised score on the prompts every column ran and ``n_boot`` bootstrap draws of it.

    Returns ``(point, draws, prompts, means)``: ``point[label]`` the mean over task rows (task at one length) of
    the column's mean score / the full cache's mean score, ``draws[label]`` an array ``[n_boot]``,
    ``prompts[label]`` the prompts counted, ``means[label]`` its mean score per task row (``passkey@1024``) on
    them (the full cache included). Paired: on each task row only the prompts that the full cache and every column with
    results on that row all ran count, each resample draws them with replacement once, and every column is
    scored on that one draw, so two columns' draws can be subtracted. A row (or a draw) whose full-cache mean
    is 0 is left out, as ``normalised_scores`` leaves it out. Seeded: the same predictions give the same draws.
    """
    import numpy as np

    cells: dict[tuple, dict[str, dict[str, float]]] = defaultdict(dict)   # (task, length) -> label -> {_id: score}
    for p in predictions:
        cells[(p["task"], p.get("length"))].setdefault(row_label(p), {})[str(p["_id"])] = float(p["score"])
    rng = np.random.default_rng(seed)
    acc: dict[str, list] = defaultdict(lambda: [0.0, 0, 0, 0.0, 0])   # draw sums, draw counts, prompts, point sums, n
    means: dict[str, dict[str, float]] = defaultdict(dict)
    for key in sorted(cells, key=str):
        by_label = cells[key]
        if FULL not in by_label:
            continue
        ids = sorted(set.intersection(*(set(v) for v in by_label.values())))
        if not ids:
            continue
        pick = rng.integers(0, len(ids), (n_boot, len(ids)))
        full = np.asarray([by_label[FULL][i] for i in ids])
        ref = full[pick].mean(1)
        ok = ref > 0
        row = f"{key[0]}@{key[1]}" if key[1] is not None else str(key[0])
        means[FULL][row] = round(float(full.mean()), 4)
        for label, scores in by_label.items():
            if label == FULL:
                continue
            pol = np.asarray([scores[i] for i in ids])
            means[label][row] = round(float(pol.mean()), 4)
            a = acc[label]
            a[0] = a[0] + np.where(ok, pol[pick].mean(1) / np.where(ok, ref, 1.0), 0.0)
            a[1] = a[1] + ok
            a[2] += len(ids)
            if full.mean() > 0:
                a[3] += pol.mean() / full.mean()
                a[4] += 1
    point = {label: a[3] / a[4] for label, a in acc.items() if a[4]}
    draws = {label: np.where(a[1] > 0, a[0] / np.maximum(a[1], 1), np.nan) for label, a in acc.items()}
    return point, draws, {label: a[2] for label, a in acc.items()}, dict(means)


def markdown_table(results: Sequence[Mapping], intervals: Mapping[str, tuple[float, float]] | None = None) -> str:
    """Scores (0-100) with tasks as rows and policy@budget as columns, a mean row and a KV row; with
    ``intervals`` (``bootstrap_normalised``) a row of 95 % intervals of the normalised score."""
    rows, cols, cells = pivot(results)
    _, _, kv = pivot(results, "kv_fraction")
    _, _, ns = pivot(results, "n")
    lines = ["| task | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for t in rows:
        n = max((ns.get((t, c)) or 0) for c in cols)
        vals = [f"{cells[(t, c)]:.2f}" if (t, c) in cells else "-" for c in cols]
        lines.append(f"| {t} | {n} | " + " | ".join(vals) + " |")
    means = column_means(results)
    kvm = column_means(results, "kv_fraction")
    lines.append("| **mean** | | " + " | ".join(f"**{means[c]:.2f}**" for c in cols) + " |")
    lines.append("| kv fraction | | " + " | ".join(f"{kvm[c]:.3f}" for c in cols) + " |")
    norm = normalised_scores(results)
    if norm and any(c != FULL for c in cols):
        lines.append("| normalised (per task@length) | | " + " | ".join(f"{norm[c]:.3f}" if c in norm else "-" for c in cols) + " |")
        if intervals:
            lines.append("| normalised 95 % interval (bootstrap over prompts) | | " + " | ".join(
                f"{intervals[c][0]:.3f}-{intervals[c][1]:.3f}" if c in intervals else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def print_table(results: Sequence[Mapping], title: str = "score (0-100)") -> None:
    """The results table on stdout with rich."""
    from rich.console import Console
    from rich.table import Table

    rows, cols, cells = pivot(results)
    table = Table(title=title)
    table.add_column("task")
    for c in cols:
        table.add_column(c, justify="right")
    for t in rows:
        table.add_row(t, *[f"{cells[(t, c)]:.2f}" if (t, c) in cells else "-" for c in cols])
    means, kvm = column_means(results), column_means(results, "kv_fraction")
    table.add_row("mean", *[f"{means[c]:.2f}" for c in cols], style="bold")
    table.add_row("kv fraction", *[f"{kvm[c]:.3f}" for c in cols])
    Console(width=max(100, 20 + 14 * len(cols))).print(table)


def plot_score_vs_kv(results: Sequence[Mapping], path: str | Path) -> Path:
    """One panel per task: score against kv_fraction, one line per policy (its budgets joined)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch (Jupyter keeps inline plots)

    tasks = []
    for r in results:
        t = task_label(r["task"], r.get("length"))
        if t not in tasks:
            tasks.append(t)
    ncol = min(4, len(tasks)) or 1
    nrow = math.ceil(len(tasks) / ncol) or 1
    fig = Figure(figsize=(3.6 * ncol, 3.0 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, t in zip(axes.flat, tasks):
        by_policy: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in results:
            if task_label(r["task"], r.get("length")) == t:
                by_policy[row_method(r)].append((float(r["kv_fraction"]), float(r["score"])))
        for policy, pts in sorted(by_policy.items()):
            pts.sort()
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)[0]
            if policy == FULL:  # the reference level every budget is compared with
                ax.axhline(pts[-1][1], color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_title(t, fontsize=9)
        ax.set_xlabel("kv fraction")
        ax.set_ylabel("score")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def write_jsonl(rows: Iterable[Mapping], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows).encode())
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a killed run) is skipped."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def write_results(results: Sequence[Mapping], out_dir: str | Path,
                  intervals: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Path]:
    """results.jsonl, results.md and score_vs_kv.png in ``out_dir``."""
    out = Path(out_dir)
    paths = {"results": write_jsonl(results, out / "results.jsonl")}
    paths["table"] = out / "results.md"
    atomic_write_bytes(paths["table"], markdown_table(results, intervals).encode())
    if results:
        paths["plot"] = plot_score_vs_kv(results, out / "score_vs_kv.png")
    return paths
