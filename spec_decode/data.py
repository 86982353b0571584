"""Distillation data (NumPy only): teacher sequences -> fixed-shape training windows, vocab maps.

A *sequence* is a dict ``tokens [T] int, prompt_len int, topk_ids [T, k] int, topk_logp [T, k] float``
where row t is the teacher's top-k next-token distribution after ``tokens[:t+1]``. Three pools of
windows feed the loss, mixed by a ratio:

- ``fixed``: positions inside the prompt (teacher-forced on existing text);
- ``teacher``: positions of target-generated continuations;
- ``draft``: positions of draft-generated (on-policy) continuations scored by the teacher.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("fixed", "teacher", "draft")


def sequences_from_shard(arrays: dict[str, np.ndarray]) -> list[dict]:
    """Split a teacher shard (``tokens, offsets, prompt_lens, topk_ids, topk_logp``) into sequences."""
    off = arrays["offsets"]
    return [{"tokens": arrays["tokens"][a:b], "prompt_len": int(pl), "topk_ids": arrays["topk_ids"][a:b],
             "topk_logp": arrays["topk_logp"][a:b]}
            for a, b, pl in zip(off[:-1], off[1:], arrays["prompt_lens"])]


@dataclasses.dataclass
class Windows:
    """Right-padded training windows. tokens/positions/mask [N, W]; ids/logp [N, W, k]."""

    tokens: np.ndarray
    positions: np.ndarray
    mask: np.ndarray
    ids: np.ndarray
    logp: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def take(self, idx) -> "Windows":
        return Windows(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def concat(ws: list["Windows"]) -> "Windows":
        return Windows(*(np.concatenate([getattr(w, f.name) for w in ws]) for f in dataclasses.fields(Windows)))


def make_windows(seqs: list[dict], kind: str, window: int) -> Windows:
    """One window per sequence: the last ``window`` tokens of the prompt (``fixed``) or of the whole
    sequence (``teacher``/``draft``), with the loss mask on the positions of that kind."""
    if kind not in KINDS:
        raise ValueError(f"data kind {kind!r}; use one of {KINDS}")
    k = seqs[0]["topk_ids"].shape[1]
    n = len(seqs)
    out = Windows(np.zeros((n, window), np.int32), np.zeros((n, window), np.int32), np.zeros((n, window), np.float32),
                  np.zeros((n, window, k), np.int32), np.zeros((n, window, k), np.float32))
    for r, s in enumerate(seqs):
        pl = s["prompt_len"]
        end = pl if kind == "fixed" else len(s["tokens"])
        start = max(0, end - window)
        t = end - start
        out.tokens[r, :t] = s["tokens"][start:end]
        out.positions[r, :t] = np.arange(start, end)
        out.ids[r, :t] = s["topk_ids"][start:end]
        out.logp[r, :t] = s["topk_logp"][start:end]
        pos = np.arange(start, end)
        # fixed: predictions of prompt tokens (t < pl - 1); teacher/draft: of continuation tokens (t >= pl - 1)
        out.mask[r, :t] = (pos < pl - 1) if kind == "fixed" else (pos >= pl - 1)
    return out


def frequent_vocab(token_lists, size: int, vocab_size: int, always=()) -> np.ndarray:
    """The ``size`` most frequent token ids (ties by id) plus ``always`` (e.g. EOS), sorted."""
    counts = np.zeros(vocab_size, np.int64)
    for toks in token_lists:
        np.add.at(counts, np.asarray(toks, np.int64), 1)
    order = np.lexsort((np.arange(vocab_size), -counts))
    keep = set(int(t) for t in always)
    for t in order:
        if len(keep) >= size:
            break
        keep.add(int(t))
    return np.array(sorted(keep), np.int64)


def inverse_map(vocab_map: np.ndarray | None, vocab_size: int) -> np.ndarray:
    """Full id -> index in the reduced head (-1 where the token is not kept); identity without a map."""
    if vocab_map is None:
        return np.arange(vocab_size, dtype=np.int32)
    inv = -np.ones(vocab_size, np.int32)
    inv[np.asarray(vocab_map)] = np.arange(len(vocab_map), dtype=np.int32)
    return inv


def sample_batch(pools: dict[str, Windows], mix: dict[str, float], batch: int, rng: np.random.Generator) -> Windows:
    """A batch whose rows come from each pool with probability ``mix[kind]`` (renormalised over non-empty pools)."""
    kinds = [k for k in KINDS if mix.get(k, 0) > 0 and k in pools and len(pools[k])]
    if not kinds:
        raise ValueError(f"no data for mix={mix}: every pool with a positive ratio is empty")
    w = np.array([mix[k] for k in kinds], np.float64)
    pick = rng.choice(len(kinds), size=batch, p=w / w.sum())
    parts = []
    for i, kind in enumerate(kinds):
        m = int((pick == i).sum())
        if m:
            parts.append(pools[kind].take(rng.integers(0, len(pools[kind]), size=m)))
    return Windows.concat(parts)
