"""Evaluate a model on tasks x memory policies x budgets.

    python -m experiments.evaluate model=smollm2 task=builtin policy=full
    python -m experiments.evaluate task=jsonl task.path=FILE.jsonl
    python -m experiments.evaluate policy=h2o budgets=[256,512] compare=[l2,streamingllm]

Writes to ``output_dir``: ``predictions.jsonl`` (one row per prompt and policy run; a rerun into the
same directory resumes), ``results.jsonl`` (one row per task, length, policy and budget),
``results.md``, ``score_vs_kv.png`` and ``summary.json``; the results cover every run in the directory on
this command's prompts, also those an earlier command added. Greedy decoding, per-task
``max_new_tokens``; the headline is printed last: the normalised score of the run ``headline=LABEL`` names
(default: the last non-full run in column order).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf

from experiments.lib import reporting
from experiments.lib.cli import policy_yaml
from namm.shards import atomic_write_json
from experiments.tasks import (TaskError, build_prompts, get_spec, load_task, load_templates, score_prediction)

log = logging.getLogger(__name__)

POLICY_DIR = Path(__file__).resolve().parents[1] / "configs" / "policy"


class EvaluateError(ValueError):
    """A bad evaluation setting (policy name, budgets, output directory)."""


def _plain(cfg) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg


def load_policy_cfg(name: str) -> dict:
    """``configs/policy/<name>.yaml`` as a dict."""
    cfg = policy_yaml(name)
    if cfg is None:
        known = ", ".join(sorted(p.stem for p in POLICY_DIR.glob("*.yaml")))
        raise EvaluateError(f"compare lists unknown policy {name!r}; use names from configs/policy: {known}")
    cfg.setdefault("name", name)
    return cfg


def _compared(entry) -> tuple[dict, bool]:
    """A ``compare`` entry -> (policy config, budget fixed?).

    A name (``h2o``) takes ``configs/policy/h2o.yaml`` and follows ``budgets``; a mapping
    (``{name: namm, path: untrained}``) overrides that file's keys, and keeps its own budget when it
    sets ``budget`` (null included) instead of following ``budgets``.
    """
    entry = _plain(entry)
    if isinstance(entry, Mapping):
        if "name" not in entry:
            raise EvaluateError(f"compare entry {entry!r} has no 'name'; e.g. {{name: namm, path: untrained}}")
        return {**load_policy_cfg(str(entry["name"])), **entry}, "budget" in entry
    return load_policy_cfg(str(entry)), False


def policy_runs(policy_cfg: Mapping, compare: Sequence[str] = (), budgets: Sequence | None = None) -> list[dict]:
    """Every (policy, budget) to run: the selected policy and each compared one, at each budget, labelled.

    ``full`` ignores budgets and runs once; with ``budgets`` null each policy keeps its own budget,
    and so does a compared mapping that sets ``budget`` (see ``_compared``). Each run carries a unique
    ``label`` (see ``label_runs``); the same run asked for twice runs once.
    """
    base = [(dict(_plain(policy_cfg)), False)] + [_compared(c) for c in compare or []]
    if budgets is not None and not isinstance(budgets, (list, tuple)):
        raise EvaluateError(f"budgets={budgets!r}; pass a list, e.g. budgets=[256,512] or budgets=[0.25,0.5]")
    if budgets is not None:
        from namm.torch.policies import check_budget

        for b in budgets:
            check_budget(b, f"budgets={list(budgets)}")
    runs = []
    for p, fixed in base:
        if "name" not in p:
            raise EvaluateError("a policy config has no 'name'; see configs/policy/*.yaml")
        own = budgets is None or fixed or p["name"] == reporting.FULL
        for b in ([p.get("budget")] if own else list(budgets)):
            runs.append({**p, "budget": None if p["name"] == reporting.FULL else b})
    return label_runs(runs)


LABEL_KEYS = ("label", "method")   # bookkeeping keys of a run, never passed to the policy


def policy_knobs(run: Mapping) -> dict:
    """A run's policy config without its bookkeeping keys (what ``build_policy`` and results rows get)."""
    return {k: v for k, v in run.items() if k not in LABEL_KEYS}


