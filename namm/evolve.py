"""The CMA-ES loop: ask / evaluate / tell over the flat NAMM parameter vector, on evosax.

    es_cfg = EvolutionConfig(generations=50)            # paper: lambda=32, mu=16, sigma0=0.065, m0=0
    result = evolve(train_fitness, num_dims=4172, cfg=es_cfg, ckpt_dir="ckpt",
                    eval_fitness=heldout_fitness, callback=tracker.log)
    result.mean                                        # the solution is the CMA-ES mean [D]

evosax minimises, the fitness here is maximised (1.0 = full-cache parity), so ``tell`` receives
``-fitness``. All candidates of a generation see the same sampled items (common random numbers).

Checkpoints (``latest.npz`` every generation, ``best.npz`` when the held-out fitness of the mean
improves) hold the whole ES state, the PRNG key, the generation counter and the data cursor, and
are written atomically; rerunning the same command resumes and reaches the same final parameters
as an uninterrupted run. ``init_from`` starts a new stage (i1 -> i2 -> i3) from a previous stage's
checkpoint: full ES state, key and generation counter; the data cursor restarts on the new tasks.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms import CMA_ES as _EvosaxCMAES
from evosax.algorithms.distribution_based.cma_es import eigen_decomposition
from flax import serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from namm.shards import atomic_write_bytes, kill_point, remove_stale_temporaries

log = logging.getLogger(__name__)

CKPT_VERSION = 1


class EvolutionError(RuntimeError):
    """An evolution run that cannot start or resume as asked."""


@dataclass(frozen=True)
class EvolutionConfig:
    """CMA-ES settings; defaults are the paper's (namm-reference.md section 5.1)."""

    population_size: int = 32
    elite_ratio: float = 0.5          # mu = 16 elites
    sigma_init: float = 0.065
    generations: int = 100            # generations of this stage
    items_per_generation: int = 64    # prompts sampled per generation, shared by all candidates
    eval_every: int = 10              # held-out evaluation of the mean every n generations (0: never)
    eigen_interval: int = 0           # re-decompose C every n generations; 0: Hansen's lazy rule
    seed: int = 0

    def __post_init__(self):
        if self.population_size < 2:
            raise EvolutionError(f"population_size={self.population_size}; use at least 2 (paper: 32)")
        if not 0.0 < self.elite_ratio <= 1.0:
            raise EvolutionError(f"elite_ratio={self.elite_ratio}; use a value in (0, 1] (paper: 0.5)")
        if self.sigma_init <= 0:
            raise EvolutionError(f"sigma_init={self.sigma_init}; use a positive step size (paper: 0.065)")
        if self.generations < 0 or self.items_per_generation < 1 or self.eval_every < 0:
            raise EvolutionError("generations >= 0, items_per_generation >= 1 and eval_every >= 0 are required")


class CMA_ES(_EvosaxCMAES):
    """evosax's CMA-ES with a lazy eigendecomposition of C.

    evosax decomposes C at every ``ask``; with n = 4172 that costs seconds per generation on a CPU
    while C moves by c_1 + c_mu ~ 1e-6 per generation. Decomposing every
    ``1 / (10 n (c_1 + c_mu))`` generations (Hansen, "The CMA Evolution Strategy: A Tutorial",
    B.2) is the standard remedy; everything else is evosax's.
    """

    def __init__(self, population_size: int, solution, elite_ratio: float = 0.5, eigen_interval: int = 1):
        super().__init__(population_size, solution)
        self.elite_ratio = elite_ratio
        self.eigen_interval = max(1, int(eigen_interval))

    def _ask(self, key, state, params):
        C, B, D = jax.lax.cond(
            state.generation_counter % self.eigen_interval == 0,
            lambda s: eigen_decomposition(s.C),
            lambda s: (s.C, s.B, s.D),
            state)
        z = jax.random.normal(key, (self.population_size, self.num_dims))  # z ~ N(0, I)
        z = (z * D) @ B.T                                                   # y = B D z ~ N(0, C)
        population = state.mean + state.std * z                            # x = m + sigma y
        return population, state.replace(C=C, B=B, D=D)


