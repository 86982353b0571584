"""The ``task`` fitness (the paper's): each candidate runs the real model through the PyTorch runtime.

    fit = TaskFitness(model, tokenizer, rows, namm_cfg, norm, chat=True, max_context=8192)
    fit.evaluate(population [P, D], items [B]) -> [P]

For each candidate, the flat parameter vector becomes a torch ``NAMMPolicy`` in memory (the named
layout of ``namm.scoring.param_layout``; no JAX inside the runtime), greedy-generates the answer
of every sampled prompt and scores it with the task's metric. Per task, the score is normalised
by the full-cache score on the same prompts (reference 5.2: sum of scores / sum of full-cache
scores; a task whose full-cache sum is 0 counts 1 + sum of scores, so parity is still 1.0); the
fitness is the unweighted mean over tasks. Full-cache scores come from the KV-statistics shards
when given, else they are computed once and cached.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from namm.config import NAMMConfig
from namm.shards import atomic_write_json

log = logging.getLogger(__name__)


class TaskFitness:
    def __init__(self, model, tokenizer, rows: Sequence[Mapping], namm_cfg: NAMMConfig, norm, *, chat: bool,
                 max_context: int | None, compress_question: bool = True, reference: Mapping[str, float] | None = None,
                 reference_path: str | Path | None = None, max_new_tokens: int | None = None,
                 templates: Mapping[str, str] | None = None, progress: bool = False):
        from experiments.extract import eos_ids
        from experiments.tasks import build_prompts

        if not rows:
            raise ValueError("task fitness: no prompts; check task=... and split=...")
        self.model, self.tokenizer, self.rows = model, tokenizer, list(rows)
        self.namm_cfg = namm_cfg
        self.norm = None if norm is None else tuple(np.array(x, np.float32) for x in norm)
        self.prompts = build_prompts(self.rows, tokenizer, chat, max_context, templates)
        self.compress_question = compress_question
        self.max_new_tokens = max_new_tokens
        self.eos = eos_ids(model, tokenizer)
        self.progress = progress
        self.reference_path = Path(reference_path) if reference_path else None
        self.reference = dict(reference or {})
        if self.reference_path and self.reference_path.exists():
            self.reference.update(json.loads(self.reference_path.read_text()))
        self.last_details: dict = {}
        self._kv: list[float] = []

    @property
    def num_items(self) -> int:
        return len(self.rows)

    def _key(self, i: int) -> str:
        return f"{self.rows[i]['dataset']}/{self.rows[i]['_id']}"

    def score_prompt(self, i: int, policy) -> float:
        """Greedy answer of prompt ``i`` under ``policy`` (None: full cache), scored by the task metric."""
        from experiments.extract import generate_answer
        from experiments.tasks import get_spec, score_prediction

        row, prompt = self.rows[i], self.prompts[i]
        spec = get_spec(row["dataset"])
        n_new = spec.max_new_tokens if self.max_new_tokens is None else min(spec.max_new_tokens, self.max_new_tokens)
        text, out = generate_answer(self.model, self.tokenizer, prompt, spec, n_new, policy=policy,
                                    eos_token_ids=self.eos, compress_question=self.compress_question)
        self._kv.append(float(out.kv_fraction_prefill))
        return float(score_prediction(row["dataset"], text, row))

    def references(self, items) -> np.ndarray:
        """Full-cache scores of the items (computed once, cached in ``reference_path``)."""
        missing = [i for i in items if self._key(i) not in self.reference]
        if missing:
            self._kv = []
            for i in missing:
                self.reference[self._key(i)] = self.score_prompt(i, None)
            if self.reference_path:
                atomic_write_json(self.reference_path, self.reference)
        return np.array([self.reference[self._key(i)] for i in items], np.float64)

    def normalised(self, scores: np.ndarray, items) -> float:
        """Mean over tasks of (sum of scores / sum of full-cache scores) on the same prompts."""
        ref = self.references(items)
        tasks = [self.rows[i]["dataset"] for i in items]
        ratios = []
        for t in sorted(set(tasks)):
            sel = np.array([x == t for x in tasks])
            r = ref[sel].sum()
            ratios.append(scores[sel].sum() / r if r > 0 else 1.0 + scores[sel].sum())
        return float(np.mean(ratios))

    def policy_for(self, flat):
        from namm.torch.policy import NAMMPolicy

        return NAMMPolicy.from_flat(np.array(flat, np.float32), self.namm_cfg, self.norm)

    def evaluate(self, population, items) -> np.ndarray:
        from tqdm import tqdm

        population = np.asarray(population, np.float32)
        items = [int(i) for i in np.asarray(items)]
        self.references(items)
        out, kv = [], []
        bar = tqdm(total=len(population) * len(items), disable=not self.progress, desc="task fitness",
                   unit="gen", leave=False, file=sys.stderr)
        for flat in population:
            policy = self.policy_for(flat)
            self._kv = []
            scores = []
            for i in items:
                scores.append(self.score_prompt(i, policy))
                bar.update(1)
            out.append(self.normalised(np.array(scores), items))
            kv.append(float(np.mean(self._kv)))
        bar.close()
        self.last_details = {"kept_fraction": np.array(kv)}
        return np.array(out, np.float32)

    def evaluate_policy(self, policy, items) -> dict:
        """Any runtime policy (a baseline from ``build_policy``) on the same prompts."""
        items = [int(i) for i in np.asarray(items)]
        self._kv = []
        t0 = time.perf_counter()
        scores = np.array([self.score_prompt(i, policy) for i in items])
        return {"fitness": self.normalised(scores, items), "kept_fraction": float(np.mean(self._kv)),
                "wall_s": time.perf_counter() - t0}


def stats_references(stats_dir: str, rows) -> dict[str, float]:
    """Full-cache scores recorded at extraction, keyed ``task/_id`` (empty if there is no store)."""
    from namm import stats as kvstats
    from namm.shards import ShardError

    try:
        store = kvstats.open_store(stats_dir)
    except ShardError:
        return {}
    want = {kvstats.shard_name(r["dataset"], str(r["_id"])): f"{r['dataset']}/{r['_id']}" for r in rows}
    return {want[n]: float(store.manifest["shards"][n]["meta"]["score"]) for n in store.names() if n in want}
