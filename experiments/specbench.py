"""Speculative decoding benchmark: acceptance, tokens per target call, cost ratio c, tokens/s, speedup.

    python -m experiments.specbench drafts.tvd=/path/draft drafts.undistilled=/path/undistilled
    python -m experiments.specbench only=[selfspec]          # self-speculation alone

For every prompt (HumanEval test problems; long-context prompts of the built-in suite) all methods run
back to back, so that CPU contention hits them alike: target-only greedy (our loop, the baseline; and
``generate``), our loop with each draft at each draft length, prompt lookup (our loop), transformers
assisted generation and transformers prompt lookup. Every output is compared with target-only greedy
token for token (``lossless``). With ``small_batch_linear`` (default 6) the target's and the drafts' linear
layers compute 2-6-row products as ``weight @ x.T`` (``spec_decode.torch.linear``): verification calls
cost fewer decode steps on CPU, one-token decoding is unchanged. Writes ``specbench.json``, ``specbench.md`` and
``speedup_vs_draft_length.png``; the headline is printed last.

A suite with ``kind: selfspec`` runs self-speculation instead: the target drafts for itself through a
compressed KV cache (NAMM, H2O, StreamingLLM at each budget; ``SelfSpecProposer``) and verifies with
its full cache. Its rows add the draft's kept KV fraction, the speedup of the decoding phase alone
(the draft's own chunked prefill is part of ``speedup``), and the speedup the measured acceptance
predicts at the measured c and at c = budget (KV-dominated decoding: a draft step reads a
budget-fraction of the KV cache, weight reads ignored).
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from namm.shards import atomic_write_bytes, atomic_write_json
from spec_decode.torch import (DraftHandle, DraftProposer, PromptLookupProposer, SelfSpecProposer, SpecStats,
                               autoregressive_generate, hf_generate, speculative_generate, use_small_batch_linear)

log = logging.getLogger(__name__)


class SpecbenchError(ValueError):
    """Bad benchmark configuration (an unknown suite, a draft directory that does not exist)."""


KV_DOMINATED = ("c = budget: a draft step reads a budget-fraction of the KV cache and decoding time is dominated "
                "by KV reads (long context; weight reads and the policy's own cost ignored)")


class SuitePrompt(NamedTuple):
    id: str
    ids: list[int]
    context: int          # the task's nominal context length (a built-in row's ``context_tokens``), else len(ids)
    task: str


def suite_prompts(tokenizer, suite) -> list[SuitePrompt]:
    from experiments.tasks import build_prompt, load_task

    rows = load_task(OmegaConf.to_container(suite.task, resolve=True), tokenizer, split=suite.split)
    out = []
    for row in rows:
        p = build_prompt(row, tokenizer, chat=bool(suite.get("chat", False)), max_prompt_tokens=suite.get("max_prompt_tokens"))
        ids = list(p.context_ids) + list(p.question_ids)
        out.append(SuitePrompt(row["_id"], ids, int(row.get("context_tokens") or len(ids)), str(row.get("dataset", ""))))
    return out


def summarize(stats: SpecStats, base: SpecStats, per_token_target: float) -> dict:
    """Table row: alpha, tokens per target call, measured c, tokens/s, speedup over target-only."""
    c = (stats.draft_time / stats.draft_calls) / per_token_target if stats.draft_calls else 0.0
    return {"alpha": stats.acceptance_rate if stats.proposed else float("nan"),
            "per_position": stats.per_position, "tokens_per_call": stats.tokens_per_call, "c": c,
            "tokens_per_s": stats.new_tokens / max(stats.wall_time, 1e-9),
            "speedup": base.wall_time / max(stats.wall_time, 1e-9), "new_tokens": stats.new_tokens,
            "wall_time": stats.wall_time, "mean_gamma": float(np.mean(stats.gammas)) if stats.gammas else 0.0}


def expected_speedup(alpha: float, gamma: int, c: float) -> float:
    """Walltime speedup of i.i.d. acceptance ``alpha`` at draft length ``gamma`` and cost ratio ``c`` (Leviathan
    et al. 2023): (1 - alpha^(gamma+1)) / ((1 - alpha)(gamma c + 1))."""
    tokens = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens / (gamma * c + 1)


def _policy_dir(path) -> bool:
    """A policy directory on disk, or the name of a bundled one (``namm.pretrained``)."""
    from namm import pretrained

    try:
        return pretrained.resolve(path).is_dir()
    except FileNotFoundError:
        return False


def selfspec_policies(suite) -> tuple[dict[str, dict], dict[str, str]]:
    """The suite's draft-cache policies ``{name: cfg}``, and ``{name: reason}`` of NAMMs without a directory."""
    policies, skipped = {}, {}
    for name, pol in suite.policies.items():
        pol = OmegaConf.to_container(pol, resolve=True)
        path = pol.get("path")
        if pol["name"] == "namm" and path != "untrained" and not (path and _policy_dir(path)):
            skipped[name] = (f"no NAMM policy directory or bundled policy {path} (train one or set "
                             f"suites.<suite>.policies.{name}.path)")
            log.warning("selfspec: skipping %s: %s", name, skipped[name])
            continue
        policies[name] = pol
    return policies, skipped


