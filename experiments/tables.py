"""The NAMM paper's LongBench table layout, regenerated from results files.

    python -m experiments.tables outputs/.../results.jsonl [more.jsonl ...] [--reference llama3_8b_32k_full_cache]
                                 [--by-length] [--out DIR]

Rows are methods (``full``, ``h2o@0.25``, ``namm``, ...); columns are the LongBench categories
(Single-Doc QA, Multi-Doc QA, Summarization, Few-shot, Synthetic, Code) as means over their tasks,
the overall mean over tasks (the paper's convention: 28.86 for full-cache Llama-3-8B), the
normalised score (mean over tasks of score / full-cache score on the same task, as in the paper's
fitness), and the kept cache (mean kv_fraction, % of the full cache). A second table gives every
task. Markdown and LaTeX are written to ``tables.md`` / ``tables.tex``.

Scores of the same task at several context lengths are averaged, weighted by prompt count, unless
``--by-length`` keeps each length as its own task (``passkey@1024``).

``--intervals`` reads the ``predictions.jsonl`` beside each results file and gives, per method, the normalised
score on the prompts every method ran and its 95 % paired bootstrap interval (each task row at one length, as
``experiments.evaluate`` reports it: ``reporting.paired_bootstrap``); ``--versus METHOD`` adds each method's paired difference to
that one (interval and the share of resamples where it is ahead). Written to ``intervals.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from experiments.lib.reporting import FULL, paired_bootstrap, row_label
from experiments.tasks.registry import REGISTRY
from namm.shards import atomic_write_bytes

CATEGORIES = ("Single-Doc QA", "Multi-Doc QA", "Summarization", "Few-shot", "Synthetic", "Code")
REFERENCE_FILE = Path(__file__).with_name("reference_scores.json")


class TablesError(ValueError):
    """Results that cannot be tabulated (missing file, bad row)."""


def _jsonl(path: Path):
    """``(line number, object)`` for each non-empty line of a JSONL file; a broken line is a TablesError."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise TablesError(f"{path}:{i} is not JSON ({e})") from None


def _results_path(path: str | Path) -> Path:
    path = Path(path)
    return path / "results.jsonl" if path.is_dir() else path


def read_results(paths: Iterable[str | Path]) -> list[dict]:
    rows = []
    for path in paths:
        path = _results_path(path)
        if not path.exists():
            raise TablesError(f"no results file at {path}; run `python -m experiments.evaluate` first")
        for i, row in _jsonl(path):
            missing = {"task", "policy", "score"} - set(row)
            if missing:
                raise TablesError(f"{path}:{i} lacks {sorted(missing)}; is this a results.jsonl file?")
            rows.append({**row, "_source": f"{path}:{i}"})
    return rows


def reference_rows(name: str) -> list[dict]:
    refs = json.loads(REFERENCE_FILE.read_text())
    if name not in refs:
        raise TablesError(f"unknown reference {name!r}; known: {sorted(refs)}")
    ref = refs[name]
    if "scores" not in ref:
        raise TablesError(f"reference {name!r} has no per-task scores")
    return [{"task": t, "policy": f"{ref['policy']} (reference)", "budget": None, "score": s,
             "kv_fraction": 1.0 if ref["policy"] == FULL else None, "n": 1} for t, s in ref["scores"].items()]


def check_labels(rows: Sequence[Mapping]) -> None:
    """Two results rows under one column label must come from the same policy config: results of
    different policies are never merged into one column."""
    seen: dict[str, Mapping] = {}
    for r in rows:
        cfg = r.get("policy_config")
        if cfg is None:
            continue
        first = seen.setdefault(row_label(r), r)
        if first["policy_config"] != cfg:
            raise TablesError(
                f"column {row_label(r)!r} would merge two different policy runs: {first.get('_source', '?')} "
                f"({json.dumps(first['policy_config'], sort_keys=True)}) and {r.get('_source', '?')} "
                f"({json.dumps(cfg, sort_keys=True)}); rerun one of them with its own label "
                f"(compare=[{{name: ..., label: NEW}}])")


