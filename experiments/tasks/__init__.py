"""Task suites in LongBench's schema: built-in generators, LongBench, local JSONL; prompts; metrics.

    rows = load_task(cfg.task, tokenizer, split="test")
    prompt = build_prompt(rows[0], tokenizer, chat=True, max_prompt_tokens=8192 - 32)
    score = score_prediction(rows[0]["dataset"], prediction, rows[0])
"""

from __future__ import annotations

from typing import Any, Mapping

from experiments.tasks.builtin import GENERATED, generate, generate_row, humaneval_rows, row_id
from experiments.tasks.longbench import in_split, load_longbench, read_jsonl, split_rows, write_jsonl
from experiments.tasks.metrics import METRICS, score_prediction
from experiments.tasks.prompts import Prompt, build_prompt, build_prompts, load_templates, middle_truncate
from experiments.tasks.registry import BUILTIN_TASKS, LONGBENCH_TASKS, REGISTRY, TaskError, TaskSpec, get_spec

__all__ = [
    "BUILTIN_TASKS", "GENERATED", "LONGBENCH_TASKS", "METRICS", "REGISTRY", "Prompt", "TaskError", "TaskSpec",
    "build_prompt", "build_prompts", "generate", "get_spec", "humaneval_rows", "in_split", "load_longbench",
    "load_task", "load_templates", "middle_truncate", "read_jsonl", "score_prediction", "split_rows", "write_jsonl",
]

SUITES = ("builtin", "jsonl", "longbench", "humaneval") + GENERATED


def _get(cfg: Mapping[str, Any], key: str, default=None):
    v = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if v is None else v


def _generated(name: str, tokenizer, lengths, n: int, seed: int, split: str, train_fraction: float) -> list[dict]:
    """n rows per length whose ids fall in ``split``: row indices that hash elsewhere are skipped."""
    rows = []
    for length in lengths:
        picked, i = [], 0
        while len(picked) < n:
            if in_split(row_id(name, length, seed, i), split, train_fraction):
                picked.append(i)
            i += 1
        rows += [generate_row(name, tokenizer, int(length), seed, i) for i in picked]
    return rows


def load_task(task_cfg: Mapping[str, Any], tokenizer=None, split: str = "all", cache_dir=None) -> list[dict]:
    """Rows of the task(s) a ``configs/task/*.yaml`` names, restricted to ``split`` (all/train/test).

    ``name``: a generated task (``passkey``, ...; with ``n``, ``context_lengths``, ``seed``), ``builtin``
    (``tasks`` list, same keys), ``humaneval``, ``jsonl`` (``path``), ``longbench`` (``subsets``).
    ``n`` is the number of prompts per task and length within the split (null: all of them).
    """
    name = _get(task_cfg, "name")
    if name not in SUITES:
        raise TaskError(f"task.name={name!r} is unknown; use one of {', '.join(SUITES)}")
    if split not in ("all", "train", "test"):
        raise TaskError(f"split={split!r}; use one of all, train, test")
    n = _get(task_cfg, "n")
    frac = float(_get(task_cfg, "train_fraction", 0.5))
    if name in GENERATED or name == "builtin":
        if tokenizer is None:
            raise TaskError(f"task {name} measures context lengths with the model's tokenizer; pass one")
        names = list(_get(task_cfg, "tasks", [])) if name == "builtin" else [name]
        lengths = list(_get(task_cfg, "context_lengths", [1024, 2048]))
        seed = int(_get(task_cfg, "seed", 0))
        rows = []
        for t in names:
            if t == "humaneval":
                rows += _limit(split_rows(humaneval_rows(), split, frac), n)
            elif t not in GENERATED:
                raise TaskError(f"task.tasks lists {t!r}, not a built-in task; use {', '.join(GENERATED)} or humaneval")
            else:
                rows += _generated(t, tokenizer, lengths, int(n or 5), seed, split, frac)
        return rows
    if name == "humaneval":
        return _limit(split_rows(humaneval_rows(), split, frac), n)
    if name == "jsonl":
        path = _get(task_cfg, "path")
        if not path:
            raise TaskError("task=jsonl needs a file: task.path=FILE (LongBench-schema JSONL)")
        return _limit_per_dataset(split_rows(read_jsonl(path), split, frac), n)
    subsets = list(_get(task_cfg, "subsets", LONGBENCH_TASKS))
    if cache_dir is None:
        from experiments.lib.assets import cache_dir as default_cache

        cache_dir = default_cache()
    rows = []
    for s in subsets:
        rows += _limit(split_rows(load_longbench(s, cache_dir), split, frac), n)
    return rows


def _limit(rows: list[dict], n) -> list[dict]:
    return rows if n is None else rows[: int(n)]


def _limit_per_dataset(rows: list[dict], n) -> list[dict]:
    if n is None:
        return rows
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if seen.get(r["dataset"], 0) < int(n):
            out.append(r)
            seen[r["dataset"]] = seen.get(r["dataset"], 0) + 1
    return out