def run_selfspec(target, eos, prompts, suite, desc: str) -> tuple[dict, dict, dict]:
    """Target-only greedy, then self-speculation with each draft-cache policy at each budget, per prompt.

    Returns (rows, lossless, info): rows are ``summarize`` rows plus policy, budget, kv_fraction,
    decode_speedup and the predicted speedups, over all prompts; ``info["by_context"]`` and
    ``info["by_task"]`` hold the same rows per context length and per task (each against target-only
    decoding of the same prompts), ``info["per_prompt"]`` each run's acceptance counts, and ``info``
    records the c assumption and skipped policies.
    """
    policies, skipped = selfspec_policies(suite)
    refresh = {name: _refresh_settings(suite, pol) for name, pol in policies.items()}
    gamma, n_new = int(suite.gamma), int(suite.max_new_tokens)
    acc: dict[tuple, SpecStats] = defaultdict(SpecStats)       # (key, group): group None (all prompts),
    # ("context", length) or ("task", name)
    kv: dict[tuple, list[float]] = defaultdict(list)
    ok: dict[str, bool] = defaultdict(lambda: True)
    meta, per_prompt = {}, []
    for pid, ids, ctx, task in tqdm(prompts, desc=desc):
        x = torch.tensor([ids])
        ref, st = autoregressive_generate(target, x, n_new, eos_token_id=eos)
        groups = (None, ("context", ctx), ("task", task))
        for group in groups:
            acc[("target", group)] = acc[("target", group)].merge(st)
        for name, pol in policies.items():
            for budget in suite.budgets:
                key = f"{name}_{budget:g}@{gamma}"
                proposer = SelfSpecProposer(target, {**pol, "budget": budget}, **refresh[name])
                o, s = speculative_generate(target, x, proposer, n_new, gamma=gamma, eos_token_id=eos)
                same = o.tolist() == ref.tolist()
                ok[key] &= same
                for group in groups:
                    acc[(key, group)] = acc[(key, group)].merge(s)
                    kv[(key, group)].append(proposer.mean_kv_fraction)
                meta[key] = {"policy": name, "budget": budget, **refresh[name],
                             "policy_config": {**pol, "budget": budget}}   # what ran, for tracing a row back
                per_prompt.append({"id": pid, "task": task, "context": ctx, "key": key, "accepted": sum(s.accepted),
                                   "proposed": sum(s.proposed), "alpha": s.acceptance_rate if s.proposed else None,
                                   "kv_fraction": proposer.mean_kv_fraction, "refreshes": proposer.refreshes,
                                   "lossless": same})
    named = sorted({g for _, g in acc if g is not None})     # (kind, value) of every context and task
    info = {"gamma": gamma, "predicted_speedup_kv": KV_DOMINATED, "skipped": skipped, "policies": policies,
            **{f"by_{kind}": {str(v): _selfspec_rows(acc, kv, meta, (kind, v), gamma)
                              for k, v in named if k == kind} for kind in ("context", "task")},
            "per_prompt": per_prompt}
    return _selfspec_rows(acc, kv, meta, None, gamma), dict(ok), info