def per_task(rows: Sequence[Mapping], by_length: bool = False) -> dict[str, dict[str, dict]]:
    """{method: {task: {"score", "kv_fraction", "n"}}}, lengths merged (weighted by n) unless by_length.

    A method is a run label (``row_label``); rows of different policy configs under one label are an
    error (``check_labels``)."""
    check_labels(rows)
    acc: dict[tuple[str, str], list[Mapping]] = defaultdict(list)
    for r in rows:
        task = r["task"] if not (by_length and r.get("length") is not None) else f"{r['task']}@{r['length']}"
        acc[(row_label(r), task)].append(r)
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for (method, task), rs in acc.items():
        n = sum(int(r.get("n") or 1) for r in rs)
        kv = [r.get("kv_fraction") for r in rs]
        out[method][task] = {
            "score": sum(float(r["score"]) * int(r.get("n") or 1) for r in rs) / n,
            "kv_fraction": (sum(float(k) * int(r.get("n") or 1) for k, r in zip(kv, rs)) / n
                            if all(k is not None for k in kv) else None),
            "n": n,
        }
    return dict(out)


def _category(task: str) -> str:
    spec = REGISTRY.get(task.split("@")[0])
    return spec.category if spec else "Other"


def summarise(tasks_by_method: Mapping[str, Mapping[str, dict]], full: str = FULL) -> dict[str, dict]:
    """Per method: category means, overall mean over tasks, normalised score, mean kv fraction."""
    full_scores = {t: v["score"] for t, v in tasks_by_method.get(full, {}).items()}
    out = {}
    for method, tasks in tasks_by_method.items():
        cats: dict[str, list[float]] = defaultdict(list)
        for t, v in tasks.items():
            cats[_category(t)].append(v["score"])
        ratios = [v["score"] / full_scores[t] for t, v in tasks.items() if full_scores.get(t)]
        kvs = [v["kv_fraction"] for v in tasks.values() if v["kv_fraction"] is not None]
        out[method] = {
            "categories": {c: sum(s) / len(s) for c, s in cats.items()},
            "overall": sum(v["score"] for v in tasks.values()) / len(tasks),
            "normalized": sum(ratios) / len(ratios) if ratios else None,
            "kv_percent": 100 * sum(kvs) / len(kvs) if kvs else None,
            "n_tasks": len(tasks),
        }
    return out


def _fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _method_order(methods: Iterable[str]) -> list[str]:
    return sorted(methods, key=lambda m: (m != FULL, "reference" not in m, m))


