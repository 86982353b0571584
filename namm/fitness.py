"""Fitness of NAMM candidates: one interface, three backends (experiments.fitness builds each for a stage).

``Fitness.evaluate(population [P, D], items [B]) -> fitness [P]`` (higher is better; 1.0 ~ full-cache
parity). ``items`` index the backend's prompts; all candidates of a generation see the same items.

- ``stats`` (here, pure JAX): a simulation of the memory policy over recorded KV statistics
  (``namm.stats``), layer by layer. Softmax over a kept subset equals the full-cache probabilities
  renormalised over that subset, so at each update (every ``update_interval`` tokens) the
  candidate's features come from the full-cache attention rows of the block's queries renormalised
  over the tokens it still keeps - exact at that layer; only the drift that earlier layers'
  evictions cause in later layers' queries is ignored. The candidate scores and evicts; later
  queries (question and answer tokens weigh most, plus sampled context queries) are scored on the
  relative L2 error of their attention output over the kept tokens against the full cache:

      o_kept(t) = sum_{j in K(t)} p_tj v_j / sum_{j in K(t)} p_tj,   e_t = min(|o_kept - o_full| / |o_full|, cap)
      fitness   = 1 - sum_t w_t e_t / sum_t w_t - lambda * max(0, kept_fraction - target)

  Attention sinks: evicting the first tokens renormalises the whole row and the relative error
  explodes (design.md, "Measured before the first line of code"), while the model still half
  works. The per-query error is therefore clipped at ``error_cap`` (1.0: as bad as an all-zero
  output): losing a sink costs the most a query can cost, but cannot swamp every other signal.
  The proxy tracks fidelity, so it can never prefer a policy that beats the full cache; the
  ``task`` stage does that.

  Cost: what does not depend on the candidate (the full-cache probabilities, the evaluation
  queries' full outputs) is computed once per (prompt, layer) and shared by the whole population;
  candidates are mapped inside one jit, sharded over ``jax.devices()`` with ``shard_map``.

- ``task`` (``experiments.fitness.task``, PyTorch): the paper's fitness through the runtime.
- ``agreement`` (``experiments.fitness.agreement``, PyTorch): acceptance of the full-cache greedy answer
  through the cache one eviction at the end of the prefill leaves (prefill and features shared).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from namm import stats as kvstats
from namm.config import NAMMConfig
from namm.features import NormParams, NormStats
from namm.policy import Policy, make_policy
from namm.scoring import num_params
from namm.selection import budget_cap

log = logging.getLogger(__name__)

Array = jax.Array


class FitnessError(ValueError):
    """A fitness that cannot be built from the given data or settings."""


class Fitness(Protocol):
    """The interface ``namm.evolve`` drives."""

    num_items: int

    def evaluate(self, population: Array, items: np.ndarray) -> np.ndarray:
        """population ``[P, D]`` flat parameter vectors -> fitness ``[P]`` on the given items."""


@dataclass(frozen=True)
class StatsFitnessConfig:
    qa_weight: float = 4.0          # weight of a question/answer query relative to a context query
    context_queries: int = 32       # context queries sampled per prompt (after the first update)
    max_qa_queries: int = 64        # question + answer queries per prompt (the last ones if more)
    error_cap: float = 1.0          # per-query relative L2 error is clipped here (sinks; see above)
    budget_target: float = 0.5      # target kept fraction of the cache seen by the scored queries
    budget_weight: float = 1.0      # lambda of the cache-budget term
    policy_budget: float | int | None = None  # runtime cap the candidates run under (NAMMPolicy budget=...)
    layers: tuple[int, ...] | None = None  # model layers to simulate (None: every recorded layer)
    pop_chunk: int = 1              # candidates computed together on a device (lax.map batch size)
    max_tokens: int | None = None   # drop prompts longer than this (None: keep all)
    seed: int = 0

    @classmethod
    def from_mapping(cls, d: Mapping | None) -> "StatsFitnessConfig":
        d = dict(d or {})
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise FitnessError(f"fitness: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        if d.get("layers") is not None:
            d["layers"] = tuple(int(x) for x in d["layers"])
        if d.get("policy_budget") is not None:
            try:
                budget_cap(d["policy_budget"], 1)
            except ValueError as e:
                raise FitnessError(f"fitness.policy_budget: {e}") from None
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Data: recorded prompts padded to a common length, eval queries chosen once.


@dataclass
class StatsData:
    """Padded arrays of B prompts x L layers (NumPy, host memory)."""

    q: np.ndarray          # [B, L, Hq, T, d] fp16
    k: np.ndarray          # [B, L, Hkv, T, d] fp16
    v: np.ndarray          # [B, L, Hkv, T, d] fp16
    length: np.ndarray     # [B] int32 tokens of each prompt (prompt + answer)
    eval_idx: np.ndarray   # [B, M] int32 positions of the scored queries
    eval_w: np.ndarray     # [B, M] float32 their weights (0 = padding)
    score: np.ndarray      # [B] full-cache task score (the task fitness' normaliser)
    tasks: list[str]
    ids: list[str]
    layers: list[int]

    @property
    def num_items(self) -> int:
        return int(self.q.shape[0])


PAD_TO = 128  # simulated buffers are padded to a multiple of this many tokens


def _eval_queries(p: kvstats.PromptStats, n_up: int, cfg: StatsFitnessConfig, m: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Question/answer queries (weight qa_weight) + sampled later context queries (weight 1), padded to m."""
    t = p.num_tokens
    qa = np.arange(p.context_len, t)[-cfg.max_qa_queries:]
    ctx = np.arange(min(n_up, p.context_len), p.context_len)          # queries after the first update
    if len(ctx) > cfg.context_queries:
        ctx = np.sort(rng.choice(ctx, cfg.context_queries, replace=False))
    idx = np.concatenate([ctx, qa]).astype(np.int32)
    w = np.concatenate([np.ones(len(ctx)), np.full(len(qa), cfg.qa_weight)]).astype(np.float32)
    pad = m - len(idx)
    return np.pad(idx, (0, pad)), np.pad(w, (0, pad))


