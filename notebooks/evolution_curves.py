# %% [markdown]
# # Evolution curves
#
# CMA-ES evolves the NAMM's parameters: each generation samples a population around the mean,
# scores every candidate with the fitness (the `stats` proxy, or the task score through the runtime)
# and moves the mean and step size sigma. `python -m experiments.train_namm` logs one row per
# generation to `<run>/metrics.jsonl` (`experiments.lib.tracking.Tracker`): `fitness/best`, `/mean`,
# `/worst` over the population, `es/sigma`, the held-out fitness of the mean (`eval/mean_fitness`,
# every `eval_every` generations) and the fitness details (`fitness/<detail>_mean`, e.g. the kept
# cache `fitness/kept_fraction_mean`). Incremental stages continue the generation count, so the files
# of a schedule (i1, i2, i3; or the main job's stats and task stages) join into one curve. The baselines a
# stage scored on its held-out prompts at its end (`heldout_references` in `train_summary.json`) are drawn as
# horizontal lines.
#
#     NB_METRICS=outputs/namm/smollm2/builtin_i1/metrics.jsonl,outputs/namm/smollm2/builtin_i2/metrics.jsonl \
#         .venv/bin/python notebooks/evolution_curves.py
#
# | variable | default | meaning |
# |---|---|---|
# | `NB_MODEL` | `smollm2` | model name in the default paths |
# | `NB_METRICS` | the main job's `outputs/main/<model>/{stats,task}/metrics.jsonl` (those that exist) | comma-separated metrics files, in stage order |
# | `NB_OUT` | `outputs/notebooks` | where figures and JSON go (relative paths start at the repository root) |

# %%
import json
import os
import sys
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # run as a script: files only
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator

import experiments
from experiments.lib.tracking import read_metrics

ROOT = Path(experiments.__file__).resolve().parents[1]
MODEL = os.environ.get("NB_MODEL", "smollm2")
if "NB_METRICS" in os.environ:
    METRICS = [ROOT / p for p in os.environ["NB_METRICS"].split(",") if p]
    missing = [str(p) for p in METRICS if not p.is_file()]
    assert not missing, f"no metrics file {missing}"
else:
    METRICS = [p for p in (ROOT / f"outputs/main/{MODEL}/{s}/metrics.jsonl" for s in ("stats", "task")) if p.is_file()]
    assert METRICS, f"no metrics under outputs/main/{MODEL}; run make run (or set NB_METRICS)"
OUT = ROOT / os.environ.get("NB_OUT", "outputs/notebooks")
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## One row per generation
#
# Rows without a generation (other trackers writing to the same file) are skipped; a generation
# logged twice (a resumed run) keeps its last row.

# %%
rows = {}
for path in METRICS:
    for r in read_metrics(path):
        if "generation" in r and "fitness/best" in r:
            stage = r.get("stage", path.parent.name)
            rows[(stage, r["generation"])] = {**r, "stage": stage}
rows = sorted(rows.values(), key=lambda r: r["generation"])
stages = list(dict.fromkeys(r["stage"] for r in rows))
details = sorted({k for r in rows for k in r
                  if k.startswith("fitness/") and k.endswith("_mean") and k != "fitness/mean"})
print(f"{len(rows)} generations in {len(stages)} stage(s): {stages}; details: {details}")


def series(key, rs=rows):
    return [r["generation"] for r in rs if r.get(key) is not None], [r[key] for r in rs if r.get(key) is not None]


# %% [markdown]
# ## Curves
#
# Fitness scales differ between stages (stats proxy vs normalised task score), so each stage has its
# own colour; dotted lines mark where a stage starts.

# %%
n_panels = 2 + bool(details)
fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 3.8), squeeze=False)
ax_fit, ax_sigma = axes[0, 0], axes[0, 1]
for i, stage in enumerate(stages):
    rs = [r for r in rows if r["stage"] == stage]
    color = f"C{i}"
    g, best = series("fitness/best", rs)
    _, mean = series("fitness/mean", rs)
    _, worst = series("fitness/worst", rs)
    ax_fit.fill_between(g, worst, best, color=color, alpha=0.15)
    ax_fit.plot(g, best, color=color, lw=1, label=f"{stage}: best")
    ax_fit.plot(g, mean, color=color, lw=2, label=f"{stage}: mean")
    ge, ev = series("eval/mean_fitness", rs)
    ax_fit.plot(ge, ev, "D-" if len(ge) > 1 else "D", color=color, mec="black", label=f"{stage}: held-out (ES mean)")
    ax_sigma.plot(*series("es/sigma", rs), color=color, label=stage)
    if i:
        for ax in axes[0]:
            ax.axvline(g[0] - 0.5, color="grey", ls=":", lw=1)
    if details:
        for j, key in enumerate(details):
            axes[0, 2].plot(*series(key, rs), color=color, ls=["-", "--", "-.", ":"][j % 4],
                            label=f"{stage}: {key.removeprefix('fitness/')}")
# The hand-designed baselines on the same held-out prompts under the same fitness (``heldout_references`` in the
# stage's train_summary.json, written at its end): horizontal lines, as the bar the held-out curve has to clear.
references = {}
for path in METRICS:
    summary_path = path.parent / "train_summary.json"
    if summary_path.is_file():
        for name, ref in (json.loads(summary_path.read_text()).get("heldout_references") or {}).items():
            if name != "namm" and ref.get("fitness") is not None:
                references[f"{path.parent.name}: {name}"] = float(ref["fitness"])
for k, (name, value) in enumerate(sorted(references.items())):
    ax_fit.axhline(value, color=f"C{len(stages) + k}", ls="--", lw=1.2, label=f"{name} (held-out)")
ax_fit.set(xlabel="generation", ylabel="fitness", title="population fitness (band: worst to best)")
ax_sigma.set(xlabel="generation", ylabel="sigma", title="CMA-ES step size")
if details:
    axes[0, 2].set(xlabel="generation", title="fitness details (population mean)")
for ax in axes[0]:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "evolution_curves.png", dpi=110)

# %%
summary = {"files": [str(p) for p in METRICS], "stages": stages,
           "generation": [r["generation"] for r in rows], "stage": [r["stage"] for r in rows],
           **{k: series(f"fitness/{k}")[1] for k in ("best", "mean", "worst")},
           "sigma": series("es/sigma")[1],
           "eval": dict(zip(("generation", "mean_fitness"), series("eval/mean_fitness"))),
           "details": {k: series(k)[1] for k in details}, "heldout_references": references}
(OUT / "evolution_curves.json").write_text(json.dumps(summary, indent=1))
best_eval = max(summary["eval"]["mean_fitness"], default=None)
print(f"generations {rows[0]['generation']}-{rows[-1]['generation']}, last mean fitness {summary['mean'][-1]:.4f}, "
      f"best held-out {best_eval}")
