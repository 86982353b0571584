"""Speculative decoding benchmark: acceptance, tokens per target call, cost ratio c, tokens/s, speedup.

    python -m experiments.specbench drafts.tvd=/path/draft drafts.undistilled=/path/undistilled

For every prompt (HumanEval test problems; long-context prompts of the built-in suite) all methods run
back to back, so that CPU contention hits them alike: target-only greedy (our loop, the baseline; and
``generate``), our loop with each draft at each draft length, prompt lookup (our loop), transformers
assisted generation and transformers prompt lookup. Every output is compared with target-only greedy
token for token (``lossless``). Writes ``specbench.json``, ``specbench.md`` and
``speedup_vs_draft_length.png``; the headline is printed last.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from namm.shards import atomic_write_bytes, atomic_write_json
from spec_decode.torch import (DraftHandle, DraftProposer, PromptLookupProposer, SpecStats, autoregressive_generate,
                               hf_generate, speculative_generate)

log = logging.getLogger(__name__)


def suite_prompts(tokenizer, suite) -> list[tuple[str, list[int]]]:
    from experiments.tasks import build_prompt, load_task

    rows = load_task(OmegaConf.to_container(suite.task, resolve=True), tokenizer, split=suite.split)
    out = []
    for row in rows:
        p = build_prompt(row, tokenizer, chat=bool(suite.get("chat", False)), max_prompt_tokens=suite.get("max_prompt_tokens"))
        out.append((row["_id"], list(p.context_ids) + list(p.question_ids)))
    return out


def summarize(stats: SpecStats, base: SpecStats, per_token_target: float) -> dict:
    """Table row: alpha, tokens per target call, measured c, tokens/s, speedup over target-only."""
    c = (stats.draft_time / stats.draft_calls) / per_token_target if stats.draft_calls else 0.0
    return {"alpha": stats.acceptance_rate if stats.proposed else float("nan"),
            "per_position": stats.per_position, "tokens_per_call": stats.tokens_per_call, "c": c,
            "tokens_per_s": stats.new_tokens / max(stats.wall_time, 1e-9),
            "speedup": base.wall_time / max(stats.wall_time, 1e-9), "new_tokens": stats.new_tokens,
            "wall_time": stats.wall_time, "mean_gamma": float(np.mean(stats.gammas)) if stats.gammas else 0.0}


def run(cfg: DictConfig) -> dict:
    from experiments.models import load_model

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    out = Path(cfg.output_dir)
    target, tok = load_model(cfg.target)
    eos = target.generation_config.eos_token_id
    drafts = {name: DraftHandle.from_pretrained(path, target, tok) for name, path in cfg.drafts.items() if path}
    gammas = list(cfg.draft_lengths)
    results, lossless = {}, {}
    for suite_name, suite in cfg.suites.items():
        prompts = suite_prompts(tok, suite)
        acc: dict[str, SpecStats] = defaultdict(SpecStats)
        ok: dict[str, bool] = defaultdict(lambda: True)
        for pid, ids in tqdm(prompts, desc=suite_name):
            x = torch.tensor([ids])
            n_new = int(suite.max_new_tokens)
            ref, st = autoregressive_generate(target, x, n_new, eos_token_id=eos)
            acc["target"] = acc["target"].merge(st)
            runs = []
            for name, d in drafts.items():
                for g in (gammas if name in cfg.sweep_drafts else [cfg.gamma]):
                    runs.append((f"{name}@{g}", lambda g=g, d=d: speculative_generate(
                        target, x, DraftProposer(d), n_new, gamma=g, eos_token_id=eos)))
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
    report = {"results": results, "lossless": lossless, "drafts": {k: str(v) for k, v in cfg.drafts.items() if v},
              "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write_json(out / "specbench.json", report)
    atomic_write_bytes(out / "specbench.md", table(results, lossless).encode())
    plot(results, out / "speedup_vs_draft_length.png")
    return report


def table(results: dict, lossless: dict) -> str:
    lines = []
    for suite, rows in results.items():
        lines += [f"## {suite}", "", "| method | alpha | tokens/call | c | tokens/s | speedup | lossless |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in sorted(rows.items(), key=lambda kv: -kv[1]["speedup"]):
            lines.append(f"| {k} | {r['alpha']:.3f} | {r['tokens_per_call']:.2f} | {r['c']:.3f} | "
                         f"{r['tokens_per_s']:.2f} | {r['speedup']:.2f} | {lossless[suite].get(k, True)} |")
        lines.append("")
    return "\n".join(lines)


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
    report = run(cfg)
    res = report["results"]
    print(table(res, report["lossless"]))
    all_lossless = all(all(v.values()) for v in report["lossless"].values())
    print(f"lossless_greedy: {all_lossless} (target: True)")
    if "humaneval" in res:
        best = max((k for k in res["humaneval"] if k != "target" and not k.startswith("hf_target")),
                   key=lambda k: res["humaneval"][k]["speedup"])
        print(f"humaneval_best_method: {best}")
        print(f"humaneval_speedup_best: {res['humaneval'][best]['speedup']:.3f} (target: >= 1.5)")


if __name__ == "__main__":
    main()