def load_stats_data(prompts: Sequence[kvstats.PromptStats], namm_cfg: NAMMConfig,
                    cfg: StatsFitnessConfig = StatsFitnessConfig()) -> StatsData:
    """Stack recorded prompts into padded arrays (length: the longest prompt rounded up to ``PAD_TO``).

    Not to a multiple of the update interval: an update fires only when its whole block fits in the
    prompt, so a tail shorter than the interval never triggers one, and padding it to a full block
    would only make every simulated step work on a longer buffer (and run one inactive update).
    """
    n_up = namm_cfg.features.update_interval
    prompts = [p for p in prompts if cfg.max_tokens is None or p.num_tokens <= cfg.max_tokens]
    if not prompts:
        raise FitnessError("no recorded prompts to simulate (all longer than fitness.max_tokens?); extract some")
    recorded = [int(x) for x in prompts[0].layers]
    layers = recorded if cfg.layers is None else list(cfg.layers)
    missing = sorted(set(layers) - set(recorded))
    if missing:
        raise FitnessError(f"fitness.layers {missing} were not recorded (recorded: {recorded}); re-extract or "
                           f"pick recorded layers")
    sel = [recorded.index(l) for l in layers]
    t_pad = int(np.ceil(max(p.num_tokens for p in prompts) / PAD_TO) * PAD_TO)
    m = cfg.context_queries + cfg.max_qa_queries
    rng = np.random.default_rng(cfg.seed)
    _, hq, _, d = prompts[0].q.shape
    hkv = prompts[0].k.shape[1]
    B, L = len(prompts), len(layers)
    q = np.zeros((B, L, hq, t_pad, d), np.float16)
    k = np.zeros((B, L, hkv, t_pad, d), np.float16)
    v = np.zeros((B, L, hkv, t_pad, d), np.float16)
    eidx, ew = np.zeros((B, m), np.int32), np.zeros((B, m), np.float32)
    for b, p in enumerate(prompts):
        if [int(x) for x in p.layers] != recorded or p.q.shape[1] != hq or p.k.shape[1] != hkv:
            raise FitnessError(f"prompt {p.id} was recorded with other layers/heads than the first prompt")
        t = p.num_tokens
        q[b, :, :, :t], k[b, :, :, :t], v[b, :, :, :t] = p.q[sel], p.k[sel], p.v[sel]
        eidx[b], ew[b] = _eval_queries(p, n_up, cfg, m, rng)
    return StatsData(q=q, k=k, v=v, length=np.array([p.num_tokens for p in prompts], np.int32), eval_idx=eidx,
                     eval_w=ew, score=np.array([p.score for p in prompts], np.float32),
                     tasks=[p.task for p in prompts], ids=[p.id for p in prompts], layers=layers)