REFRESH_DEFAULTS = {"refresh_every": None, "refresh_window": 32, "fork_prefill": False,   # SelfSpecProposer's
                    "carry_state": False}


def _refresh_settings(suite, pol: dict) -> dict:
    """``SelfSpecProposer``'s refresh keywords for one policy entry: the entry's own keys (taken out of ``pol``,
    which then holds only policy knobs), else the suite's, else the defaults."""
    return {k: pol.pop(k) if k in pol else suite.get(k, default) for k, default in REFRESH_DEFAULTS.items()}


def _selfspec_rows(acc: dict, kv: dict, meta: dict, group, gamma: int) -> dict:
    """Rows of one prompt group (``("context", length)``, ``("task", name)``, or None for all prompts) of
    ``run_selfspec``."""
    base = acc[("target", group)]
    per_token = (base.target_time - base.prefill_time) / max(base.rounds, 1)
    rows = {k: summarize(s, base, per_token) for (k, g), s in acc.items() if g == group}
    rows["target"]["ms_per_token"] = 1e3 * per_token
    base_decode = base.wall_time - base.prefill_time
    for key, m in meta.items():
        r, s = rows[key], acc[(key, group)]
        r.update(m, kv_fraction=float(np.mean(kv[(key, group)])),
                 decode_speedup=base_decode / max(s.wall_time - s.prefill_time, 1e-9),
                 predicted_speedup=expected_speedup(r["alpha"], gamma, r["c"]),
                 predicted_speedup_kv=expected_speedup(r["alpha"], gamma, float(m["budget"])))
    return rows


def check_drafts(cfg: DictConfig) -> None:
    """Fail before any model loads when a configured draft directory does not exist."""
    for name, path in cfg.drafts.items():
        if path and not Path(path).is_dir():
            raise SpecbenchError(
                f"drafts.{name}={path} does not exist; train it with `python -m experiments.distill_draft "
                f"export_dir={path}` (distill.steps=0 for the undistilled draft), point drafts.{name} at an "
                f"exported draft, or drop it with '~drafts.{name}'")
    for key in ("sweep_drafts", "hf_drafts"):
        unknown = sorted(set(cfg.get(key) or []) - {k for k, v in cfg.drafts.items() if v})
        if unknown:
            raise SpecbenchError(f"{key} lists {unknown}, not in drafts ({sorted(cfg.drafts)}); "
                                 f"add them as +drafts.NAME=DIR or remove them from {key}")