def lazy_eigen_interval(es: _EvosaxCMAES, params) -> int:
    """Hansen's rule: decompose C every max(1, 1 / (10 n (c_1 + c_mu))) generations."""
    return max(1, int(1.0 / (10.0 * es.num_dims * (float(params.c_1) + float(params.c_mu)))))


@functools.lru_cache(maxsize=8)
def _strategy(num_dims: int, population_size: int, elite_ratio: float, eigen_interval: int) -> CMA_ES:
    # one instance per shape, so evosax's jitted ask/tell (static on ``self``) compile once per process
    probe = _EvosaxCMAES(population_size, jnp.zeros(num_dims, jnp.float32))
    probe.elite_ratio = elite_ratio
    interval = eigen_interval or lazy_eigen_interval(probe, probe.default_params)
    return CMA_ES(population_size, jnp.zeros(num_dims, jnp.float32), elite_ratio, interval)


def make_strategy(num_dims: int, cfg: EvolutionConfig):
    """-> (es, params) with sigma_init applied and the eigen interval resolved."""
    es = _strategy(num_dims, cfg.population_size, cfg.elite_ratio, cfg.eigen_interval)
    params = es.default_params.replace(std_init=jnp.asarray(cfg.sigma_init, jnp.float32))
    return es, params


# --------------------------------------------------------------------------------------------
# Data cursor: items (prompts) sampled without replacement, epoch by epoch, deterministically.


@dataclass
class Cursor:
    epoch: int = 0
    pos: int = 0


def next_items(seed: int, num_items: int, batch: int, cursor: Cursor) -> tuple[np.ndarray, Cursor]:
    """The next ``batch`` item indices of a seeded per-epoch permutation -> (indices, new cursor)."""
    if num_items < 1:
        raise EvolutionError("the training fitness has no items (prompts); extract some first")
    if batch >= num_items:
        return np.arange(num_items), Cursor(cursor.epoch + 1, 0)
    epoch, pos = cursor.epoch, cursor.pos
    if pos + batch > num_items:
        epoch, pos = epoch + 1, 0
    perm = np.random.default_rng([seed, epoch]).permutation(num_items)
    return np.sort(perm[pos:pos + batch]), Cursor(epoch, pos + batch)


# --------------------------------------------------------------------------------------------
# Population sharding over local devices.