# --------------------------------------------------------------------------------------------
# The simulation (pure JAX).


def _shared(q, k, v, length, eval_idx, n_up: int):
    """Candidate-independent part of one (prompt, layer): full-cache probabilities and outputs.

    q ``[Hq, T, d]``, k/v ``[Hkv, T, d]`` -> probs ``[Hq, T, T]``, eval probs ``[Hq, M, T]``,
    full outputs ``[Hq, M, d]``, values repeated per query head ``[Hq, T, d]``.
    """
    hq, t, d = q.shape
    group = hq // k.shape[0]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k_rep, v_rep = jnp.repeat(k, group, axis=0), jnp.repeat(v, group, axis=0)       # [Hq, T, d]
    pos = jnp.arange(t)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] < length)              # causal, real tokens
    logits = jnp.einsum("htd,hsd->hts", q, k_rep) / jnp.sqrt(jnp.float32(d))
    probs = jax.nn.softmax(jnp.where(allowed[None], logits, -jnp.inf), axis=-1)     # p_ts = softmax_s(q_t.k_s / sqrt d)
    probs = jnp.where(allowed[None], probs, 0.0)
    p_eval = probs[:, eval_idx, :]                                                   # [Hq, M, T]
    o_full = jnp.einsum("hmt,htd->hmd", p_eval, v_rep)                               # [Hq, M, d]
    return probs, p_eval, o_full, v_rep


