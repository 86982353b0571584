"""DistillSpec-style token-level distillation of the draft (Zhou et al., ICLR 2024), in optax.

Objective: E_{(x, y) ~ G} (1/|y|) sum_t D(p(.|x, y<t) || q(.|x, y<t)) with D one of ``fkl``, ``rkl``,
``jsd`` (generalised JSD[beta]) or ``tvd``.

Top-k teacher, tail handled explicitly: the teacher stores its k most likely tokens with their *exact*
log-probabilities (full softmax). Both p and q are coarse-grained onto k + 1 buckets: the k teacher
tokens and one "tail" bucket holding the remaining mass (p_tail = 1 - sum_k p, q_tail = 1 - sum_k q).
Each divergence is computed on those buckets, a lower bound of the full-vocabulary one (data
processing inequality), exact whenever the tail is empty. The acceptance estimate
alpha = E[sum_x min(p(x), q(x))] sums over the k teacher tokens only: a lower bound that misses at
most min(p_tail, q_tail). ``match`` is the greedy acceptance proxy: argmax q == argmax p.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from namm.shards import atomic_write_bytes
from spec_decode.data import Windows, sample_batch
from spec_decode.draft import DraftConfig, Params, forward

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
EPS = 1e-8


def buckets(logq_full, ids, logp):
    """Coarse-grain onto k + 1 buckets. logq_full [..., V'] (log-softmax of the draft), ids [..., k]
    (indices into V', -1 where the draft has no such token), logp [..., k] -> (p, q) [..., k + 1]."""
    q_k = jnp.where(ids >= 0, jnp.exp(jnp.take_along_axis(logq_full, jnp.maximum(ids, 0), -1)), 0.0)
    p_k = jnp.exp(logp)
    p = jnp.concatenate([p_k, jnp.maximum(1.0 - p_k.sum(-1, keepdims=True), 0.0)], -1)
    q = jnp.concatenate([q_k, jnp.maximum(1.0 - q_k.sum(-1, keepdims=True), 0.0)], -1)
    return p, q


def kl(a, b):
    """KL(a || b) = sum a (log a - log b) over the last axis."""
    return jnp.sum(a * (jnp.log(a + EPS) - jnp.log(b + EPS)), -1)


def divergence(name: str, p, q, beta: float = 0.5):
    """D(p || q) per position on bucketed distributions ``[..., k + 1]``."""
    if name == "fkl":
        return kl(p, q)                                           # sum p log(p / q)
    if name == "rkl":
        return kl(q, p)                                           # sum q log(q / p)
    if name == "jsd":
        m = beta * p + (1.0 - beta) * q                           # GKD's JSD[beta]
        return beta * kl(p, m) + (1.0 - beta) * kl(q, m)
    if name == "tvd":
        return 0.5 * jnp.sum(jnp.abs(p - q), -1)                  # 1 - beta(p, q) = TVD
    raise ValueError(f"divergence={name!r}; use one of {DIVERGENCES}")


def acceptance(p, q):
    """beta = sum_x min(p(x), q(x)) over the k teacher tokens (the tail bucket is left out)."""
    return jnp.sum(jnp.minimum(p[..., :-1], q[..., :-1]), -1)


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    divergence: str = "tvd"
    beta: float = 0.5               # JSD[beta]
    lr: float = 3e-4
    warmup: int = 20
    steps: int = 300
    batch: int = 8
    weight_decay: float = 0.0
    clip: float = 1.0
    train_embeddings: bool = False  # the input embeddings stay the target's unless asked
    eval_every: int = 50
    ckpt_every: int = 50
    seed: int = 0
    mix: tuple = (("fixed", 0.2), ("teacher", 0.8), ("draft", 0.0))

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence={self.divergence!r}; use one of {DIVERGENCES}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"jsd beta={self.beta} must lie in (0, 1)")


def batch_metrics(cfg: DraftConfig, params: Params, batch: dict, divergence_name: str, beta: float,
                  vocab_map=None):
    """Mean loss, alpha and greedy match over the masked positions of a batch (arrays as in ``Windows``)."""
    logits, _ = forward(cfg, params, batch["tokens"], batch["positions"], vocab_map=vocab_map)   # [B, W, V']
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    p, q = buckets(logq, batch["ids"], batch["logp"])                                           # [B, W, k+1]
    m = batch["mask"]
    denom = jnp.maximum(m.sum(), 1.0)
    loss = jnp.sum(divergence(divergence_name, p, q, beta) * m) / denom
    alpha = jnp.sum(acceptance(p, q) * m) / denom
    match = jnp.sum((jnp.argmax(logq, -1) == batch["ids"][..., 0]) * m) / denom               # greedy agreement
    return loss, {"loss": loss, "alpha": alpha, "match": match}


def make_optimizer(dc: DistillConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(0.0, dc.lr, max(dc.warmup, 1), max(dc.steps, dc.warmup + 1), dc.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(dc.clip), optax.adamw(sched, weight_decay=dc.weight_decay))


def _labels(params: Params, train_embeddings: bool):
    """"train" for every leaf, except the input embeddings ("freeze") unless they are trained too."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if train_embeddings or jax.tree_util.keystr(path) != "['embed']" else "freeze", params)


@dataclasses.dataclass
class TrainState:
    params: Params
    opt_state: optax.OptState
    step: int
    rng_state: dict


def save_checkpoint(path: str | os.PathLike, state: TrainState) -> None:
    """Params, optimiser state, step and data-RNG state (as JSON), written atomically."""
    tree = flax.serialization.to_state_dict({"params": state.params, "opt_state": state.opt_state})
    blob = flax.serialization.msgpack_serialize({"tree": tree, "step": int(state.step),
                                                 "rng": json.dumps(state.rng_state)})
    atomic_write_bytes(Path(path), blob)


def load_checkpoint(path: str | os.PathLike, template: TrainState) -> TrainState:
    try:
        d = flax.serialization.msgpack_restore(Path(path).read_bytes())
        tree = flax.serialization.from_state_dict({"params": template.params, "opt_state": template.opt_state},
                                                  d["tree"])
        return TrainState(tree["params"], tree["opt_state"], int(d["step"]), json.loads(d["rng"]))
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} cannot be read ({e}); delete it to restart training") from e


def train(cfg: DraftConfig, params: Params, pools: dict[str, Windows], dc: DistillConfig, *,
          vocab_map=None, inv_map: np.ndarray | None = None, eval_sets: dict[str, Windows] | None = None,
          ckpt_path: str | os.PathLike | None = None, log: Callable[[dict, int], None] | None = None,
          progress: bool = True, until: int | None = None) -> tuple[Params, list[dict]]:
    """Distil ``params`` on batches drawn from ``pools`` with ratios ``dc.mix``; resumes from ``ckpt_path``.

    ``inv_map`` maps teacher token ids to reduced-head indices (``spec_decode.data.inverse_map``);
    ``log(metrics, step)`` receives train and eval metrics; ``until`` stops after that many steps of the
    ``dc.steps`` schedule (a later call resumes from the checkpoint). Returns params and the eval history.
    """
    opt = optax.multi_transform({"train": make_optimizer(dc), "freeze": optax.set_to_zero()},
                                _labels(params, dc.train_embeddings))
    rng = np.random.default_rng(dc.seed)
    state = TrainState(params, opt.init(params), 0, rng.bit_generator.state)
    if ckpt_path is not None and Path(ckpt_path).exists():
        state = load_checkpoint(ckpt_path, state)
        rng.bit_generator.state = state.rng_state
    vm = None if vocab_map is None else jnp.asarray(vocab_map)
    inv = jnp.asarray(inv_map) if inv_map is not None else None

    def to_jax(w: Windows) -> dict:
        ids = w.ids if inv is None else inv[jnp.asarray(w.ids)]
        return {"tokens": jnp.asarray(w.tokens), "positions": jnp.asarray(w.positions),
                "mask": jnp.asarray(w.mask), "ids": jnp.asarray(ids), "logp": jnp.asarray(w.logp)}

    @jax.jit
    def step_fn(params, opt_state, batch):
        (_, m), g = jax.value_and_grad(batch_metrics, argnums=1, has_aux=True)(
            cfg, params, batch, dc.divergence, dc.beta, vm)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, m

    eval_fn = jax.jit(lambda params, batch: batch_metrics(cfg, params, batch, dc.divergence, dc.beta, vm)[1])

    def evaluate(params) -> dict:
        out = {}
        for name, w in (eval_sets or {}).items():
            sums, n = {}, 0.0
            for i in range(0, len(w), dc.batch):
                part = w.take(np.arange(i, min(i + dc.batch, len(w))))
                weight = float(part.mask.sum())
                for k, v in eval_fn(params, to_jax(part)).items():
                    sums[k] = sums.get(k, 0.0) + float(v) * weight
                n += weight
            out.update({f"eval/{name}/{k}": v / max(n, 1.0) for k, v in sums.items()})
        return out

    mix = dict(dc.mix)
    history = []
    params, opt_state = state.params, state.opt_state
    if state.step == 0 and eval_sets:
        history.append({"step": 0, **evaluate(params)})
        if log:
            log(history[-1], 0)
    stop = dc.steps if until is None else min(until, dc.steps)
    bar = tqdm(range(state.step, stop), initial=state.step, total=dc.steps, disable=not progress,
               desc=f"distill {dc.divergence}")
    for step in bar:
        batch = to_jax(sample_batch(pools, mix, dc.batch, rng))
        params, opt_state, m = step_fn(params, opt_state, batch)
        m = {f"train/{k}": float(v) for k, v in m.items()}
        bar.set_postfix(loss=f"{m['train/loss']:.3f}", alpha=f"{m['train/alpha']:.3f}")
        done = step + 1
        if eval_sets and (done % dc.eval_every == 0 or done == stop):
            m.update(evaluate(params))
            history.append({"step": done, **{k: v for k, v in m.items() if k.startswith("eval/")}})
        if log:
            log(m, done)
        if ckpt_path is not None and (done % dc.ckpt_every == 0 or done == stop):
            save_checkpoint(ckpt_path, TrainState(params, opt_state, done, rng.bit_generator.state))
    if eval_sets and (not history or history[-1]["step"] != stop):
        history.append({"step": stop, **evaluate(params)})    # e.g. a resumed run with nothing left to do
    return params, history