def layout(tasks_by_method: Mapping[str, Mapping[str, dict]]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(summary header, summary rows, per-task header, per-task rows) as strings."""
    summary = summarise(tasks_by_method)
    cats = [c for c in CATEGORIES if any(c in s["categories"] for s in summary.values())]
    cats += sorted({c for s in summary.values() for c in s["categories"]} - set(cats))
    methods = _method_order(tasks_by_method)
    head = ["Method", *cats, "Overall", "Normalised", "KV cache %"]
    body = [[m, *[_fmt(summary[m]["categories"].get(c)) for c in cats], _fmt(summary[m]["overall"]),
             _fmt(summary[m]["normalized"]), _fmt(summary[m]["kv_percent"], 1)] for m in methods]
    tasks = sorted({t for ts in tasks_by_method.values() for t in ts},
                   key=lambda t: (CATEGORIES.index(_category(t)) if _category(t) in CATEGORIES else 99, t))
    thead = ["Method", *tasks]
    tbody = [[m, *[_fmt(tasks_by_method[m].get(t, {}).get("score")) for t in tasks]] for m in methods]
    return head, body, thead, tbody


def markdown(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def latex(head: Sequence[str], body: Sequence[Sequence[str]], caption: str) -> str:
    esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("@", r"{@}")  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(head) - 1) + "}", r"\toprule",
             " & ".join(esc(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(esc(c) for c in r) + r" \\" for r in body]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{esc(caption)}}}", r"\end{table}"]
    return "\n".join(lines)


def headline(summary: Mapping[str, dict]) -> str:
    namm = [m for m in summary if m.split("@")[0].split("[")[0] == "namm"]
    others = [m for m in summary if m != FULL and "reference" not in m]
    pick = namm[0] if namm else (max(others, key=lambda m: summary[m]["normalized"] or 0) if others else FULL)
    norm = summary[pick]["normalized"]
    return f"{pick}_normalized_overall: {_fmt(norm, 3)} (target: >= 1.0 at <= 50% KV; paper: 1.11 for NAMM on Llama-3-8B)"


def read_predictions(paths: Iterable[str | Path]) -> list[dict]:
    """The ``predictions.jsonl`` beside each results file; a prompt that two files both ran under one label must
    have the same score in both (e.g. the full cache run by two evaluations)."""
    seen: dict[tuple, tuple[float, str]] = {}
    out = []
    for path in paths:
        if not Path(path).exists():
            raise TablesError(f"no run directory or results file at {path}")
        pred = _results_path(path).with_name("predictions.jsonl")
        if not pred.exists():
            raise TablesError(f"--intervals needs {pred} (written by python -m experiments.evaluate beside its "
                              "results.jsonl)")
        for i, p in _jsonl(pred):
            key = (p["task"], p.get("length"), row_label(p), str(p["_id"]))
            if key in seen:
                if seen[key][0] != float(p["score"]):
                    raise TablesError(f"{pred}:{i}: {key} scored {p['score']} here and {seen[key][0]} in "
                                      f"{seen[key][1]}; two different runs under one label (give one a label)")
                continue
            seen[key] = (float(p["score"]), f"{pred}:{i}")
            out.append(p)
    return out


def intervals(predictions: Sequence[Mapping], versus: str | None = None, n_boot: int = 2000,
              seed: int = 0) -> dict[str, dict]:
    """Per method: the normalised score's 95 % paired bootstrap interval, and with ``versus`` the paired
    difference to that method (interval, share of resamples where this method is ahead)."""
    import numpy as np

    point, draws, prompts, means = paired_bootstrap(predictions, n_boot=n_boot, seed=seed)
    if versus is not None and versus not in draws:
        raise TablesError(f"--versus {versus!r} is not a method of these predictions; methods: {sorted(draws)}")
    def ci(x):   # None where no resample counts (every full-cache score 0)
        x = x[np.isfinite(x)]
        return [round(float(q), 4) for q in np.quantile(x, [0.025, 0.975])] if x.size else None

    out = {}
    for m, d in draws.items():
        row = {"normalised": None if m not in point else round(float(point[m]), 4), "ci95": ci(d),
               "prompts": prompts[m], "scores": means[m]}
        if versus is not None and m != versus:
            diff = d - draws[versus]
            ok = np.isfinite(diff)
            row.update({"versus": versus, "diff_ci95": ci(diff),
                        "p_ahead": round(float(np.mean(diff[ok] > 0)), 4) if ok.any() else None})
        out[m] = row
    if FULL in means:
        out[FULL] = {"normalised": 1.0, "ci95": [1.0, 1.0], "prompts": max(prompts.values(), default=0),
                     "scores": means[FULL]}
    return out


def intervals_markdown(iv: Mapping[str, dict]) -> str:
    versus = next((r["versus"] for r in iv.values() if "versus" in r), None)
    rows = sorted({t for r in iv.values() for t in r["scores"]})
    head = ["Method", *rows, "Normalised", "95 % CI", "prompts"] + ([f"minus {versus}: 95 % CI", "share ahead"]
                                                                   if versus else [])
    body = []
    for m in sorted(iv, key=lambda m: -(iv[m]["normalised"] or 0)):
        r = iv[m]
        cells = [m, *[_fmt(r["scores"].get(t)) for t in rows], _fmt(r["normalised"], 3),
                 "-" if r["ci95"] is None else f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]", str(r["prompts"])]
        if versus:
            d = r.get("diff_ci95")
            cells += ["-" if d is None else f"[{d[0]:+.3f}, {d[1]:+.3f}]", _fmt(r.get("p_ahead"))]
        body.append(cells)
    return markdown(head, body)


def _write_tables(tasks_by_method, out: Path, by_length: bool) -> dict:
    """tables.md / .tex / .json in ``out``; returns the summary."""
    head, body, thead, tbody = layout(tasks_by_method)
    how = ("each task at each context length counts as a task (`--by-length`), as `experiments.evaluate` reports it"
           if by_length else "a task's context lengths are merged first (weighted by prompt count); "
           "`--by-length` gives the per task@length figure `experiments.evaluate` reports")
    md = (f"## Summary\n\n{markdown(head, body)}\n\nNormalised: mean over tasks of score / full-cache score; {how}.\n"
          f"\n## Per task\n\n{markdown(thead, tbody)}\n")
    tex = latex(head, body, "Scores per category, overall mean over tasks, normalised score against the full "
                "cache and kept cache.") + "\n\n" + latex(thead, tbody, "Scores per task.") + "\n"
    atomic_write_bytes(out / "tables.md", md.encode())
    atomic_write_bytes(out / "tables.tex", tex.encode())
    summary = summarise(tasks_by_method)
    atomic_write_bytes(out / "tables.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    print(md)
    print(f"wrote {out / 'tables.md'}, {out / 'tables.tex'}, {out / 'tables.json'}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="results.jsonl files or run directories")
    ap.add_argument("--reference", default=None, help="add a published row from experiments/reference_scores.json")
    ap.add_argument("--by-length", action="store_true", help="keep each context length as its own task")
    ap.add_argument("--out", default=None, help="directory for tables.md / tables.tex (default: next to the first file)")
    ap.add_argument("--intervals", action="store_true", help="95 %% paired bootstrap intervals of the normalised "
                    "score (reads predictions.jsonl beside each results file)")
    ap.add_argument("--versus", default=None, help="with --intervals: each method's paired difference to this one")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ap.add_argument("--match", default=None, help="with --intervals: only the methods whose label matches this "
                    "regular expression (and the full cache)")
    args = ap.parse_args(argv)
    # with --intervals an evaluation stopped before its end (predictions.jsonl, no results.jsonl yet) counts for
    # the intervals; the score tables take the finished ones
    done = [r for r in args.results if not args.intervals or _results_path(r).exists()]
    out = Path(args.out) if args.out else Path(args.results[0]).resolve().parent if Path(args.results[0]).is_file() \
        else Path(args.results[0])
    tasks_by_method = iv = None
    try:                                        # read and check everything before anything is written
        if done:
            rows = read_results(done)
            if args.reference:
                rows += reference_rows(args.reference)
            tasks_by_method = per_task(rows, by_length=args.by_length)
        if args.intervals:
            preds = read_predictions(args.results)
            if args.match:
                preds = [p for p in preds if row_label(p) == FULL or re.search(args.match, row_label(p))]
            iv = intervals(preds, args.versus, seed=args.seed)
    except TablesError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    summary = _write_tables(tasks_by_method, out, args.by_length) if tasks_by_method is not None else None
    if iv is not None:
        ivmd = (f"## Normalised score, 95 % paired bootstrap intervals\n\n"
                f"{intervals_markdown(iv)}\n\nEach task at each context length is a task row (as "
                "`experiments.evaluate` reports it); on each row only the prompts that the full cache and every "
                "method ran count (`prompts`: their number over the rows), and every method is resampled on the "
                f"same prompts (2000 resamples, seed {args.seed}).\n")
        atomic_write_bytes(out / "intervals.md", ivmd.encode())
        atomic_write_bytes(out / "intervals.json", (json.dumps(iv, indent=2, sort_keys=True) + "\n").encode())
        print(ivmd)
        print(f"wrote {out / 'intervals.md'}, {out / 'intervals.json'}")
        if summary is None:
            best = max((m for m in iv if m.split("[")[0].split("@")[0] == "namm"), default=None,
                       key=lambda m: iv[m]["normalised"] or 0)
            print(f"{best}_normalised_on_common_prompts: {_fmt(best and iv[best]['normalised'], 3)} "
                  "(target: above SnapKV's and H2O's at the same budget, >= 0.9 of the full cache)")
            return 0
    print(headline(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