def population_sharding(population_size: int, devices=None) -> NamedSharding | None:
    """A sharding that splits ``[P, ...]`` over all devices along P, or None with one device."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) <= 1:
        return None
    if population_size % len(devices):
        raise EvolutionError(f"population_size={population_size} is not divisible by the {len(devices)} devices; "
                             f"use a multiple of {len(devices)}")
    mesh = Mesh(np.asarray(devices), ("pop",))
    return NamedSharding(mesh, PartitionSpec("pop"))


def shard_population(population: jax.Array, sharding: NamedSharding | None) -> jax.Array:
    return population if sharding is None else jax.device_put(population, sharding)


def maybe_initialize_distributed(enabled: bool) -> None:
    """``jax.distributed.initialize()`` when launched on several hosts (SLURM/TPU env autodetected)."""
    if enabled and jax.process_count() == 1 and not getattr(maybe_initialize_distributed, "_done", False):
        jax.distributed.initialize()
        maybe_initialize_distributed._done = True


# --------------------------------------------------------------------------------------------
# Fitness protocol (its backends: namm.fitness.StatsFitness and experiments.fitness; see experiments.fitness).


class FitnessFn(Protocol):
    num_items: int

    def evaluate(self, population: jax.Array, items: np.ndarray) -> np.ndarray:
        """population [P, D] -> fitness [P] (higher is better) on the given item indices."""


# --------------------------------------------------------------------------------------------
# Checkpoints.


@dataclass
class Checkpoint:
    state: Any                      # evosax CMA-ES State
    key: jax.Array                  # PRNG key for the next generation
    generation: int                 # global generation counter (continues across stages)
    stage_start: int                # generation at which this stage began
    cursor: Cursor
    best_eval: float = -math.inf    # best held-out fitness of the mean in this stage
    best_eval_generation: int = -1
    meta: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)   # what the generation that wrote it logged


def _meta(num_dims: int, cfg: EvolutionConfig, fingerprint: Mapping | None) -> dict:
    return {"version": CKPT_VERSION, "num_dims": num_dims, "population_size": cfg.population_size,
            "elite_ratio": cfg.elite_ratio, "sigma_init": cfg.sigma_init, "seed": cfg.seed,
            "items_per_generation": cfg.items_per_generation,
            "fingerprint": json.loads(json.dumps(dict(fingerprint or {}), sort_keys=True))}


def save_checkpoint(path: str | os.PathLike, ck: Checkpoint) -> None:
    """Write the checkpoint atomically as one .npz (arrays of the ES state + JSON metadata)."""
    arrays = {f"state/{k}": np.asarray(v) for k, v in serialization.to_state_dict(ck.state).items()}
    arrays["key"] = np.asarray(jax.random.key_data(ck.key))
    info = {"generation": ck.generation, "stage_start": ck.stage_start, "cursor": asdict(ck.cursor),
            "best_eval": ck.best_eval if math.isfinite(ck.best_eval) else None,
            "best_eval_generation": ck.best_eval_generation, "meta": ck.meta, "metrics": ck.metrics}
    arrays["info_json"] = np.asarray(json.dumps(info, sort_keys=True))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def _read_npz(path: Path, fix: str | Callable[[], str]) -> tuple[dict, dict]:
    """(arrays, info) of a checkpoint file; a truncated or garbled one raises one ``EvolutionError`` line
    ending with ``fix`` (or what ``fix()`` returns)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        info = json.loads(str(arrays.pop("info_json")))
        if not isinstance(info, dict) or "generation" not in info:
            raise ValueError("no generation in its info_json")
    except Exception as e:  # noqa: BLE001 - zipfile, zlib, numpy and json each have their own errors
        raise EvolutionError(f"checkpoint {path} cannot be read ({' '.join(str(e).split()) or type(e).__name__}); "
                             f"{fix() if callable(fix) else fix}") from e
    return arrays, info


def load_checkpoint(path: str | os.PathLike, template_state,
                    fix: str | Callable[[], str] = "delete it to restart the stage") -> Checkpoint:
    """The checkpoint at ``path``; ``fix`` ends the one-line error raised for a file that cannot be read."""
    path = Path(path)
    arrays, info = _read_npz(path, fix)
    if info.get("meta", {}).get("version") != CKPT_VERSION:
        raise EvolutionError(f"checkpoint {path} has version {info.get('meta', {}).get('version')}, "
                             f"this code reads {CKPT_VERSION}; start a new run directory")
    sd = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
    tmpl = serialization.to_state_dict(template_state)
    if set(sd) != set(tmpl):
        raise EvolutionError(f"checkpoint {path} holds another ES state ({sorted(set(sd) ^ set(tmpl))}); "
                             f"use a checkpoint written by evolution=cma_es")
    for k, v in tmpl.items():
        if np.shape(v) != sd[k].shape:
            raise EvolutionError(f"checkpoint {path}: state/{k} has shape {sd[k].shape}, expected {np.shape(v)}; "
                                 f"it was written for another parameter count or population size")
    state = serialization.from_state_dict(template_state, {k: jnp.asarray(v) for k, v in sd.items()})
    best = info["best_eval"]
    return Checkpoint(state=state, key=jax.random.wrap_key_data(jnp.asarray(arrays["key"])),
                      generation=int(info["generation"]), stage_start=int(info["stage_start"]),
                      cursor=Cursor(**info["cursor"]), best_eval=-math.inf if best is None else float(best),
                      best_eval_generation=int(info["best_eval_generation"]), meta=info["meta"],
                      metrics=dict(info.get("metrics") or {}))


# --------------------------------------------------------------------------------------------
# The loop.