def run(cfg: DictConfig) -> dict:
    from experiments.lib.models import load_model

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output_dir)
    only = cfg.get("only")
    unknown = sorted(set(only or []) - set(cfg.suites))
    if unknown:
        raise SpecbenchError(f"only={list(only)} names unknown suites {unknown}; known: {sorted(cfg.suites)}")
    suites = {k: s for k, s in cfg.suites.items() if only is None or k in only}
    kinds = {k: s.get("kind", "draft") for k, s in suites.items()}
    if "draft" in kinds.values():
        check_drafts(cfg)
    target, tok = load_model(cfg.target)
    eos = target.generation_config.eos_token_id
    drafts = {}
    if "draft" in kinds.values():
        drafts = {name: DraftHandle.from_pretrained(path, target, tok) for name, path in cfg.drafts.items() if path}
    few_rows = int(cfg.get("small_batch_linear") or 1)
    for model in [target] + [d.model for d in drafts.values()]:
        use_small_batch_linear(model, few_rows)
    gammas = list(cfg.draft_lengths)
    results, lossless, selfspec = {}, {}, {}
    for suite_name, suite in suites.items():
        prompts = suite_prompts(tok, suite)
        if kinds[suite_name] == "selfspec":
            results[suite_name], lossless[suite_name], selfspec[suite_name] = run_selfspec(
                target, eos, prompts, suite, suite_name)
            alphas = {k: round(v["alpha"], 3) for k, v in results[suite_name].items()}
            log.info("%s alpha: %s", suite_name, json.dumps(alphas))
            continue
        acc: dict[str, SpecStats] = defaultdict(SpecStats)
        ok: dict[str, bool] = defaultdict(lambda: True)
        for pid, ids, _, _ in tqdm(prompts, desc=suite_name):
            x = torch.tensor([ids])
            n_new = int(suite.max_new_tokens)
            ref, st = autoregressive_generate(target, x, n_new, eos_token_id=eos)
            acc["target"] = acc["target"].merge(st)
            runs = []
            for name, d in drafts.items():
                for g in (gammas if name in cfg.sweep_drafts else [cfg.gamma]):
                    runs.append((f"{name}@{g}", lambda g=g, d=d: speculative_generate(
                        target, x, DraftProposer(d), n_new, gamma=g, eos_token_id=eos)))
                for gate in (cfg.get("draft_confidence") or []) if name in cfg.sweep_drafts else []:
                    runs.append((f"{name}_p{gate:g}@{cfg.gamma}", lambda gate=gate, d=d: speculative_generate(
                        target, x, DraftProposer(d, min_confidence=float(gate)), n_new, gamma=int(cfg.gamma),
                        eos_token_id=eos)))
            for g in gammas:
                runs.append((f"prompt_lookup@{g}", lambda g=g: speculative_generate(
                    target, x, PromptLookupProposer(cfg.ngram), n_new, gamma=g, eos_token_id=eos)))
            if cfg.hf_methods:
                runs.append(("hf_target", lambda: hf_generate(target, x, n_new, eos_token_id=eos)))
                runs.append((f"hf_prompt_lookup@{cfg.gamma}", lambda: hf_generate(
                    target, x, n_new, prompt_lookup=int(cfg.gamma), eos_token_id=eos)))
                for name in cfg.hf_drafts:
                    runs.append((f"hf_assisted_{name}@{cfg.gamma}", lambda name=name: hf_generate(
                        target, x, n_new, draft=drafts[name].model, draft_length=int(cfg.gamma), eos_token_id=eos)))
            for key, fn in runs:
                o, s = fn()
                ok[key] &= o.tolist() == ref.tolist()
                acc[key] = acc[key].merge(s)
        base = acc["target"]
        per_token = (base.target_time - base.prefill_time) / max(base.rounds, 1)
        results[suite_name] = {k: summarize(s, base, per_token) for k, s in acc.items()}
        results[suite_name]["target"]["ms_per_token"] = 1e3 * per_token
        lossless[suite_name] = {k: v for k, v in ok.items()}
        log.info("%s: %s", suite_name, json.dumps({k: round(v["speedup"], 3) for k, v in results[suite_name].items()}))
    report = {"results": results, "lossless": lossless,
              "drafts": {k: str(v) for k, v in cfg.drafts.items() if v and k in drafts},
              "kinds": kinds, "selfspec": selfspec, "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write_json(out / "specbench.json", report)
    atomic_write_bytes(out / "specbench.md", table(results, lossless, kinds, selfspec).encode())
    drafted = {k: v for k, v in results.items() if kinds[k] == "draft"}
    if drafted:
        plot(drafted, out / "speedup_vs_draft_length.png")
    return report


def table(results: dict, lossless: dict, kinds: dict | None = None, selfspec: dict | None = None) -> str:
    lines = []
    for suite, rows in results.items():
        if (kinds or {}).get(suite) == "selfspec":
            lines += selfspec_table(suite, rows, lossless[suite], (selfspec or {}).get(suite, {}))
            continue
        lines += [f"## {suite}", "", "| method | alpha | tokens/call | c | tokens/s | speedup | lossless |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["speedup"]):
            lines.append(f"| {k} | {r['alpha']:.3f} | {r['tokens_per_call']:.2f} | {r['c']:.3f} | "
                         f"{r['tokens_per_s']:.2f} | {r['speedup']:.2f} | {lossless[suite].get(k, True)} |")
        lines.append("")
    return "\n".join(lines)


def selfspec_groups(rows: dict, info: dict) -> list[tuple[str, dict]]:
    """``[(label, rows)]``: all prompts, then each context length (``4K``), then each task."""
    ctx = sorted(info.get("by_context", {}).items(), key=lambda kv: int(kv[0]))
    return ([("all", rows)] + [(f"{int(g) // 1024}K" if int(g) % 1024 == 0 else str(g), r) for g, r in ctx]
            + sorted(info.get("by_task", {}).items()))


def selfspec_table(suite: str, rows: dict, lossless: dict, info: dict | None = None) -> list[str]:
    """Markdown lines of a self-speculation suite (the draft is the target with a compressed KV cache):
    one row per draft cache and budget over all prompts, then the same per context length and per task."""
    groups = selfspec_groups(rows, info or {})
    lines = [f"## {suite} (self-speculation: the target drafts with a compressed KV cache, verifies with its full one)",
             "", "| prompts | draft cache | budget | kv kept | alpha | tokens/call | c | speedup | decode speedup | "
             "predicted (measured c) | predicted (c = budget) | lossless |", "|" + "---|" * 12]
    for label, grp in groups:
        ms = grp["target"]["ms_per_token"]
        lines.append(f"| {label} | target only ({ms:.1f} ms/token) | 1 | 1.000 | | 1.00 | | 1.00 | 1.00 | | | True |")
        for k, r in sorted(((k, r) for k, r in grp.items() if k != "target"), key=lambda kv: -kv[1]["alpha"]):
            how = ([f"refresh every {r['refresh_every']}, window {r['refresh_window']}"] if r.get("refresh_every")
                   else []) + (["state carried"] if r.get("carry_state") else []) \
                + (["forked prefill"] if r.get("fork_prefill") else [])
            name = k + (f" ({', '.join(how)})" if how else "")
            lines.append(f"| {label} | {name} | {r['budget']:g} | {r['kv_fraction']:.3f} | {r['alpha']:.3f} | "
                         f"{r['tokens_per_call']:.2f} | {r['c']:.3f} | {r['speedup']:.2f} | {r['decode_speedup']:.2f} | "
                         f"{r['predicted_speedup']:.2f} | {r['predicted_speedup_kv']:.2f} | "
                         f"{lossless.get(k, True) if label == 'all' else ''} |")
    lines += ["", f"speedup: end to end, including the draft cache's own chunked prefill (and its refreshes: the "
              "draft cache re-selected from the verifier's full cache by the attention of its last `window` verified "
              "queries, every `refresh every` committed tokens; a forked prefill: the draft cache starts as the verifier's "
              "prefill, re-selected by the prompt's last `window` queries, instead of its own); decode speedup: after the "
              f"prefills. Predicted: (1 - alpha^(g+1)) / ((1 - alpha)(g c + 1)); {KV_DOMINATED}. Lossless: greedy "
              "output equal to target-only greedy on every prompt.", ""]
    return lines


def _draft_of(key: str, drafts) -> str | None:
    """The draft a row ran (``tvd@4`` and the confidence-gated ``tvd_p0.4@4``: ``tvd``), or None."""
    if "@" not in key:
        return None
    name = key.rsplit("@", 1)[0]
    if name in drafts:
        return name
    base = re.sub(r"_p[0-9.]+(e-?[0-9]+)?$", "", name)
    return base if base in drafts else None


def humaneval_headline(report: dict) -> list[str]:
    """``name: value (target: X)`` lines of the HumanEval suite: the fastest method overall, prompt lookup's best,
    and (last) the fastest distilled draft in our loop against the 1.5x target and prompt lookup."""
    rows = report["results"].get("humaneval")
    if not rows:
        return []
    fastest = max((k for k in rows if k not in ("target", "hf_target")), key=lambda k: rows[k]["speedup"], default=None)
    if fastest is None:
        return []
    lookup = [k for k in rows if k.startswith(("prompt_lookup@", "hf_prompt_lookup@"))]
    best_lookup = max(lookup, key=lambda k: rows[k]["speedup"]) if lookup else None
    drafts = [k for k in rows if _draft_of(k, report.get("drafts", {})) not in (None, "undistilled")]
    lines = [f"humaneval_fastest_method: {fastest} ({rows[fastest]['speedup']:.3f}x)"]
    if best_lookup:
        lines.append(f"humaneval_prompt_lookup_speedup: {rows[best_lookup]['speedup']:.3f} ({best_lookup})")
    if drafts:
        best = max(drafts, key=lambda k: rows[k]["speedup"])
        ahead = f" and above prompt lookup's {rows[best_lookup]['speedup']:.3f}" if best_lookup else ""
        lines.append(f"humaneval_draft_speedup: {rows[best]['speedup']:.3f} ({best}; acceptance "
                     f"{rows[best]['alpha']:.3f}, c {rows[best]['c']:.3f}) (target: >= 1.5{ahead})")
    return lines


def selfspec_headline(report: dict) -> list[str]:
    """``name: value (target: X)`` lines: each NAMM draft cache's acceptance at each budget (per context length,
    per task, then over all prompts) against H2O and StreamingLLM at the same budget."""
    lines = []
    for suite, info in report.get("selfspec", {}).items():
        skipped = list(info["skipped"])                       # only NAMM entries are ever skipped
        namms = skipped + [n for n, p in info["policies"].items() if p["name"] == "namm"] or ["namm"]
        groups = selfspec_groups(report["results"][suite], info)
        groups = groups[1:] + groups[:1]                      # all prompts last
        for budget in report["config"]["suites"][suite]["budgets"]:
            for label, rows in groups:
                alpha = {r["policy"]: r["alpha"] for r in rows.values() if r.get("budget") == budget}
                others = ", ".join(f"{p} {alpha[p]:.3f}" for p in ("h2o", "streamingllm") if p in alpha)
                for name in namms:
                    missing = "n/a (skipped: no policy directory)" if name in skipped else "n/a (not run)"
                    value = f"{alpha[name]:.3f}" if name in alpha else missing
                    at = "" if label == "all" else f"_{label}"
                    lines.append(f"{suite}_{name}_acceptance{at}@{budget:g}: {value} "
                                 f"(target: >= 0.9 and above {others or 'h2o, streamingllm'})")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, (suite, rows) in zip(axes[0], results.items()):
        series = defaultdict(list)
        for k, r in rows.items():
            if "@" in k and not k.startswith("hf_"):
                name, g = k.rsplit("@", 1)
                series[name].append((int(g), r["speedup"]))
        for name, pts in sorted(series.items()):
            if len(pts) > 1:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=suite, xlabel="draft length (gamma)", ylabel="speedup over target-only greedy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    plt.close(fig)


@hydra.main(config_path="../configs", config_name="specbench", version_base=None)
def main(cfg: DictConfig) -> None:
    from experiments.lib.cli import exit_on_bad_input

    report = exit_on_bad_input("specbench", run, cfg, (SpecbenchError,))
    res = report["results"]
    print(table(res, report["lossless"], report["kinds"], report["selfspec"]))
    all_lossless = all(all(v.values()) for v in report["lossless"].values())
    print(f"lossless_greedy: {all_lossless} (target: True)")
    for line in humaneval_headline(report) + selfspec_headline(report):
        print(line)


if __name__ == "__main__":
    main()