def _short(key: str, value, paths: Sequence = ()) -> str:
    """``key=value`` for a label; a policy path as its shortest trailing part that tells it apart from the other
    ``paths`` of the same policy name (``smollm2-i1``, or ``run_a/namm_policy`` beside ``run_b/namm_policy``)."""
    if key != "path" or not isinstance(value, str):
        return f"{key}={json.dumps(value) if isinstance(value, (bool, type(None))) else value}"
    parts = Path(value.rstrip("/")).parts
    others = [Path(str(p).rstrip("/")).parts for p in paths if str(p) != value]
    for n in range(1, len(parts) + 1):
        if all(o[-n:] != parts[-n:] for o in others):
            return "/".join(parts[-n:])
    return value


def label_runs(runs: Sequence[Mapping]) -> list[dict]:
    """Give every run a unique ``label`` (its column name) and ``method`` (the label without the budget).

    Every run is first completed with its ``configs/policy`` defaults. A run's own ``label`` key wins (``{name: namm, path: DIR, label: mine}`` -> ``mine@0.5``). Else the
    label is the policy name plus what differs between the runs of that name: the policy directory's
    basename (or the bundled policy's name) and every other key that differs from the policy's
    ``configs/policy`` defaults, e.g. ``namm[smollm2-i1,update_interval=0]@0.5``; a policy run once keeps
    its bare name (``h2o@0.5``). The same config asked for twice runs once; two different configs that
    would get one label are an error naming both.
    """
    runs = [{**_defaults(str(r["name"])), **_plain(r)} for r in runs]   # resolved: the yaml's keys included
    by_name: dict[str, list[dict]] = {}
    for r in runs:
        by_name.setdefault(str(r["name"]), []).append(r)
    for name, group in by_name.items():
        knobs = [policy_knobs(r) for r in group]
        keys = [k for k in dict.fromkeys(k for g in knobs for k in g) if k not in ("name", "budget")]
        differ = [k for k in keys if len({json.dumps(g.get(k), sort_keys=True) for g in knobs}) > 1]
        defaults = _defaults(name)
        for r, g in zip(group, knobs):
            if r.get("method") is None:
                if r.get("label") is not None:
                    method = str(r["label"])
                else:
                    paths = [k.get("path") for k in knobs]
                    parts = [_short("path", g.get("path"), paths)] if "path" in differ else []
                    parts += [_short(k, g.get(k)) for k in differ if k != "path" and g.get(k) != defaults.get(k)]
                    method = name + (f"[{','.join(parts)}]" if parts else "")
                r["method"] = method
            r["label"] = reporting.policy_label(r["method"], r.get("budget"))
    out, seen = [], {}
    for r in runs:
        cfg = json.dumps(policy_knobs(r), sort_keys=True)
        if r["label"] in seen:
            if seen[r["label"]] == cfg:
                log.info("policy run %s is listed twice; it runs once", r["label"])
                continue
            raise EvaluateError(f"two different policy runs would both be labelled {r['label']!r}: "
                                f"{seen[r['label']]} and {cfg}; give each a label of its own in compare, "
                                f"e.g. {{name: {r['name']}, ..., label: {r['name']}-b}}")
        seen[r["label"]] = cfg
        out.append(r)
    return out


def _defaults(name: str) -> dict:
    try:
        return load_policy_cfg(name)
    except EvaluateError:          # a run built in code for a policy without a yaml file
        return {}


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return sorted(ids)


def _limit(rows: list[dict], max_prompts) -> list[dict]:
    if max_prompts is None:
        return rows
    count: dict[tuple, int] = {}
    out = []
    for r in rows:
        key = (r["dataset"], r.get("context_tokens"))
        if count.get(key, 0) < int(max_prompts):
            out.append(r)
            count[key] = count.get(key, 0) + 1
    return out


def _key(task, _id, label) -> str:
    return json.dumps([task, str(_id), label])


def _pred_label(p: Mapping) -> str:
    """A prediction row's run label (rows written before labels existed: ``policy@budget``)."""
    return p.get("label") or reporting.policy_label(p["policy"], p.get("budget"))


