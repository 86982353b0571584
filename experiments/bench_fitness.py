"""Candidate evaluations per second: ``stats`` vs ``task`` fitness on the same prompts, same run.

    python -m experiments.bench_fitness --model smollm2 --prompts 4 --population 4 --layers 6

Both backends evaluate the same population (sigma 0.065 around the zero mean, i.e. a first
generation) on the same training prompts of the built-in suite. The stats fitness is timed after
a warm-up call (its compile time is reported separately), as the median of ``--repeats`` calls;
the task fitness is timed over one pass (greedy generation through the runtime, full-cache
references computed beforehand and excluded). Writes a JSON file and prints the headline last.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def bench(model_spec: str, stats_dir: str, out: str, prompts: int, population: int, layers: int | None,
          context_length: int, tasks: list[str], repeats: int, seed: int, max_new_tokens: int | None,
          sim_layers: int | None = None, pop_chunk: int = 1) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from experiments.extract import extract
    from experiments.models import load_model
    from experiments.task_fitness import TaskFitness
    from experiments.tasks import load_task
    from namm import stats as kvstats
    from namm.config import NAMMConfig
    from namm.fitness import StatsFitness, StatsFitnessConfig, load_stats_data
    from namm.scoring import num_params

    torch.manual_seed(seed)
    t0 = time.time()
    model, tok = load_model(model_spec)
    chat = model_spec == "smollm2"
    per_task = max(1, -(-prompts // len(tasks)))
    rows = load_task({"name": "builtin", "tasks": tasks, "n": per_task, "context_lengths": [context_length],
                      "seed": seed}, tok, split="train")[:prompts]
    ex = extract(model, tok, rows, stats_dir, layers=layers, chat=chat, max_context=8192, progress=True,
                 model_name=model_spec)
    names = [kvstats.shard_name(r["dataset"], str(r["_id"])) for r in rows]
    recorded = ex["layers"]
    sub = None
    if sim_layers is not None and sim_layers < len(recorded):
        sub = tuple(recorded[int(round(i))] for i in np.linspace(0, len(recorded) - 1, sim_layers))
    cfg = NAMMConfig()
    s_cfg = StatsFitnessConfig(layers=sub, pop_chunk=pop_chunk)
    data = load_stats_data(kvstats.load_prompts(stats_dir, names), cfg, s_cfg)
    t_cal = time.perf_counter()
    sfit = StatsFitness(data, cfg, s_cfg)
    calib_s = time.perf_counter() - t_cal
    pop = 0.065 * jax.random.normal(jax.random.key(seed), (population, num_params(cfg)), jnp.float32)
    items = np.arange(len(rows))
    t1 = time.perf_counter()
    sfit.evaluate(pop, items)
    compile_s = time.perf_counter() - t1
    times = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        f_stats = sfit.evaluate(pop, items)
        times.append(time.perf_counter() - t1)
    stats_s = float(np.median(times))
    norm = tuple(np.asarray(x) for x in sfit.norm)
    ref = {f"{r['dataset']}/{r['_id']}": float(p.score) for r, p in zip(rows, kvstats.load_prompts(stats_dir, names))}
    tfit = TaskFitness(model, tok, rows, cfg, norm, chat=chat, max_context=8192, reference=ref,
                       max_new_tokens=max_new_tokens, progress=True)
    t1 = time.perf_counter()
    f_task = tfit.evaluate(np.asarray(pop), items)
    task_s = time.perf_counter() - t1
    stats_rate, task_rate = population / stats_s, population / task_s
    out_d = {
        "model": model_spec, "prompts": len(rows), "context_length": context_length, "population": population,
        "recorded_layers": recorded, "simulated_layers": list(sub) if sub else recorded,
        "prompt_tokens": [int(n) for n in data.length],
        "stats": {"seconds_per_generation": stats_s, "pop_chunk": pop_chunk, "candidate_evals_per_s": stats_rate, "compile_s": compile_s,
                  "norm_calibration_s": calib_s, "repeats": times, "fitness": np.asarray(f_stats).tolist()},
        "task": {"seconds_per_generation": task_s, "candidate_evals_per_s": task_rate,
                 "fitness": np.asarray(f_task).tolist(), "max_new_tokens": max_new_tokens},
        "speedup": stats_rate / task_rate, "bytes_per_prompt_per_1k_tokens": ex["bytes_per_prompt_per_1k_tokens"],
        "note": "a candidate evaluation = one candidate on all the prompts; CPU timings on a shared machine",
        "wall_s": round(time.time() - t0, 1),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    from namm.shards import atomic_write_json

    atomic_write_json(Path(out), out_d)
    return out_d


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stats-dir", default="outputs/bench_fitness/kv_stats")
    ap.add_argument("--out", default="outputs/bench_fitness/bench_fitness.json")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--layers", type=int, default=6, help="layers recorded at extraction (evenly spaced)")
    ap.add_argument("--sim-layers", type=int, default=None, help="layers simulated by the stats fitness")
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--tasks", default="passkey,kv_retrieval,needle_qa,passage_retrieval_en")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pop-chunk", type=int, default=1, help="candidates computed together (fitness.pop_chunk)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    r = bench(a.model, a.stats_dir, a.out, a.prompts, a.population, a.layers, a.context_length,
              a.tasks.split(","), a.repeats, a.seed, a.max_new_tokens, a.sim_layers, a.pop_chunk)
    print(json.dumps({k: r[k] for k in ("stats", "task")}, indent=1))
    print(f"stats: {r['stats']['candidate_evals_per_s']:.3f} candidates/s  task: "
          f"{r['task']['candidate_evals_per_s']:.3f} candidates/s  ({r['prompts']} prompts, "
          f"{r['population']} candidates, {len(r['simulated_layers'])} simulated layers)")
    print(f"stats_vs_task_speedup: {r['speedup']:.1f} (target: >= 20)")
    return r


if __name__ == "__main__":
    main()
