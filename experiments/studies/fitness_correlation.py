"""Does the ``stats`` fitness rank eviction policies the way the task does? Spearman over >= 16 policies.

    python -m experiments.studies.fitness_correlation --model smollm2 --prompts 12 \
        [--ckpt outputs/namm/smollm2/builtin_i1/evolution] [--out-dir outputs/fitness_correlation]

The same training-split prompts of the built-in suite (``--tasks``, ``--context-length``,
``--prompts``, interleaved over the tasks) are extracted once (``experiments.extract``: full-cache
greedy answer + post-RoPE q/k/v of ``--layers`` layers, resumable) and every policy is measured
twice on them:

1. **stats** - the training proxy (``namm.fitness.StatsFitness``, config ``--fitness KEY=VALUE``):
   fitness, its attention-output error and the kept fraction it sees, with the norm statistics of
   the checkpoint (``norm_stats.json`` beside it) or calibrated on these prompts. NAMM candidates go
   through ``StatsFitness.evaluate`` as one population, so the candidate-independent attention is
   computed once; the JAX baselines (``namm.baselines``, knobs of ``configs/policy/<name>.yaml``) go
   through the same jitted simulation as one population too: a ``lax.switch`` over the baselines
   indexed by the parameter vector (equal to ``StatsFitness.evaluate_policy``, checked by the test).
   ``random`` gets its PRNG key folded from the tokens seen (same law as the runtime's, other draws).
2. **runtime** - the same policy in ``namm.torch`` (``NAMMPolicy.from_flat`` / ``build_policy``
   with the knobs of ``configs/policy/<name>.yaml`` and the NAMM's chunk and update schedule):
   ``namm.torch.generate.prefill`` over the prompt with the policy's cache, as ``greedy_generate``
   does (question inside compression unless ``--question-outside-compression``; the baselines'
   end-of-prefill update as at test time); then the reference answer (``answers[0]``) is
   teacher-forced through the compressed cache as decoding would feed it - runs of tokens between
   two updates in one forward, so evictions fall after the same tokens as token by token. The task
   measure is the mean log-probability per answer token, averaged over prompts. A copy of the
   prefilled cache decodes greedily (``--max-new-tokens``; default the task's own) for the task
   metric, for information. The first ``update_interval`` tokens, identical for every policy (no
   eviction before the first update), are prefilled once per prompt and handed to each policy
   (bit-identical to a run from token 0; ``--no-share-prefix`` turns it off).

Policies: NAMM candidates (the keep-all zero vector; the mean and ``--samples`` draws
``mean + sigma * B D z`` of every CMA-ES checkpoint under ``--ckpt``; ``--per-sigma`` random vectors
``N(0, s^2 I)`` for each ``s`` in ``--sigmas``) and the baselines at each of ``--budgets``
(``full`` once). Outputs in ``--out-dir``: ``fitness_correlation.json`` (per policy and per
prompt), ``.md`` (table), ``.png`` (stats fitness vs answer log-lik, colour by family), and a
resumable ``runtime_cache.jsonl``. Spearman rho is reported over all policies, the NAMM candidates
alone and the baselines alone (and within each prompt, averaged); the headline is printed last.
Deterministic given ``--seed``. A rerun with other ``--fitness`` settings reuses the extraction and
the runtime results and only recomputes the stats side.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASELINE_NAMES = ("full", "recency", "streamingllm", "random", "h2o", "l2", "snapkv")
DEFAULT_TASKS = "passkey,needle_qa,kv_retrieval"
OUT_NAME = "fitness_correlation"


class StudyError(ValueError):
    """Bad input for the study (missing checkpoint directory, unknown task or policy, ...)."""


@dataclass
class Candidate:
    """One policy of the study."""

    name: str
    kind: str                        # "namm" | "baseline"
    family: str                      # plot colour: namm-keepall | namm-random | namm-ckpt | <baseline name>
    flat: np.ndarray | None = None   # NAMM parameter vector
    norm_key: str = "default"        # which normalisation statistics the NAMM uses
    baseline: str | None = None
    budget: float | None = None
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Input checks (before anything heavy is loaded)


def parse_list(text: str, kind=str) -> list:
    try:
        return [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise StudyError(f"{text!r}: expected a comma-separated list of numbers") from None


def check_inputs(a) -> None:
    from experiments.tasks import GENERATED

    tasks = parse_list(a.tasks)
    bad = [t for t in tasks if t not in GENERATED]
    if not tasks or bad:
        raise StudyError(f"unknown task {bad[0] if bad else '(none)'!r} in --tasks; use built-in tasks from "
                         f"{', '.join(GENERATED)}")
    bad = [b for b in parse_list(a.baselines) if b not in BASELINE_NAMES]
    if bad:
        raise StudyError(f"unknown baseline {bad[0]!r} in --baselines; use {', '.join(BASELINE_NAMES)}")
    for b in parse_list(a.budgets, float):
        if not 0.0 < b <= 1.0:
            raise StudyError(f"--budgets {b}: budgets are fractions of the tokens seen, in (0, 1]")
    for s in parse_list(a.sigmas, float):
        if s <= 0:
            raise StudyError(f"--sigmas {s}: scales must be positive")
    if a.prompts < 1 or a.context_length < 8 or a.samples < 0 or a.per_sigma < 0:
        raise StudyError("--prompts >= 1, --context-length >= 8, --samples >= 0 and --per-sigma >= 0 are required")
    for d in a.ckpt or []:
        find_checkpoints(d)


def find_checkpoints(d: str | Path) -> list[Path]:
    """``*.npz`` in DIR, else in DIR/evolution, else in DIR/*/evolution (a runs root with stages); or one .npz file."""
    d = Path(d)
    if d.is_file() and d.suffix == ".npz":
        return [d]
    if not d.is_dir():
        raise StudyError(f"--ckpt {d}: no such directory; point it at a run's evolution/ folder "
                         f"(written by python -m experiments.train_namm)")
    for pattern in ("*.npz", "evolution/*.npz", "*/evolution/*.npz"):
        found = sorted(d.glob(pattern))
        if found:
            return found
    raise StudyError(f"--ckpt {d}: no CMA-ES checkpoints (*.npz, evolution/*.npz or */evolution/*.npz) in it")


# --------------------------------------------------------------------------------------------
# NAMM candidates


def _ckpt_info(path: Path) -> dict:
    from namm.evolve import EvolutionError

    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["info_json"]))
    except (OSError, ValueError, KeyError) as e:
        raise EvolutionError(f"checkpoint {path} cannot be read ({e})") from None


def checkpoint_candidates(paths: Sequence[Path], samples: int, seed: int, namm_dims: int) -> list[Candidate]:
    """The mean and ``samples`` draws of the ES distribution of each checkpoint (duplicates skipped)."""
    import jax

    from namm.evolve import EvolutionConfig, load_checkpoint, make_strategy

    out, seen = [], []
    for ci, path in enumerate(paths):
        meta = _ckpt_info(path).get("meta", {})
        dims = int(meta.get("num_dims", -1))
        if dims != namm_dims:
            raise StudyError(f"checkpoint {path} has {dims} parameters; the NAMM config has {namm_dims}")
        es_cfg = EvolutionConfig(population_size=int(meta["population_size"]), elite_ratio=float(meta["elite_ratio"]),
                                 sigma_init=float(meta["sigma_init"]))
        es, params = make_strategy(dims, es_cfg)
        template = es.init(jax.random.key(0), jax.numpy.zeros(dims, jax.numpy.float32), params)
        ck = load_checkpoint(path, template)
        mean = np.asarray(ck.state.mean, np.float32)
        if any(g == ck.generation and np.array_equal(m, mean) for g, m in seen):
            log.info("%s repeats an earlier checkpoint (generation %d); skipped", path, ck.generation)
            continue
        seen.append((ck.generation, mean))
        stage = path.parent.parent.name if path.parent.name == "evolution" else path.parent.name
        tag = f"{stage}/{path.stem}@g{ck.generation}"
        norm_key = str(path.parent / "norm_stats.json")
        base = {"checkpoint": str(path), "generation": ck.generation, "sigma": float(ck.state.std)}
        out.append(Candidate(f"namm:{tag}:mean", "namm", "namm-ckpt", mean, norm_key, meta={**base, "sample": None}))
        # x = m + sigma * B (D * z), z ~ N(0, I): what CMA-ES's ask draws (with the stored eigenbasis)
        rng = np.random.default_rng([seed, 7, ci])
        b, dd, std = (np.asarray(x, np.float64) for x in (ck.state.B, ck.state.D, ck.state.std))
        for s in range(samples):
            z = rng.standard_normal(dims)
            x = (mean + std * (b @ (dd * z))).astype(np.float32)
            out.append(Candidate(f"namm:{tag}:s{s}", "namm", "namm-ckpt", x, norm_key, meta={**base, "sample": s}))
    return out


def random_candidates(dims: int, sigmas: Sequence[float], per_sigma: int, seed: int, norm_key: str) -> list[Candidate]:
    out = []
    for si, s in enumerate(sigmas):
        rng = np.random.default_rng([seed, 11, si])
        for i in range(per_sigma):
            flat = (s * rng.standard_normal(dims)).astype(np.float32)
            out.append(Candidate(f"namm:random(s={s:g})#{i}", "namm", "namm-random", flat, norm_key,
                                 meta={"sigma": float(s), "sample": i}))
    return out


def namm_config_for(paths: Sequence[Path], update_interval: int | None, chunk_size: int | None):
    """The checkpoints' NAMM config (from their fingerprint; all must agree), else the default; CLI overrides win."""
    from dataclasses import replace

    from namm.config import NAMMConfig

    cfgs = {}
    for p in paths:
        d = _ckpt_info(p).get("meta", {}).get("fingerprint", {}).get("namm")
        if d is not None:
            cfgs[json.dumps(d, sort_keys=True)] = d
    if len(cfgs) > 1:
        raise StudyError(f"the checkpoints under --ckpt were trained with {len(cfgs)} different NAMM configs; "
                         f"pass checkpoints of one schedule")
    cfg = NAMMConfig.from_dict(next(iter(cfgs.values()))) if cfgs else NAMMConfig()
    f = cfg.features
    if update_interval is not None or chunk_size is not None:
        f = replace(f, update_interval=int(update_interval or f.update_interval),
                    chunk_size=int(chunk_size or f.chunk_size))
    return NAMMConfig(f, cfg.scorer, cfg.selection)


def load_norm_file(path: str | Path):
    d = json.loads(Path(path).read_text())
    return np.asarray(d["mean"], np.float32), np.asarray(d["var"], np.float32)


# --------------------------------------------------------------------------------------------
# Baselines: the JAX policy for the stats simulation, the runtime config for namm.torch


def policy_knobs(name: str) -> dict:
    """Knobs of ``configs/policy/<name>.yaml`` (what experiments.evaluate uses at test time)."""
    from experiments.lib.cli import policy_yaml

    d = policy_yaml(name) or {}
    d.pop("name", None)
    d.pop("budget", None)
    return {k: v for k, v in d.items() if v is not None}


def runtime_baseline_cfg(name: str, budget: float | None, namm_cfg, seed: int) -> dict:
    knobs = policy_knobs(name)
    knobs["chunk_size"] = namm_cfg.features.chunk_size
    if name == "full":
        return {"name": "full", "chunk_size": knobs["chunk_size"]}
    knobs["update_interval"] = namm_cfg.features.update_interval
    if name == "random":
        knobs["seed"] = seed
    return {"name": name, "budget": budget, **knobs}


def jax_baseline(name: str, budget: float | None, seed: int):
    """``namm.baselines`` policy with the yaml knobs it takes; ``random`` gets a key folded from the tokens seen."""
    import inspect

    import jax
    import jax.numpy as jnp

    from namm import baselines
    from namm.policy import Policy

    if name == "full":
        return baselines.full()
    params = inspect.signature(baselines.BASELINES[name]).parameters
    knobs = {k: v for k, v in policy_knobs(name).items() if k in params and k != "budget"}
    pol = baselines.make_baseline(name, budget=budget, **knobs)
    if name != "random":
        return pol
    key = jax.random.key(seed)

    def update(params, state, rows, positions, valid, *, keys=None, rng=None, layer=None):
        latest = jnp.max(jnp.where(valid, positions, -1))
        return pol.update(params, state, rows, positions, valid, keys=keys, rng=jax.random.fold_in(key, latest),
                          layer=layer)

    return Policy(init=pol.init, update=update)


def switch_policy(policies: Sequence):
    """One ``Policy`` whose parameter vector ``[1]`` selects which of ``policies`` runs (``lax.switch``)."""
    import jax
    import jax.numpy as jnp

    from namm.policy import Policy

    def update(params, state, rows, positions, valid, *, keys=None, rng=None, layer=None):
        branches = [lambda ops, p=p: p.update(None, *ops, keys=keys, rng=rng, layer=layer) for p in policies]
        index = jnp.clip(jnp.round(params[0]).astype(jnp.int32), 0, len(policies) - 1)
        return jax.lax.switch(index, branches, (state, rows, positions, valid))

    return Policy(init=policies[0].init, update=update)


def evaluate_baselines(fit, policies: Sequence, items, names: Sequence[str]) -> np.ndarray:
    """``[n, 3]`` (fitness, error, kept fraction) of the JAX baselines, as one population of one jitted simulation.

    Uses ``StatsFitness``'s jit cache and data slicing (``_compiled``, ``_arrays``): the same simulation as
    ``evaluate_policy``, but the candidate-independent attention is computed once for all the baselines.
    """
    import jax.numpy as jnp

    n = len(policies)
    fn = fit._compiled(("study-baselines", tuple(names)), switch_policy(policies), n)
    index = jnp.arange(n, dtype=jnp.float32)[:, None]
    return np.asarray(fn(index, *fit._arrays(items)), np.float64)


# --------------------------------------------------------------------------------------------
# Runtime measure


def _prompt_tensors(prompt, device):
    import torch

    ctx = torch.tensor([prompt.context_ids], dtype=torch.long, device=device)
    q = torch.tensor([prompt.question_ids], dtype=torch.long, device=device) if prompt.question_ids else None
    return ctx, q


def _compressed_ids(prompt, device, compress_question: bool):
    """The tokens that go through compression (the whole prompt, or the context only)."""
    ctx, q = _prompt_tensors(prompt, device)
    if q is not None and compress_question:
        import torch

        return torch.cat([ctx, q], dim=1)
    return ctx


def _recorder_policy(chunk_size: int):
    """A keep-all policy that buffers queries and never updates: it records the policy-independent prefix."""
    from namm.torch.cache import PolicyUpdate, TorchPolicy

    class SharedPrefix(TorchPolicy):
        name = "shared-prefix"
        needs_attention = True

        def update(self, state, *args, **kwargs):
            return PolicyUpdate(state=state)

    rec = SharedPrefix()
    rec.chunk_size = int(chunk_size)
    return rec


def shared_prefix(model, prompt, chunk_size: int, update_interval: int | None, compress_question: bool):
    """Cache after the first ``update_interval`` prompt tokens, which every policy processes identically
    (no eviction before the first update); None when the compressed part is not longer than that."""
    from namm.torch.generate import prefill

    device = next(model.parameters()).device
    ids = _compressed_ids(prompt, device, compress_question)
    if not update_interval or update_interval % chunk_size or ids.shape[1] <= update_interval:
        return None
    import torch

    cache = _recorder_policy(chunk_size).make_cache(model)
    with torch.no_grad():
        prefill(model, cache, ids[:, :update_interval])
    return cache


def adopt(shared, policy, model):
    """A copy of the shared-prefix cache handed to ``policy``, in the state a run of ``policy`` from
    token 0 would have reached: buffered queries as the policy keeps them, and the update at the end
    of the prefix (a layer's eviction never changes the other layers' output for the same tokens)."""
    import torch

    policy.check_model(model)
    cache = copy.deepcopy(shared)
    cache.policy = policy
    interval = policy.update_interval
    for layer in cache.layers:
        layer.policy = policy
        if not policy.needs_attention:
            layer.queries, layer.scaling = [], None
        elif getattr(policy, "query_window", None):
            layer._trim_queries(policy.query_window)
        if interval and layer.seen // interval > layer.last_update_seen // interval:
            with torch.no_grad():
                layer.run_update(final=False)
    return cache


def teacher_forced_logprobs(model, cache, first_logits, answer_ids: Sequence[int]) -> list[float]:
    """log p(answer_i | prompt, answer_<i) through the (compressed) cache.

    The answer tokens are fed as decoding feeds them, except that runs of tokens between two policy
    updates go in one forward: segments end at the logical multiples of the update interval, so the
    evictions happen after the same tokens as in token-by-token decoding (same maths, batched).
    """
    import torch

    device = first_logits.device
    logps = [float(torch.log_softmax(first_logits[0].double(), -1)[int(answer_ids[0])])]
    feed = torch.tensor([list(answer_ids[:-1])], dtype=torch.long, device=device)
    interval = None if cache.layers[0].frozen else cache.policy.update_interval
    pos = 0
    while pos < feed.shape[1]:
        seen = cache.seen_tokens
        stop = feed.shape[1] if not interval else min(feed.shape[1], pos + interval - seen % interval)
        positions = torch.arange(seen, seen + stop - pos, device=device)[None]
        logits = model(input_ids=feed[:, pos:stop], position_ids=positions, past_key_values=cache,
                       use_cache=True).logits[0]                                # [n, vocab]
        lp = torch.log_softmax(logits.double(), -1)
        logps += [float(lp[i, int(answer_ids[pos + i + 1])]) for i in range(stop - pos)]
        pos = stop
    return logps


def runtime_measure(model, tokenizer, policy, prompt, answer_ids: Sequence[int], row, *, compress_question: bool,
                    max_new_tokens: int | None, eos: Sequence[int], shared=None) -> dict:
    """Prefill with ``policy``'s cache (as ``greedy_generate``; from ``shared``'s prefix when given), then the
    teacher-forced answer log-lik and (on a copy of the cache) the greedy answer and its task score."""
    import torch

    from experiments.extract import cut_at_stop
    from experiments.tasks import get_spec, score_prediction
    from namm.torch.cache import FullPolicy
    from namm.torch.generate import _forward, prefill

    device = next(model.parameters()).device
    ctx, q = _prompt_tensors(prompt, device)
    policy = policy or FullPolicy()
    done = 0
    if shared is not None:
        cache, done = adopt(shared, policy, model), shared.seen_tokens
    else:
        cache = policy.make_cache(model)
    with torch.no_grad():
        if q is not None and q.shape[1] > 0 and compress_question:            # as greedy_generate
            logits = prefill(model, cache, torch.cat([ctx, q], dim=1)[:, done:])
            cache.end_prefill()
        else:
            logits = prefill(model, cache, ctx[:, done:]) if ctx.shape[1] > done else None
            cache.end_prefill()
            if q is not None and q.shape[1] > 0:
                cache.freeze()
                logits = prefill(model, cache, q)
        kv_prefill = cache.kv_fraction()
        greedy_cache = copy.deepcopy(cache) if max_new_tokens != 0 else None
        logps = teacher_forced_logprobs(model, cache, logits, answer_ids)
        out = {"answer_loglik": float(np.mean(logps)), "answer_tokens": len(answer_ids),
               "kept_fraction": kv_prefill, "kept_fraction_after_answer": cache.kv_fraction()}
        if greedy_cache is None:
            return out
        spec = get_spec(row["dataset"])
        n_new = spec.max_new_tokens if max_new_tokens is None else min(spec.max_new_tokens, max_new_tokens)
        stops = list(spec.stops(prompt.chat)) or None
        tokens, cur = [], logits                                              # greedy_generate's decode loop
        while True:
            token = int(cur.argmax(-1).item())
            tokens.append(token)
            if token in eos or len(tokens) >= n_new:
                break
            if stops and any(s in tokenizer.decode(tokens) for s in stops):
                break
            cur = _forward(model, greedy_cache, torch.tensor([[token]], device=device))
    text = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), spec.stops(prompt.chat))
    out.update(greedy_tokens=tokens, greedy_text=text, greedy_score=float(score_prediction(row["dataset"], text, row)))
    return out


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if not ids:
        raise StudyError(f"the reference answer {answer!r} tokenises to nothing")
    return list(ids)


class RuntimeCache:
    """``runtime_cache.jsonl``: one line per (policy, prompt) result, keyed by everything that determines it."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled, self.rows = path, enabled, {}
        if enabled and path.exists():
            for line in path.read_text().splitlines():
                try:
                    d = json.loads(line)
                    self.rows[d["key"]] = d["result"]
                except (json.JSONDecodeError, KeyError):
                    continue          # a torn last line from a killed run

    @staticmethod
    def key(*parts) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
            h.update(b"|")
        return h.hexdigest()[:24]

    def get(self, key: str):
        return self.rows.get(key)

    def put(self, key: str, result: dict) -> None:
        self.rows[key] = result
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "result": result}) + "\n")


# --------------------------------------------------------------------------------------------
# Correlation, report


def spearman(x: Sequence[float], y: Sequence[float]) -> dict:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "p": None, "n": int(len(x))}
    r = spearmanr(x, y)
    return {"rho": float(r.statistic), "p": float(r.pvalue), "n": int(len(x))}


def correlations(policies: Sequence[dict], budget_target: float | None = None) -> dict:
    """Spearman against the answer log-likelihood, per group of policies.

    ``within_budget`` (when ``budget_target`` is given): the policies whose simulated kept fraction is at
    most the fitness's budget target, where the budget term is zero and the fitness is pure fidelity.
    """
    groups = [("all", lambda p: True), ("namm", lambda p: p["kind"] == "namm"),
              ("baselines", lambda p: p["kind"] == "baseline")]
    if budget_target is not None:
        groups.append(("within_budget", lambda p: p["stats_kept_fraction"] <= budget_target + 1e-6))
    out = {}
    for group, sel in groups:
        ps = [p for p in policies if sel(p)]
        ll = [p["answer_loglik"] for p in ps]
        out[group] = {"stats_fitness": spearman([p["stats_fitness"] for p in ps], ll),
                      "neg_error": spearman([-p["stats_error"] for p in ps], ll),
                      "runtime_kept_fraction": spearman([p["runtime_kept_fraction"] for p in ps], ll),
                      "greedy_score": spearman([p["greedy_score"] for p in ps if p["greedy_score"] is not None],
                                               [p["answer_loglik"] for p in ps if p["greedy_score"] is not None])}
        # the same ranking within each prompt, averaged over prompts (how stable the proxy is per prompt)
        rhos = [spearman([p["per_prompt"][j]["stats_fitness"] for p in ps], [p["per_prompt"][j]["answer_loglik"]
                                                                             for p in ps])["rho"]
                for j in range(len(ps[0]["per_prompt"]) if ps else 0)]
        rhos = [r for r in rhos if r is not None]
        out[group]["per_prompt_mean_rho"] = float(np.mean(rhos)) if rhos else None
    return out


def _fmt(x, nd=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "nan" if not math.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


def markdown(result: dict) -> str:
    c = result["spearman"]
    lines = [f"# stats fitness vs answer log-likelihood ({result['model']})", "",
             f"{len(result['prompts'])} prompts ({', '.join(result['tasks'])} @ {result['context_length']} tokens, "
             f"split=train), {len(result['policies'])} policies, question in compression: "
             f"{result['question_in_compression']}.", "",
             "| group | n | rho(stats fitness, log-lik) | p | rho(-error, log-lik) | rho(runtime kept, log-lik) | "
             "mean per-prompt rho |", "|---|---|---|---|---|---|---|"]
    for g in [g for g in ("all", "namm", "baselines", "within_budget") if g in c]:
        s, e, k = c[g]["stats_fitness"], c[g]["neg_error"], c[g]["runtime_kept_fraction"]
        lines.append(f"| {g} | {s['n']} | {_fmt(s['rho'], 3)} | {_fmt(s['p'], 4)} | {_fmt(e['rho'], 3)} | "
                     f"{_fmt(k['rho'], 3)} | {_fmt(c[g]['per_prompt_mean_rho'], 3)} |")
    lines += ["", "| policy | kind | family | budget | stats fitness | stats error | stats kept | runtime kept | "
                  "answer log-lik | greedy score |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in sorted(result["policies"], key=lambda p: -p["stats_fitness"]):
        lines.append(f"| {p['name']} | {p['kind']} | {p['family']} | {_fmt(p['budget'])} | {_fmt(p['stats_fitness'])} | "
                     f"{_fmt(p['stats_error'])} | {_fmt(p['stats_kept_fraction'], 3)} | "
                     f"{_fmt(p['runtime_kept_fraction'], 3)} | {_fmt(p['answer_loglik'])} | "
                     f"{_fmt(p['greedy_score'], 3)} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ps = result["policies"]
    families = sorted({p["family"] for p in ps}, key=lambda f: (f.startswith("namm"), f))   # NAMM drawn on top
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, label in ((axes[0], "stats_fitness", "stats fitness"), (axes[1], "stats_error", "stats error")):
        for i, fam in enumerate(families):
            sel = [p for p in ps if p["family"] == fam]
            ax.scatter([p[key] for p in sel], [p["answer_loglik"] for p in sel], color=cmap(i % cmap.N),
                       marker="o" if fam.startswith("namm") else "s", s=36, label=fam, edgecolors="k", linewidths=0.4)
            for p in sel:
                if p["budget"] is not None:
                    ax.annotate(f"{p['budget']:g}", (p[key], p["answer_loglik"]), fontsize=6, xytext=(3, 2),
                                textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("answer log-lik (mean log-prob per token)")
        ax.grid(alpha=0.3)
    s = result["spearman"]["all"]
    axes[0].set_title(f"Spearman rho = {_fmt(s['stats_fitness']['rho'], 3)} (n={s['stats_fitness']['n']})")
    axes[1].set_title(f"Spearman rho(-error) = {_fmt(s['neg_error']['rho'], 3)}")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"{result['model']}: {len(result['prompts'])} prompts, {len(ps)} policies", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------------------------
# The study


def _model_settings(spec: str) -> tuple[bool, int | None]:
    """(chat, max_context) from ``configs/model/<spec>.yaml`` when there is one."""
    path = CONFIGS / "model" / f"{spec}.yaml"
    if not path.exists():
        return False, None
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return bool(d.get("chat", False)), d.get("max_context")


def _interleave(rows: Sequence[dict], n: int) -> list[dict]:
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["dataset"], []).append(r)
    out, i = [], 0
    while len(out) < n and any(i < len(v) for v in by_task.values()):
        out += [v[i] for v in by_task.values() if i < len(v)]
        i += 1
    return out[:n]


def _fitness_cfg(overrides: Sequence[str], seed: int, sim_layers: tuple | None):
    from namm.fitness import StatsFitnessConfig

    d: dict[str, Any] = {"seed": seed, "layers": sim_layers}
    for o in overrides or []:
        if "=" not in o:
            raise StudyError(f"--fitness {o!r}: use KEY=VALUE, e.g. --fitness error_cap=0.5")
        k, v = o.split("=", 1)
        try:
            d[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            d[k.strip()] = v
    if d.get("max_tokens") is not None:
        raise StudyError("--fitness max_tokens=...: not supported here (every prompt must be measured both ways)")
    return StatsFitnessConfig.from_mapping(d)


def run_study(a) -> dict:
    from dataclasses import replace

    import jax.numpy as jnp
    import torch
    from tqdm import tqdm

    from experiments.extract import eos_ids, extract
    from experiments.lib.models import load_model
    from experiments.tasks import build_prompts, load_task
    from namm import stats as kvstats
    from namm.features import NormParams
    from namm.fitness import StatsFitness, load_stats_data
    from namm.scoring import num_params
    from namm.shards import atomic_write_bytes, atomic_write_json
    from namm.torch.policies import build_policy
    from namm.torch.policy import NAMMPolicy

    t0 = time.time()
    check_inputs(a)
    tasks = parse_list(a.tasks)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats_dir = Path(a.stats_dir) if a.stats_dir else out_dir / "kv_stats"
    ckpts = [p for d in (a.ckpt or []) for p in find_checkpoints(d)]
    namm_cfg = namm_config_for(ckpts, a.update_interval, a.chunk_size)
    dims = num_params(namm_cfg)
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(int(a.threads))

    # --- prompts and KV statistics
    model, tok = load_model(a.model)
    chat, max_context = _model_settings(a.model)
    per_task = -(-a.prompts // len(tasks))
    rows = _interleave(load_task({"name": "builtin", "tasks": tasks, "n": per_task,
                                  "context_lengths": [a.context_length], "seed": a.task_seed}, tok, split="train"),
                       a.prompts)
    ex = extract(model, tok, rows, stats_dir, layers=a.layers, chat=chat, max_context=max_context,
                 compress_question=not a.question_outside_compression, progress=not a.quiet, model_name=a.model)
    recorded = ex["layers"]
    sim_layers = None
    if a.sim_layers is not None and a.sim_layers < len(recorded):
        sim_layers = tuple(recorded[int(round(i))] for i in np.linspace(0, len(recorded) - 1, a.sim_layers))
    s_cfg = _fitness_cfg(a.fitness, a.seed, sim_layers)
    names = [kvstats.shard_name(r["dataset"], str(r["_id"])) for r in rows]
    data = load_stats_data(kvstats.load_prompts(stats_dir, names), namm_cfg, s_cfg)
    items = np.arange(len(rows))
    prompts = build_prompts(rows, tok, chat, max_context)
    answers = [answer_token_ids(tok, str(r["answers"][0])) for r in rows]
    eos = eos_ids(model, tok)

    # --- candidates
    norms: dict[str, Any] = {}
    for p in ckpts:
        f = p.parent / "norm_stats.json"
        if f.exists():
            norms[str(f)] = load_norm_file(f)
        else:
            log.warning("%s has no norm_stats.json beside it; its candidates use statistics calibrated here", p)
    default_norm = next(iter(norms)) if norms else "calibrated"
    cands: list[Candidate] = [Candidate("namm:keep-all", "namm", "namm-keepall", np.zeros(dims, np.float32),
                                        default_norm)]
    for c in checkpoint_candidates(ckpts, a.samples, a.seed, dims):
        c.norm_key = c.norm_key if c.norm_key in norms else "calibrated"
        cands.append(c)
    cands += random_candidates(dims, parse_list(a.sigmas, float), a.per_sigma, a.seed, default_norm)
    budgets = parse_list(a.budgets, float)
    for b in parse_list(a.baselines):
        for budget in ([None] if b == "full" else budgets):
            label = b if budget is None else f"{b}@{budget:g}"
            cands.append(Candidate(label, "baseline", b, baseline=b, budget=budget))
    if len(cands) < 16:
        log.warning("only %d policies; the study asks for >= 16 (raise --per-sigma, --samples or --budgets)", len(cands))

    # --- stats fitness
    t_stats = time.perf_counter()
    fits: dict[str, StatsFitness] = {}

    def fitness_for(key: str) -> StatsFitness:
        if key not in fits:
            norm = None
            if key in norms:
                norm = NormParams(jnp.asarray(norms[key][0]), jnp.asarray(norms[key][1]))
            fits[key] = StatsFitness(data, namm_cfg, s_cfg, norm=norm)
            if key == "calibrated":
                norms[key] = tuple(np.asarray(x, np.float32) for x in fits[key].norm)
        return fits[key]

    # one prompt per call (one compile per population, a progress bar); the fitness is a mean over
    # prompts x layers, so the mean of the per-prompt values is the fitness over all the prompts
    per_prompt_stats: dict[str, np.ndarray] = {c.name: np.zeros((len(rows), 3)) for c in cands}
    namm_c = [c for c in cands if c.kind == "namm"]
    groups = [[c for c in namm_c if c.norm_key == key] for key in dict.fromkeys(c.norm_key for c in namm_c)]
    base_c = [c for c in cands if c.kind == "baseline"]
    base_fit = base_pols = None
    if base_c:  # baselines ignore the normalisation; pop_chunk=None: a scan, so lax.switch runs one branch
        base_fit = StatsFitness(data, namm_cfg, replace(s_cfg, pop_chunk=None),
                                norm=NormParams.identity(namm_cfg.features.spec_dim))
        base_pols = [jax_baseline(c.baseline, c.budget, a.seed) for c in base_c]
    bar = tqdm(total=len(rows) * (len(groups) + bool(base_c)), desc="stats fitness", unit="call", disable=a.quiet,
               file=sys.stderr, dynamic_ncols=True)
    for i in items:
        for group in groups:
            fit = fitness_for(group[0].norm_key)
            f = fit.evaluate(np.stack([c.flat for c in group]), np.array([i]))
            for c, fi, ei, ki in zip(group, f, fit.last_details["error"], fit.last_details["kept_fraction"]):
                per_prompt_stats[c.name][i] = (fi, ei, ki)
            bar.update(1)
        if base_c:
            res = evaluate_baselines(base_fit, base_pols, np.array([i]), names=[c.name for c in base_c])
            for c, r in zip(base_c, res):
                per_prompt_stats[c.name][i] = r
            bar.update(1)
    bar.close()
    stats = {name: tuple(float(x) for x in v.mean(axis=0)) for name, v in per_prompt_stats.items()}
    stats_s = time.perf_counter() - t_stats

    # --- runtime
    t_rt = time.perf_counter()
    rcache = RuntimeCache(out_dir / "runtime_cache.jsonl", enabled=not a.no_resume)
    settings = {"model": a.model, "cq": not a.question_outside_compression, "max_new_tokens": a.max_new_tokens,
                "namm": namm_cfg.to_dict(), "v": 1}
    runtimes = []
    for c in cands:
        if c.kind == "namm":
            norm = norms[c.norm_key] if c.norm_key in norms else norms.get("calibrated")
            policy = NAMMPolicy.from_flat(np.array(c.flat, np.float32), namm_cfg,
                                          None if norm is None else tuple(np.array(x, np.float32) for x in norm))
            ident = ["namm", c.flat, None if norm is None else np.asarray(norm[0]),
                     None if norm is None else np.asarray(norm[1])]
        else:
            pcfg = runtime_baseline_cfg(c.baseline, c.budget, namm_cfg, a.seed)
            policy = build_policy(pcfg)
            ident = ["baseline", pcfg]
        runtimes.append((c, policy, ident))
    per_policy: dict[str, list[dict]] = {c.name: [] for c in cands}
    cq = not a.question_outside_compression
    bar = tqdm(total=len(cands) * len(rows), desc="runtime", unit="run", disable=a.quiet, file=sys.stderr,
               dynamic_ncols=True)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        keys = [RuntimeCache.key(settings, *ident, prompt.ids, answers[i]) for _, _, ident in runtimes]
        shared = None
        if not a.no_share_prefix and any(rcache.get(k) is None for k in keys):
            shared = shared_prefix(model, prompt, namm_cfg.features.chunk_size, namm_cfg.features.update_interval, cq)
        for (c, policy, _), key in zip(runtimes, keys):
            r = rcache.get(key)
            if r is None:
                r = runtime_measure(model, tok, policy, prompt, answers[i], row, compress_question=cq,
                                    max_new_tokens=a.max_new_tokens, eos=eos, shared=shared)
                rcache.put(key, r)
            f, e, k = per_prompt_stats[c.name][i]
            per_policy[c.name].append({"task": row["dataset"], "_id": str(row["_id"]), "stats_fitness": float(f),
                                       "stats_error": float(e), "stats_kept_fraction": float(k), **r})
            bar.update(1)
            bar.set_postfix(policy=c.name[:28], ll=f"{r['answer_loglik']:.2f}")
    bar.close()
    runtime_s = time.perf_counter() - t_rt

    # --- report
    policies = []
    for c in cands:
        pp = per_policy[c.name]
        f, e, k = stats[c.name]
        greedy = [p["greedy_score"] for p in pp if "greedy_score" in p]
        policies.append({
            "name": c.name, "kind": c.kind, "family": c.family, "budget": c.budget,
            "stats_fitness": f, "stats_error": e, "stats_kept_fraction": k,
            "runtime_kept_fraction": float(np.mean([p["kept_fraction"] for p in pp])),
            "answer_loglik": float(np.mean([p["answer_loglik"] for p in pp])),
            "greedy_score": float(np.mean(greedy)) if greedy else None,
            "norm": c.norm_key if c.kind == "namm" else None, **({"meta": c.meta} if c.meta else {}),
            "runtime_config": runtime_baseline_cfg(c.baseline, c.budget, namm_cfg, a.seed) if c.kind == "baseline"
            else None,
            "per_prompt": pp,
        })
    result = {
        "model": a.model, "tasks": tasks, "context_length": a.context_length, "split": "train",
        "question_in_compression": not a.question_outside_compression, "seed": a.seed, "task_seed": a.task_seed,
        "prompts": [{"task": r["dataset"], "_id": str(r["_id"]), "prompt_tokens": len(p), "answer": str(r["answers"][0]),
                     "answer_tokens": len(ans), "full_cache_greedy_score": float(s)}
                    for r, p, ans, s in zip(rows, prompts, answers, data.score)],
        "recorded_layers": recorded, "simulated_layers": list(data.layers),
        "stats_fitness_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(s_cfg).items()},
        "namm_config": namm_cfg.to_dict(), "checkpoints": [str(p) for p in ckpts],
        "policies": policies, "spearman": correlations(policies, s_cfg.budget_target if s_cfg.budget_weight else None),
        "timing": {"stats_s": round(stats_s, 1), "runtime_s": round(runtime_s, 1), "wall_s": round(time.time() - t0, 1)},
    }
    s = result["spearman"]
    result["headline"] = {"spearman_stats_vs_loglik": s["all"]["stats_fitness"]["rho"], "target": 0.7}
    atomic_write_json(out_dir / f"{OUT_NAME}.json", result)
    atomic_write_bytes(out_dir / f"{OUT_NAME}.md", markdown(result).encode())
    plot(result, out_dir / f"{OUT_NAME}.png")
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.studies.fitness_correlation",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny_random | a local dir / .gguf / hub id")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated built-in tasks")
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=12, help="prompts in all, interleaved over the tasks")
    ap.add_argument("--task-seed", type=int, default=0, help="seed of the generated prompts (train_namm's: 0)")
    ap.add_argument("--layers", type=int, default=6, help="layers recorded at extraction (evenly spaced)")
    ap.add_argument("--sim-layers", type=int, default=None, help="recorded layers the stats fitness simulates")
    ap.add_argument("--stats-dir", default=None, help="kv_stats store (default: OUT_DIR/kv_stats; reusable)")
    ap.add_argument("--out-dir", default=f"outputs/{OUT_NAME}")
    ap.add_argument("--ckpt", action="append", default=None, metavar="DIR",
                    help="a run's evolution/ folder (or a run dir / runs root); repeatable")
    ap.add_argument("--samples", type=int, default=3, help="ES samples per checkpoint besides its mean")
    ap.add_argument("--sigmas", default="0.02,0.065,0.2,0.5", help="scales of the random NAMM vectors")
    ap.add_argument("--per-sigma", type=int, default=2, help="random NAMM vectors per scale")
    ap.add_argument("--baselines", default=",".join(BASELINE_NAMES))
    ap.add_argument("--budgets", default="0.5,0.25,0.1", help="baseline budgets (fractions of tokens seen)")
    ap.add_argument("--update-interval", type=int, default=None, help="override the NAMM/baseline update interval")
    ap.add_argument("--chunk-size", type=int, default=None, help="override the prefill chunk size")
    ap.add_argument("--fitness", action="append", default=None, metavar="KEY=VALUE",
                    help="StatsFitnessConfig override, e.g. error_cap=0.5 or qa_weight=8; repeatable")
    ap.add_argument("--question-outside-compression", action="store_true",
                    help="kvpress protocol: the question is appended after compression and never evicted")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="cap on the greedy answer (default: the task's own; 0: no greedy score)")
    ap.add_argument("--no-share-prefix", action="store_true",
                    help="prefill every policy from token 0 (default: the first update_interval tokens, identical "
                         "for every policy, are computed once per prompt)")
    ap.add_argument("--no-resume", action="store_true", help="ignore and do not write runtime_cache.jsonl")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def main(argv=None) -> dict:
    from experiments.lib.assets import AssetError
    from experiments.extract import ExtractError
    from experiments.lib.models import ModelSpecError
    from experiments.tasks import TaskError
    from namm.config import ConfigError
    from namm.evolve import EvolutionError
    from namm.fitness import FitnessError
    from namm.shards import ShardError

    a = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO)
    try:
        check_inputs(a)
        r = run_study(a)
    except (StudyError, TaskError, ExtractError, EvolutionError, FitnessError, ShardError, ConfigError, ModelSpecError,
            AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    s = r["spearman"]
    for g in ("all", "namm", "baselines"):
        x = s[g]["stats_fitness"]
        print(f"spearman[{g}] stats fitness vs answer log-lik: rho={_fmt(x['rho'], 3)} p={_fmt(x['p'], 4)} "
              f"n={x['n']}  (-error: rho={_fmt(s[g]['neg_error']['rho'], 3)})")
    print(f"wrote {Path(a.out_dir) / OUT_NAME}.{{json,md,png}} in {r['timing']['wall_s']:.0f} s")
    rho = s["all"]["stats_fitness"]["rho"]
    print(f"spearman_stats_vs_loglik: {_fmt(rho, 2)} (target: >= 0.7)")
    return r


if __name__ == "__main__":
    main()