def evaluate(model, tokenizer, rows: Sequence[Mapping], runs: Sequence[Mapping], out_dir: str | Path, *,
             chat: bool, max_context: int | None, question_in_compression: bool = True,
             templates: Mapping[str, str] | None = None, humaneval_timeout: float = 3.0,
             progress: bool = True, with_directory: bool = False) -> list[dict]:
    """Generate and score every row under every policy run; returns the per-prompt predictions.

    Predictions are appended to ``out_dir/predictions.jsonl`` as they come; rows already there (same
    task, _id, policy, budget) are reused and rescored, so a killed run resumes. ``with_directory``: the
    returned list goes on with the file's predictions of other runs (earlier commands into the same directory,
    e.g. another policy added later) on these rows, rescored as resumed ones are, so that results built from it
    cover every run in the directory, not only this command's.
    """
    from tqdm import tqdm

    from experiments.extract import generate_answer
    from namm.torch.policies import build_policy

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = label_runs(runs)
    pred_path = out_dir / "predictions.jsonl"
    done = {}
    if pred_path.exists():
        for p in reporting.read_jsonl(pred_path):
            done[_key(p["task"], p["_id"], _pred_label(p))] = p
    _check_resumed(done.values(), runs, pred_path)
    prompts = build_prompts(rows, tokenizer, chat, max_context, templates)
    from namm.torch.generate import check_context

    for row, prompt in zip(rows, prompts):  # every prompt fits before the first generation
        check_context(model, len(prompt), get_spec(row["dataset"]).max_new_tokens, f"{row['dataset']} {row['_id']}")
    eos = _eos_ids(model, tokenizer)
    todo = [(r, pr, run) for r, pr in zip(rows, prompts) for run in runs]
    n_resumed = sum(_key(r["dataset"], r["_id"], run["label"]) in done for r, _, run in todo)
    if n_resumed:
        log.info("resuming: %d of %d generations already in %s", n_resumed, len(todo), pred_path)
    preds = []
    bar = tqdm(total=len(todo), disable=not progress, desc="evaluate", unit="prompt", dynamic_ncols=True,
               file=sys.stderr)
    _drop_torn_tail(pred_path)
    with open(pred_path, "a", encoding="utf-8") as f:
        for row, prompt, run in todo:
            key = _key(row["dataset"], row["_id"], run["label"])
            spec = get_spec(row["dataset"])
            if key in done:  # resumed: rescored with the current metric
                preds.append(_rescored(done[key], row))
                bar.update(1)
                continue
            policy = build_policy(policy_knobs(run))
            t0 = time.perf_counter()
            text, out = generate_answer(model, tokenizer, prompt, spec, spec.max_new_tokens, policy=policy,
                                        eos_token_ids=eos, compress_question=question_in_compression)
            gen_s = time.perf_counter() - t0
            score = score_prediction(row["dataset"], text, row, timeout=humaneval_timeout)
            rec = {"task": row["dataset"], "_id": row["_id"], "length": row.get("context_tokens"),
                   "policy": run["name"], "budget": run.get("budget"), "label": run["label"],
                   "method": run["method"], "policy_config": policy_knobs(run), "prediction": text,
                   "answers": row["answers"] if spec.metric != "pass_at_1" else [row.get("entry_point")],
                   "score": score, "kv_fraction_prefill": float(out.kv_fraction_prefill),
                   "kv_fraction_decode": float(out.kv_fraction_decode), "prompt_tokens": len(prompt),
                   "truncated": prompt.truncated, "new_tokens": len(out.token_ids), "wall_s": round(gen_s, 3)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            preds.append(rec)
            bar.update(1)
            bar.set_postfix_str(f"{row['dataset']} {run['label']}")
    bar.close()
    current = {_key(p["task"], p["_id"], _pred_label(p)) for p in preds}
    others = [p for k, p in done.items() if k not in current]  # runs of other commands into this directory
    reporting.write_jsonl(preds + others, pred_path)  # the finished file, in row order and without duplicates
    if with_directory:
        by_id = {(r["dataset"], r["_id"]): r for r in rows}
        preds += [_rescored(p, by_id[p["task"], p["_id"]]) for p in others if (p["task"], p["_id"]) in by_id]
    return preds


def _rescored(pred: Mapping, row: Mapping) -> dict:
    """A stored prediction scored with the current metric (HumanEval results are kept: rerunning is slow)."""
    rec = dict(pred)
    if get_spec(row["dataset"]).metric != "pass_at_1":
        rec["score"] = score_prediction(row["dataset"], rec["prediction"], row)
    return rec


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line a killed write left without its newline, so that the next row starts a line of its own
    (appended to the torn one, it would be unreadable on the next resume and generated again)."""
    if path.exists():
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def _check_resumed(done: Iterable[Mapping], runs: Sequence[Mapping], pred_path: Path) -> None:
    """Refuse to resume a label whose predictions on disk were made with another policy config."""
    want = {r["label"]: json.dumps(policy_knobs(r), sort_keys=True) for r in runs}
    for p in done:
        label, cfg = _pred_label(p), p.get("policy_config")
        if label in want and cfg is not None and json.dumps(cfg, sort_keys=True) != want[label]:
            raise EvaluateError(
                f"{pred_path} already holds predictions labelled {label!r} made with policy config "
                f"{json.dumps(cfg, sort_keys=True)}, not {want[label]}; write to another output_dir or give this "
                f"run its own label (compare=[{{name: ..., label: NEW}}]); the file is left as it is")


def check_headline(label, runs: Sequence[Mapping]) -> str | None:
    """``headline=LABEL`` names one of this evaluation's runs (checked before the model loads), or is null."""
    if label is None:
        return None
    labels = [r["label"] for r in runs]
    if str(label) not in labels:
        raise EvaluateError(f"headline={label!r} is not a run of this evaluation (its labels: {', '.join(labels)}); "
                            "give one of them, or headline=null for the last non-full one")
    return str(label)


def headline(results: Sequence[Mapping], label: str | None = None,
             among: Sequence[str] | None = None) -> tuple[str, float, str]:
    """(name, value, target): the normalised score of ``label`` (default: the last non-full policy in column
    order, of the columns ``among`` where given), its mean score where the full cache scores nothing to normalise
    by, else the full-cache mean."""
    labels = reporting.columns(results)
    others = [c for c in labels if c != reporting.FULL and (among is None or c in among)]
    norm, means = reporting.normalised_scores(results), reporting.column_means(results)
    pick = label if label is not None else (others[-1] if others else None)
    if pick is not None and pick != reporting.FULL:
        if pick in norm:
            return f"{pick}_normalised_score", norm[pick], ">= 1.0 (full cache = 1.0)"
        if label is not None and pick in means:
            return f"{pick}_mean_score", means[pick], "the full-cache mean score (0-100)"
    if reporting.FULL in means:
        return "full_cache_mean_score", means[reporting.FULL], "none: the full-cache reference (0-100)"
    return f"{labels[-1]}_mean_score", means[labels[-1]], "the full-cache mean score (run it with compare=[full])"


def check_policies(runs: Sequence[Mapping]) -> list:
    """Build every policy run once before the model loads, so that a missing or unknown policy path, a bad
    knob or a schedule that never evicts fails in seconds rather than after the model and tasks load; returns
    the built policies (``run`` checks them against the model once it is loaded: per-layer NAMM parameters
    must fit its layer and head counts)."""
    from namm.torch.cache import check_schedule
    from namm.torch.policies import build_policy

    policies = [build_policy(policy_knobs(run)) for run in runs]
    for policy in policies:
        check_schedule(policy)
    return policies


def run(cfg: DictConfig) -> dict:
    """Load model and tasks from the config, evaluate, write every output file; returns the summary."""
    import torch

    from experiments.lib.models import load_model_from_cfg

    out_dir = Path(str(cfg.output_dir))
    t0 = time.time()
    runs = policy_runs(cfg.policy, list(cfg.get("compare") or []), _plain(cfg.get("budgets")))
    policies = check_policies(runs)
    headline_label = check_headline(cfg.get("headline"), runs)
    templates = load_templates(cfg.get("templates"))
    torch.manual_seed(int(cfg.seed))
    model, tokenizer = load_model_from_cfg(cfg.model, device=str(cfg.device), cache=cfg.get("cache_dir"))
    for policy in policies:
        policy.check_model(model)
    rows = load_task(cfg.task, tokenizer, split=str(cfg.get("split", "test")), cache_dir=cfg.get("cache_dir"))
    rows = _limit(rows, cfg.get("max_prompts"))
    if not rows:
        raise TaskError(f"task {cfg.task.name!r} has no prompts in split={cfg.get('split')}; use split=all")
    log.info("%d prompts x %d policy runs", len(rows), len(runs))
    preds = evaluate(model, tokenizer, rows, runs, out_dir, chat=bool(cfg.model.get("chat", False)),
                     max_context=cfg.model.get("max_context"),
                     question_in_compression=bool(cfg.get("question_in_compression", True)),
                     templates=templates, humaneval_timeout=float(cfg.get("humaneval_timeout", 3.0)),
                     progress=bool(cfg.get("progress", True)), with_directory=True)
    results = reporting.aggregate(preds)
    intervals = reporting.bootstrap_normalised(preds, seed=int(cfg.seed))
    paths = reporting.write_results(results, out_dir, intervals)
    name, value, target = headline(results, headline_label, among=[r["label"] for r in runs])
    summary = {"headline": {"name": name, "value": value, "target": target},
               "mean_score": reporting.column_means(results), "normalised_score": reporting.normalised_scores(results),
               "normalised_score_95ci": intervals,
               "kv_fraction": reporting.column_means(results, "kv_fraction"), "n_prompts": len(rows),
               "model": cfg.model.get("name"), "task": cfg.task.get("name"), "split": cfg.get("split"),
               "question_in_compression": bool(cfg.get("question_in_compression", True)),
               "wall_s": round(time.time() - t0, 1), "files": {k: str(v) for k, v in paths.items()}}
    atomic_write_json(out_dir / "summary.json", summary)
    _track(cfg, results, summary, out_dir)
    if cfg.get("progress", True):
        reporting.print_table(results)
    print(f"{name}: {value} (target: {target})")
    return summary


def _track(cfg, results, summary, out_dir: Path) -> None:
    from experiments.lib.tracking import Tracker

    logging_cfg = cfg.get("logging") or {}
    tracker = Tracker(out_dir, config=_plain(cfg), mode=str(logging_cfg.get("wandb_mode", "offline")),
                      project=str(logging_cfg.get("project", "namm-spec")),
                      metrics_file=str(logging_cfg.get("metrics_file", "metrics.jsonl")))
    for r in results:
        tag = f"{reporting.task_label(r['task'], r['length'])}/{reporting.row_label(r)}"
        tracker.log({f"score/{tag}": r["score"], f"kv_fraction/{tag}": r["kv_fraction"]})
    tracker.log({f"mean_score/{k}": v for k, v in summary["mean_score"].items()})
    tracker.close()


def run_or_exit(cfg: DictConfig) -> float:
    """``run``, with bad input reported as one line and exit status 1 instead of a traceback."""
    from experiments.lib.cli import exit_on_bad_input

    return exit_on_bad_input("evaluate", run, cfg, (TaskError, EvaluateError))["headline"]["value"]


@hydra.main(config_path="../configs", config_name="evaluate", version_base=None)
def main(cfg: DictConfig) -> float:
    return run_or_exit(cfg)


def check_group_choices(argv: Sequence[str], groups: Sequence[str] = ("model", "task", "policy")) -> None:
    """Exit with one line when a command-line override names a config that does not exist
    (Hydra's own message for that spans a dozen lines)."""
    root = POLICY_DIR.parent
    for arg in argv:
        m = re.fullmatch(r"({})=([^,\[\]]+)".format("|".join(groups)), arg)
        if m and not (root / m.group(1) / f"{m.group(2)}.yaml").is_file():
            known = ", ".join(sorted(p.stem for p in (root / m.group(1)).glob("*.yaml")))
            raise SystemExit(f"evaluate: unknown {m.group(1)} {m.group(2)!r}; use one of: {known}")


if __name__ == "__main__":
    from experiments.lib.cli import check_overrides

    check_group_choices(sys.argv[1:])
    check_overrides("evaluate", "evaluate")
    main()
