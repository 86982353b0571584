"""KV statistics: the shard format written by ``experiments.extract`` and read by the ``stats`` fitness.

One shard per prompt (``ShardStore`` kind ``"kv_stats"``), NumPy only (no torch, no JAX here):

    q          [L, Hq, T, d]   fp16  post-RoPE queries of the recorded layers (prompt + answer tokens)
    k          [L, Hkv, T, d]  fp16  post-RoPE keys (as cached)
    v          [L, Hkv, T, d]  fp16  values
    positions  [T]             int32 absolute positions (0..T-1: the full cache has no gaps)
    layers     [L]             int32 which model layers these are
    meta: task, _id, context_len, question_len, answer_len (context + question + answer = T),
          score (full-cache task score of the prompt in [0, 1], the fitness normaliser), answer text.

The answer is the full-cache greedy answer, teacher-forced, so answer queries exist. The manifest
fingerprint names the model, the layer subset and the extraction settings; shards of another
model or config are refused by ``ShardStore``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from namm.shards import ShardError, ShardStore

KIND = "kv_stats"
FORMAT_VERSION = 1


@dataclass
class PromptStats:
    """Statistics of one prompt (NumPy arrays, shapes as in the module docstring)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    layers: np.ndarray
    task: str
    id: str
    context_len: int
    question_len: int
    answer_len: int
    score: float
    answer: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.q.shape[2])

    @property
    def prompt_len(self) -> int:
        return self.context_len + self.question_len

    def validate(self) -> "PromptStats":
        L, hq, t, d = self.q.shape
        if self.k.shape[:1] != (L,) or self.k.shape[2:] != (t, d) or self.v.shape[:3] != self.k.shape[:3]:
            raise ShardError(f"prompt {self.id}: q {self.q.shape}, k {self.k.shape}, v {self.v.shape} do not "
                             f"agree as [layers, heads, tokens, dim]")
        if hq % self.k.shape[1]:
            raise ShardError(f"prompt {self.id}: {hq} query heads is not a multiple of {self.k.shape[1]} KV heads")
        if self.context_len + self.question_len + self.answer_len != t:
            raise ShardError(f"prompt {self.id}: spans {self.context_len}+{self.question_len}+{self.answer_len} "
                             f"!= {t} tokens")
        if len(self.layers) != L:
            raise ShardError(f"prompt {self.id}: {len(self.layers)} layer ids for {L} layers")
        return self


def shard_name(task: str, _id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{task}-{_id}")
    return safe.lstrip("._") or "prompt"


def fingerprint(model_signature: Mapping, layers: Sequence[int], **settings) -> dict:
    """What makes two extractions comparable: the model, the layer subset, and the settings."""
    return {"format_version": FORMAT_VERSION, "model": dict(model_signature), "layers": [int(x) for x in layers],
            **settings}


def open_store(root: str | os.PathLike, fp: Mapping | None = None) -> ShardStore:
    """The kv_stats store at ``root``: pass ``fp`` to create/resume an extraction, None to read."""
    return ShardStore(root, KIND, fp)


def write_prompt(store: ShardStore, s: PromptStats) -> str:
    s.validate()
    name = shard_name(s.task, s.id)
    arrays = {"q": s.q.astype(np.float16), "k": s.k.astype(np.float16), "v": s.v.astype(np.float16),
              "positions": np.arange(s.num_tokens, dtype=np.int32), "layers": np.asarray(s.layers, np.int32)}
    meta = {"task": s.task, "_id": s.id, "context_len": int(s.context_len), "question_len": int(s.question_len),
            "answer_len": int(s.answer_len), "score": float(s.score), "answer": s.answer}
    store.write(name, arrays, meta)
    return name


def read_prompt(store: ShardStore, name: str) -> PromptStats:
    arrays, meta = store.read(name)
    missing = {"q", "k", "v", "layers"} - set(arrays)
    if missing:
        raise ShardError(f"shard {name} in {store.root} lacks {sorted(missing)}; re-extract it")
    return PromptStats(q=arrays["q"], k=arrays["k"], v=arrays["v"], layers=arrays["layers"], task=meta["task"],
                       id=str(meta["_id"]), context_len=int(meta["context_len"]),
                       question_len=int(meta["question_len"]), answer_len=int(meta["answer_len"]),
                       score=float(meta["score"]), answer=meta.get("answer", "")).validate()


def load_prompts(root: str | os.PathLike, names: Sequence[str] | None = None) -> list[PromptStats]:
    store = open_store(root)
    names = store.names() if names is None else list(names)
    if not names:
        raise ShardError(f"{root} holds no kv_stats shards; run python -m experiments.extract first")
    return [read_prompt(store, n) for n in names]


def bytes_per_prompt_per_1k(store: ShardStore) -> float:
    """Mean shard size per prompt per 1K tokens (the extraction's storage cost)."""
    entries = store.manifest["shards"].values()
    if not entries:
        return 0.0
    per = [e["bytes"] / max(1, e["meta"]["context_len"] + e["meta"]["question_len"] + e["meta"]["answer_len"])
           * 1000.0 for e in entries]
    return float(np.mean(per))


def summary(root: str | os.PathLike) -> dict:
    store = open_store(root)
    metas = [e["meta"] for e in store.manifest["shards"].values()]
    return {"prompts": len(metas), "bytes": store.total_bytes(),
            "bytes_per_prompt_per_1k_tokens": bytes_per_prompt_per_1k(store),
            "tasks": sorted({m["task"] for m in metas}),
            "mean_full_cache_score": float(np.mean([m["score"] for m in metas])) if metas else None,
            "fingerprint": store.fingerprint, "root": str(Path(root))}