def _renormalised_rows(block_probs, valid, group: int):
    """Full-cache rows ``[Hq, n, T]`` renormalised over ``valid [Hkv, T]`` and GQA-averaged -> ``[Hkv, n, T]``."""
    m = jnp.repeat(valid, group, axis=0).astype(jnp.float32)                        # [Hq, T]
    pm = block_probs * m[:, None, :]
    z = jnp.sum(pm, axis=-1, keepdims=True)                                          # sum_{j kept} p_tj
    rows = pm / jnp.maximum(z, 1e-30)                                                # softmax over the kept subset
    hq, n, t = rows.shape
    return rows.reshape(hq // group, group, n, t).mean(axis=1)                       # GQA average


def simulate(policy: Policy, params, q, k, v, length, eval_idx, eval_w, shared, n_up: int,
             cfg: StatsFitnessConfig):
    """One candidate on one (prompt, layer) -> (fitness, error, kept_fraction) scalars."""
    probs, p_eval, o_full, v_rep = shared
    hq, t, _ = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    num_updates = t // n_up
    pos = jnp.arange(t, dtype=jnp.int32)
    kf = k.astype(jnp.float32)

    # The updates are unrolled so that update u works on a buffer of only the (u + 1) * n_up slots that
    # can hold tokens by then (the tokens after its block are not in the cache yet): the early updates,
    # and BAM's O(N^2) attention in them, cost a fraction of a full-length buffer. The state grows
    # between updates by padding every leaf's slot axis (axis 1) with empty slots (zeros: invalid).
    state, kept, cap_prev = policy.init(hkv, 0), jnp.zeros((hkv, 0), bool), 0
    keeps = [jnp.ones((hkv, t), bool)]                                               # row 0: no update yet
    for u in range(num_updates):
        start, cap = u * n_up, min(t, (u + 1) * n_up)
        grow = lambda a: jnp.pad(a, [(0, 0), (0, cap - cap_prev)] + [(0, 0)] * (a.ndim - 2))
        state, kept = jax.tree.map(grow, state), grow(kept)
        block = (pos[:cap] >= start) & (pos[:cap] < start + n_up)
        valid = kept | block[None, :]                                                # kept so far + the new block
        rows = _renormalised_rows(probs[:, start:start + n_up, :cap], valid, group)   # [Hkv, n, cap]
        new_state, _, keep = policy.update(params, state, rows, pos[:cap], valid, keys=kf[:, :cap])
        active = start + n_up <= length                                              # the update fires
        kept = jnp.where(active, keep, valid)
        state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
        keeps.append(jnp.pad(kept, [(0, 0), (0, t - cap)]))
        cap_prev = cap
    keeps = jnp.stack(keeps)                                                         # [U+1, Hkv, T]
    c = eval_idx // n_up                                                             # updates done before query t
    mask = keeps[c] | (pos[None, None, :] >= (c * n_up)[:, None, None])              # [M, Hkv, T] K(t)
    mask_hq = jnp.repeat(jnp.swapaxes(mask, 0, 1), group, axis=0)                    # [Hq, M, T]
    pm = p_eval * mask_hq
    z = jnp.sum(pm, axis=-1, keepdims=True)
    o_kept = jnp.einsum("hmt,htd->hmd", pm, v_rep) / jnp.maximum(z, 1e-30)          # o_kept(t)
    err = jnp.linalg.norm(o_kept - o_full, axis=-1) / (jnp.linalg.norm(o_full, axis=-1) + 1e-6)
    err = jnp.minimum(jnp.where(z[..., 0] > 0, err, cfg.error_cap), cfg.error_cap)   # [Hq, M] e_t, clipped
    w = eval_w[None, :]
    error = jnp.sum(err * w) / jnp.maximum(jnp.sum(w) * hq, 1e-9)
    seen = (pos[None, :] <= eval_idx[:, None]).astype(jnp.float32)                  # [M, T]
    kept_frac = jnp.sum(mask * seen[:, None, :], axis=-1) / jnp.sum(seen, -1)[:, None]  # [M, Hkv]
    has = (eval_w > 0).astype(jnp.float32)
    kept = jnp.sum(kept_frac.mean(-1) * has) / jnp.maximum(jnp.sum(has), 1.0)
    kept = jnp.where(jnp.sum(has) > 0, kept, 1.0)
    fitness = 1.0 - error - cfg.budget_weight * jnp.maximum(0.0, kept - cfg.budget_target)
    return fitness, error, kept


def _batch_fn(policy: Policy, n_up: int, cfg: StatsFitnessConfig):
    """``(pop [P, D], q, k, v [B, L, ...], length [B], eval_idx, eval_w [B, M]) -> 3 x [P]`` (means over B x L)."""

    def run(pop, q, k, v, length, eval_idx, eval_w):
        b, l = q.shape[:2]
        flat = lambda x: x.reshape((b * l,) + x.shape[2:])
        items = (flat(q), flat(k), flat(v), jnp.repeat(length, l), jnp.repeat(eval_idx, l, axis=0),
                 jnp.repeat(eval_w, l, axis=0))

        def body(acc, item):
            qi, ki, vi, li, ei, wi = item
            shared = _shared(qi, ki, vi, li, ei, n_up)                                # once for the population
            one = lambda p: jnp.stack(simulate(policy, p, qi, ki, vi, li, ei, wi, shared, n_up, cfg))
            out = jax.lax.map(one, pop, batch_size=cfg.pop_chunk)                      # [P_local, 3]
            return acc + out, None

        acc, _ = jax.lax.scan(body, jnp.zeros((pop.shape[0], 3), jnp.float32), items)
        return acc / (b * l)

    return run


class StatsFitness:
    """The ``stats`` backend over a kv_stats store (see the module docstring)."""

    def __init__(self, data: StatsData, namm_cfg: NAMMConfig, cfg: StatsFitnessConfig = StatsFitnessConfig(),
                 norm: NormParams | None = None, devices=None):
        self.data, self.namm_cfg, self.cfg = data, namm_cfg, cfg
        self.n_up = namm_cfg.features.update_interval
        self.num_params = num_params(namm_cfg)
        self.norm = norm if norm is not None else calibrate_norm(data, namm_cfg)
        self.devices = list(devices if devices is not None else jax.devices())
        self._fns: dict[Any, Any] = {}
        self.last_details: dict[str, np.ndarray] = {}

    @property
    def num_items(self) -> int:
        return self.data.num_items

    def _compiled(self, key, policy: Policy, pop_size: int):
        if key not in self._fns:
            run = _batch_fn(policy, self.n_up, self.cfg)
            n_dev = len(self.devices)
            if n_dev > 1 and pop_size % n_dev == 0:
                mesh = Mesh(np.asarray(self.devices), ("pop",))
                rep = PartitionSpec()
                run = jax.shard_map(run, mesh=mesh, in_specs=(PartitionSpec("pop"),) + (rep,) * 6,
                                    out_specs=PartitionSpec("pop"), check_vma=False)
            self._fns[key] = jax.jit(run)
        return self._fns[key]

    def _arrays(self, items):
        d = self.data
        items = np.asarray(items, np.int64)
        return (d.q[items], d.k[items], d.v[items], d.length[items], d.eval_idx[items], d.eval_w[items])

    def evaluate(self, population, items) -> np.ndarray:
        population = jnp.asarray(population, jnp.float32)
        if population.ndim != 2 or population.shape[1] != self.num_params:
            raise FitnessError(f"population has shape {tuple(population.shape)}, expected [P, {self.num_params}]")
        policy = make_policy(self.namm_cfg, self.norm, budget=self.cfg.policy_budget)
        fn = self._compiled(("namm", population.shape[0]), policy, population.shape[0])
        out = np.asarray(fn(population, *self._arrays(items)))
        self.last_details = {"error": out[:, 1], "kept_fraction": out[:, 2]}
        return out[:, 0]

    def evaluate_policy(self, policy: Policy, items, name: str = "baseline") -> dict[str, float]:
        """A baseline (``namm.baselines``) or any ``Policy`` under the same simulation (params=None)."""
        fn = self._compiled((name, "policy"), _NoParams(policy), 1)
        out = np.asarray(fn(jnp.zeros((1, 1), jnp.float32), *self._arrays(items)))[0]
        return {"fitness": float(out[0]), "error": float(out[1]), "kept_fraction": float(out[2])}


def _NoParams(policy: Policy) -> Policy:
    return Policy(init=policy.init, update=lambda params, *a, **kw: policy.update(None, *a, **kw))


def calibrate_norm(data: StatsData, namm_cfg: NAMMConfig, max_items: int | None = None) -> NormParams:
    """Feature normalisation statistics from a full-cache (keep-all) pass over the recorded prompts.

    Mean/variance per frequency bin of the raw EMA spectrogram, pooled over prompts, layers, heads
    and tokens (Chan merge; reference 2.4): what a zero-parameter NAMM sees, frozen for training.
    """
    f = namm_cfg.features
    n_up = f.update_interval
    policy = make_policy(namm_cfg, None)
    zeros = jnp.zeros((num_params(namm_cfg),), jnp.float32)

    @jax.jit
    def emas(q, k, v, length):
        probs, _, _, _ = _shared(q, k, v, length, jnp.zeros((1,), jnp.int32), n_up)
        hq, t, _ = q.shape
        group = hq // k.shape[0]
        pos = jnp.arange(t, dtype=jnp.int32)

        def step(state, u):
            start = u * n_up
            valid = jnp.broadcast_to(pos < start + n_up, (k.shape[0], t))
            rows = _renormalised_rows(jax.lax.dynamic_slice_in_dim(probs, start, n_up, axis=1), valid, group)
            new_state, _, keep = policy.update(zeros, state, rows, pos, valid)
            active = start + n_up <= length
            return new_state, (new_state.ema, keep & active)

        _, (ema, valid) = jax.lax.scan(step, policy.init(k.shape[0], t), jnp.arange(t // n_up))
        return ema, valid

    acc = NormStats.init(f.spec_dim)
    n = data.num_items if max_items is None else min(max_items, data.num_items)
    for b in range(n):
        for l in range(len(data.layers)):
            ema, valid = emas(data.q[b, l], data.k[b, l], data.v[b, l], data.length[b])
            acc = acc.update(ema, valid)
    if float(acc.count) == 0:
        raise FitnessError(f"no prompt reaches one policy update ({n_up} tokens); extract longer prompts "
                           f"or lower features.update_interval")
    return acc.finalize()


def stats_fitness_from_dir(stats_dir, namm_cfg: NAMMConfig, cfg: StatsFitnessConfig = StatsFitnessConfig(),
                           names: Sequence[str] | None = None, norm: NormParams | None = None) -> StatsFitness:
    return StatsFitness(load_stats_data(kvstats.load_prompts(stats_dir, names), namm_cfg, cfg), namm_cfg, cfg,
                        norm=norm)
