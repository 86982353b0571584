# %% [markdown]
# # Score against kept cache
#
# Reads the `results.jsonl` written by `python -m experiments.evaluate` (or by the main job, under
# `outputs/main/<model>/evaluation/`): one row per task, context length, policy and budget, with the
# task score (0-100) and the **kept cache** (`kv_fraction`: stored / seen tokens after the prefill,
# mean over layers). It draws one panel per task (the evaluation's own plot), then the summary over
# tasks: the paper's normalised score (score / full-cache score, averaged over tasks) against the
# mean kept cache, one line per policy joining its budgets.
#
#     NB_RESULTS=outputs/main/smollm2/evaluation/results.jsonl .venv/bin/python notebooks/score_vs_kv.py
#
# | variable | default | meaning |
# |---|---|---|
# | `NB_MODEL` | `smollm2` | model name in the default results path |
# | `NB_RESULTS` | `outputs/main/<model>/evaluation/results.jsonl` | one or more results files, comma-separated (rows are pooled) |
# | `NB_OUT` | `outputs/notebooks` | where figures and JSON go (relative paths start at the repository root) |

# %%
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # run as a script: files only
import matplotlib.pyplot as plt

import experiments
from experiments.lib import reporting

ROOT = Path(experiments.__file__).resolve().parents[1]
MODEL = os.environ.get("NB_MODEL", "smollm2")
RESULTS = [ROOT / p for p in os.environ.get("NB_RESULTS", f"outputs/main/{MODEL}/evaluation/results.jsonl").split(",")]
OUT = ROOT / os.environ.get("NB_OUT", "outputs/notebooks")
OUT.mkdir(parents=True, exist_ok=True)

# %%
missing = [str(p) for p in RESULTS if not p.is_file()]
assert not missing, f"no results file {missing}; run python -m experiments.evaluate (or make run) first"
results = [r for p in RESULTS for r in reporting.read_jsonl(p)]
print(reporting.markdown_table(results))

# %% [markdown]
# ## Summary over tasks
#
# Normalised score needs the full-cache reference (`compare=[full]` or `policy=full`); without it the
# mean score (0-100) is plotted instead.

# %%
columns = reporting.columns(results)
mean_score = reporting.column_means(results)
kv = reporting.column_means(results, "kv_fraction")
norm = reporting.normalised_scores(results)
y, ylabel = (norm, "normalised score (full cache = 1)") if norm else (mean_score, "mean score (0-100)")
lines = defaultdict(list)
for r in results:
    label, method = reporting.row_label(r), reporting.row_method(r)
    if label in y and (kv[label], y[label]) not in lines[method]:
        lines[method].append((kv[label], y[label]))
fig, ax = plt.subplots(figsize=(5.5, 4))
for policy, pts in sorted(lines.items()):
    pts.sort()
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
if reporting.FULL in y:
    ax.axhline(y[reporting.FULL], color="grey", ls="--", lw=0.8)
tasks = sorted({reporting.task_label(r["task"], r.get("length")) for r in results})
ax.set(xlabel="kept cache (mean over tasks)", ylabel=ylabel, xlim=(0, 1.05), title=f"mean over {len(tasks)} task(s)",
       ylim=(0, max(1.1, *y.values()) + 0.05) if norm else (-3, 103))
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(OUT / "score_vs_kv_summary.png", dpi=110)

# %% [markdown]
# ## Per task
#
# `experiments.lib.reporting.plot_score_vs_kv`: the plot `python -m experiments.evaluate` writes.

# %%
per_task = reporting.plot_score_vs_kv(results, OUT / "score_vs_kv.png")
if "ipykernel" in sys.modules:
    from IPython.display import Image, display

    display(Image(str(per_task)))

# %%
summary = {"files": [str(p) for p in RESULTS], "tasks": tasks, "columns": columns, "mean_score": mean_score,
           "normalised_score": norm, "kv_fraction": kv}
(OUT / "score_vs_kv.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({c: [kv[c], norm.get(c, mean_score[c])] for c in columns}))