@dataclass
class EvolveResult:
    mean: np.ndarray                # [D] the CMA-ES mean at the end of the stage (the solution)
    best_mean: np.ndarray | None    # [D] the mean with the best held-out fitness (None: no evaluation)
    best_eval: float
    generation: int
    history: list[dict]
    ckpt_dir: Path
    last_metrics: dict = field(default_factory=dict)   # the last generation's metrics (also after a resume)


def evolve(train_fitness: FitnessFn, num_dims: int, cfg: EvolutionConfig, ckpt_dir: str | os.PathLike,
           eval_fitness: FitnessFn | None = None, init_from: str | os.PathLike | None = None,
           init_mean: np.ndarray | None = None, fingerprint: Mapping | None = None,
           callback: Callable[[dict, int], None] | None = None, progress: bool = True,
           devices=None) -> EvolveResult:
    """Run (or resume) one stage of CMA-ES; maximises ``train_fitness``.

    ``ckpt_dir/latest.npz`` present -> resume it (same command, same result); else ``init_from``
    (a previous stage's ``best.npz``/``latest.npz``) -> continue its ES state; else a fresh start
    from ``init_mean`` (zeros: keep everything). ``callback(metrics, generation)`` receives the
    per-generation metrics (wire it to ``Tracker.log``); it runs before the generation's checkpoint is
    written, so a generation killed in between is redone and reported again (``train_namm`` logs it once).
    """
    from tqdm.auto import tqdm

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    latest, best_path = ckpt_dir / "latest.npz", ckpt_dir / "best.npz"
    es, params = make_strategy(num_dims, cfg)
    meta = _meta(num_dims, cfg, fingerprint)
    mean0 = jnp.zeros(num_dims, jnp.float32) if init_mean is None else jnp.asarray(init_mean, jnp.float32)
    if mean0.shape != (num_dims,):
        raise EvolutionError(f"init_mean has shape {mean0.shape}, expected ({num_dims},)")
    template = es.init(jax.random.key(0), mean0, params)
    writer = jax.process_index() == 0
    if writer:
        remove_stale_temporaries(ckpt_dir)     # a write killed mid-way; never read as a checkpoint

    if latest.exists():
        ck = load_checkpoint(latest, template, lambda: _latest_fix(best_path))
        if ck.meta != meta:
            diff = [k for k in sorted(set(ck.meta) | set(meta)) if ck.meta.get(k) != meta.get(k)]
            raise EvolutionError(f"{latest} belongs to another run (differs in {diff}); "
                                 f"use another output directory or delete it to restart")
        log.info("resuming %s at generation %d", latest, ck.generation)
    elif init_from is not None:
        if not Path(init_from).exists():
            raise EvolutionError(f"init_from={init_from} does not exist; run the previous stage first")
        prev = load_checkpoint(init_from, template, "rerun the previous stage to rewrite it")
        if prev.meta.get("num_dims") != num_dims:
            raise EvolutionError(f"init_from={init_from} was trained with num_dims={prev.meta.get('num_dims')}; "
                                 f"this stage has {num_dims} parameters (same NAMM config needed)")
        # The ES state (mean, sigma, paths, C, B, D) depends only on the dimension; a stage may change the
        # population size (the recombination weights are recomputed from it).
        ck = Checkpoint(state=prev.state, key=prev.key, generation=prev.generation, stage_start=prev.generation,
                        cursor=Cursor(), meta=meta)
        log.info("stage starts from %s (generation %d)", init_from, prev.generation)
    else:
        key = jax.random.key(cfg.seed)
        key, k_init = jax.random.split(key)
        ck = Checkpoint(state=es.init(k_init, mean0, params), key=key, generation=0, stage_start=0,
                        cursor=Cursor(), meta=meta)

    sharding = population_sharding(cfg.population_size, devices)
    stop = ck.stage_start + cfg.generations
    history: list[dict] = []
    bar = tqdm(total=cfg.generations, initial=ck.generation - ck.stage_start, disable=not progress,
               desc="CMA-ES", unit="gen", dynamic_ncols=True)
    best_mean = None
    if best_path.exists() and ck.best_eval_generation >= 0:
        best_mean = np.asarray(load_checkpoint(best_path, template, BEST_FIX.format(latest=latest)).state.mean)
    try:
        while ck.generation < stop:
            t0 = time.perf_counter()
            key, k_ask, k_tell = jax.random.split(ck.key, 3)
            items, cursor = next_items(cfg.seed, train_fitness.num_items,
                                       cfg.items_per_generation, ck.cursor)
            population, state = es.ask(k_ask, ck.state, params)               # [P, D]
            fitness = np.asarray(train_fitness.evaluate(shard_population(population, sharding), items),
                                 np.float32)                                  # [P], maximised
            if fitness.shape != (cfg.population_size,):
                raise EvolutionError(f"fitness returned shape {fitness.shape}, expected ({cfg.population_size},)")
            state, _ = es.tell(k_tell, population, jnp.asarray(-fitness), state, params)  # evosax minimises
            gen = ck.generation + 1
            metrics = {"generation": gen, "fitness/best": float(np.nanmax(fitness)),
                       "fitness/mean": float(np.nanmean(fitness)), "fitness/worst": float(np.nanmin(fitness)),
                       "es/sigma": float(state.std), "es/mean_norm": float(jnp.linalg.norm(state.mean)),
                       "data/epoch": cursor.epoch}
            ck = Checkpoint(state=state, key=key, generation=gen, stage_start=ck.stage_start, cursor=cursor,
                            best_eval=ck.best_eval, best_eval_generation=ck.best_eval_generation, meta=meta)
            if eval_fitness is not None and cfg.eval_every and (gen % cfg.eval_every == 0 or gen == stop):
                score = float(np.asarray(eval_fitness.evaluate(state.mean[None, :],
                                                               np.arange(eval_fitness.num_items)))[0])
                metrics["eval/mean_fitness"] = score
                if score > ck.best_eval:
                    ck.best_eval, ck.best_eval_generation = score, gen
                    best_mean = np.asarray(state.mean)
                    if writer:
                        save_checkpoint(best_path, ck)
                metrics["eval/best"] = ck.best_eval
            metrics["time/generation_s"] = time.perf_counter() - t0
            ck.metrics = {k: v for k, v in metrics.items() if not k.startswith("time/")}
            history.append(metrics)
            if callback is not None:   # before the checkpoint: a kill in between redoes (and re-logs) this generation
                callback(metrics, gen)
            kill_point("generation")
            if writer:
                save_checkpoint(latest, ck)                 # the generation is done only once this lands
            bar.set_postfix(gen=gen, best=f"{metrics['fitness/best']:.4f}", mean=f"{metrics['fitness/mean']:.4f}")
            bar.update(1)
    finally:
        bar.close()
    return EvolveResult(mean=np.asarray(ck.state.mean), best_mean=best_mean, best_eval=ck.best_eval,
                        generation=ck.generation, history=history, ckpt_dir=ckpt_dir, last_metrics=dict(ck.metrics))


BEST_FIX = "delete it and {latest} to restart the stage (a rerun reproduces both)"


def _latest_fix(best_path: Path) -> str:
    """How to get past an unreadable latest.npz: resume from best.npz when that one reads, else restart."""
    try:
        gen = int(_read_npz(best_path, "")[1]["generation"]) if best_path.exists() else None
    except EvolutionError:
        gen = None
    if gen is None:
        return "delete it to restart the stage"
    return (f"copy {best_path.name} over it to resume from generation {gen} (same result), "
            f"or delete it to restart the stage")


def solution(ckpt: str | os.PathLike) -> np.ndarray:
    """The CMA-ES mean [D] stored in a checkpoint (the paper's solution)."""
    arrays, _ = _read_npz(Path(ckpt), "delete it and the stage's latest.npz to restart the stage")
    if "state/mean" not in arrays:
        raise EvolutionError(f"checkpoint {ckpt} holds no state/mean; use a checkpoint written by namm.evolve")
    return np.asarray(arrays["state/mean"])
