"""Candidate evaluations per second of the fitness backends, on the same prompts in the same run.

    python -m experiments.bench.fitness                    # agreement: population-batched vs one at a time
    python -m experiments.bench.fitness --suite stats --model smollm2 --prompts 4 --population 4 --layers 6

``--suite agreement`` (default): the ``agreement`` fitness (experiments/fitness/agreement.py) on SmolLM2
prompts of about ``--context-length`` tokens (one per task of the built-in suite), a first-generation
population (sigma 0.065 around zero) under a 50 % cap, the NAMM's normalisation calibrated on the same
prompts. Each prompt's shared state (prefill, features, full-cache answer and distributions) is prepared
once beforehand and shared by both paths (timed as its own stages). The batched path evaluates the whole
``--population`` in chunks of ``--pop-chunk``; the reference path (``batched=False``, one candidate at a
time) its first ``--ref-population`` candidates; both after a warm-up call. The fitness of the candidates
both evaluated is compared. With ``--mlp`` the paper's MLP scorer ablation (one linear layer, 25
parameters) is timed the same way. A profile table gives each stage's measured time against its floor:
the stage's FLOP count at the GFLOP/s a plain fp32 matmul of a similar shape reaches in the same run
(bytes at a measured memcpy's GB/s for the memory-bound stages).

``--suite stats``: the ``stats`` fitness against the ``task`` fitness, as before: the stats fitness timed
after a warm-up call (its compile time reported separately) as the median of ``--repeats`` calls, the
task fitness over one pass (full-cache references computed beforehand and excluded).

Writes a JSON file and prints the headline last.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def bench_stats(model_spec: str, stats_dir: str, out: str, prompts: int, population: int, layers: int | None,
          context_length: int, tasks: list[str], repeats: int, seed: int, max_new_tokens: int | None,
          sim_layers: int | None = None, pop_chunk: int = 1) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from experiments.extract import extract
    from experiments.lib.models import load_model
    from experiments.fitness.task import TaskFitness
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

# --------------------------------------------------------------------------------------------------------------
# agreement: population-batched vs one candidate at a time

STAGES = ("prefill", "features", "reference", "scoring", "selection", "answer_forward", "measure")


def _best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_rates(rows: int, width: int, inner: int, tile_rows: int, tile_keys: int, sort_shape) -> dict:
    """What this CPU reaches now: fp32 GEMM GFLOP/s at the answer forward's shape (``rows x width @ width x
    inner``) and at the BAM tile's (``tile_rows x 32 @ 32 x tile_keys``), softmax elements/s on that tile, a
    stable descending argsort's elements/s at the selection's ``sort_shape`` (a chunk's scores of one layer),
    and memcpy GB/s (64 MiB, read + write)."""
    import torch

    a, w = torch.randn(rows, width), torch.randn(width, inner)
    q, k = torch.randn(tile_rows, 32), torch.randn(tile_keys, 32)
    tile = torch.randn(tile_rows, tile_keys)
    src = torch.randn(16 * 2 ** 20)
    dst = torch.empty_like(src)
    t_lin = _best_of(lambda: a @ w)
    t_qk = _best_of(lambda: q @ k.T)
    t_av = _best_of(lambda: tile @ k)
    t_sm = _best_of(lambda: torch.softmax(tile, -1))
    t_cp = _best_of(lambda: dst.copy_(src))
    scores = torch.randn(*sort_shape)
    t_sort = _best_of(lambda: torch.argsort(-scores, dim=-1, stable=True))
    return {"linear_gflops": 2 * rows * width * inner / t_lin / 1e9,
            "bam_tile_gflops": 2 * 2 * tile_rows * tile_keys * 32 / (t_qk + t_av) / 1e9,
            "softmax_gelems": tile.numel() / t_sm / 1e9,
            "memcpy_gbs": 2 * src.numel() * 4 / t_cp / 1e9,
            "argsort_gelems": scores.numel() / t_sort / 1e9,
            "shapes": {"linear": [rows, width, inner], "bam_tile": [tile_rows, 32, tile_keys],
                       "argsort": list(sort_shape)}}


def stage_work(model, namm_cfg, prompts: list[dict], population: int, block: int = 16) -> dict:
    """Per stage, the work of the batched run: ``flops`` (matmul FLOPs actually executed), ``exps`` (softmax
    elements) and ``bytes`` (the memory-bound stages), summed over ``prompts`` (``S`` prompt tokens, ``n``
    tail tokens, ``m`` scored, per prompt) and, for the candidate stages, ``population`` candidates."""
    c = model.config
    L, D, I, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    hq = c.num_attention_heads
    hkv = getattr(c, "num_key_value_heads", None) or hq
    d = getattr(c, "head_dim", None) or D // hq
    lin = D * hq * d * 2 + 2 * D * hkv * d + 3 * D * I       # q, o, k, v, gate, up, down weights per layer
    f, fc = namm_cfg.feature_dim, namm_cfg.features
    fp = -(-f // 32) * 32
    bins = fc.n_fft // 2 + 1
    w = {k: {"flops": 0.0, "exps": 0.0, "sorts": 0.0, "bytes": 0.0} for k in STAGES}
    weights = 4 * (L * lin + D * V)                           # fp32 bytes of the weights a forward reads
    for p in prompts:
        S, n, m = p["S"], p["n"], p["m"]
        w["prefill"]["flops"] += 2 * L * lin * S + L * 2 * hq * d * S * S + 2 * D * V
        w["prefill"]["exps"] += L * hq * S * S / 2
        # attention rows of every prompt query (all S x S logits), then the STFT matmuls of each KV head
        w["features"]["flops"] += L * (2 * hq * d * S * S + hkv * (S // fc.hop) * 2 * (2 * bins) * fc.n_fft * S)
        w["features"]["exps"] += L * hq * S * S
        w["features"]["bytes"] += L * hkv * S * S * 4 * 3     # rows written, read by the STFT, reduced
        w["reference"]["flops"] += 2 * L * lin * n + L * 4 * hq * d * n * (S + n) + 2 * D * V * m
        w["reference"]["bytes"] += weights                    # one forward of a few tokens: weight-read bound
        if namm_cfg.scorer.kind == "bam":
            pairs = S * (S + block) / 2                       # backward-masked (query, key) pairs computed
            per_layer = hkv * (2 * 2 * fp * pairs + 2 * (f + 1) * fp * S + 2 * fp * (1 + f) * S)
            w["scoring"]["flops"] += population * L * per_layer
            w["scoring"]["exps"] += population * L * hkv * pairs
        else:
            width = namm_cfg.scorer.mlp_width or f
            w["scoring"]["flops"] += population * L * hkv * S * 2 * (f * width * (namm_cfg.scorer.mlp_depth - 1) + width)
        w["selection"]["sorts"] += population * L * hkv * S     # one stable argsort of every slot's score
        w["answer_forward"]["flops"] += population * (2 * L * lin * n + L * 4 * hq * d * n * (S + n) + 2 * D * V * m)
        w["answer_forward"]["exps"] += population * L * hq * n * (S + n)
        w["measure"]["exps"] += population * m * V            # a float64 softmax over the vocabulary
    return w


def profile_table(timings: dict, work: dict, rates: dict) -> list[dict]:
    """One row per stage: seconds, work, floor seconds and measured / floor. Floor: FLOPs at the matching GEMM
    rate plus softmax elements at the softmax rate plus sorted elements at the argsort rate, or the stage's bytes
    at memcpy speed where that is longer."""
    out = []
    for stage in STAGES:
        t = float(timings.get(stage, 0.0))
        wk = work[stage]
        gemm = rates["bam_tile_gflops"] if stage == "scoring" else rates["linear_gflops"]
        floor = max(wk["flops"] / (gemm * 1e9) + wk["exps"] / (rates["softmax_gelems"] * 1e9)
                    + wk["sorts"] / (rates["argsort_gelems"] * 1e9), wk["bytes"] / (rates["memcpy_gbs"] * 1e9))
        out.append({"stage": stage, "seconds": t, "gflop": wk["flops"] / 1e9, "gexp": wk["exps"] / 1e9,
                    "gsort": wk["sorts"] / 1e9, "gbytes": wk["bytes"] / 1e9, "floor_s": floor, "x_floor": t / floor if floor else None,
                    "per_candidate": stage in ("scoring", "selection", "answer_forward", "measure")})
    return out


EXPLAIN = {
    "prefill": "once per prompt: chunked prefill (128-token chunks) with the NAMM's query buffering",
    "features": "once per prompt: the S x S attention rows of every layer are written, softmaxed, averaged over "
                "each GQA group and read by the STFT, head by head (memory traffic, not FLOPs)",
    "reference": "once per prompt: one unbatched forward of a few tokens (the weights read once at memcpy speed "
                 "is the floor counted; per-layer ops dominate at this size)",
    "selection": "beside the one argsort counted: masked scores, the rank scatter, the threshold and the ragged "
                 "max, ~10 passes over a layer's [chunk, Hkv, S] scores",
    "measure": "a float64 softmax over the vocabulary (the floor counts the fp32 softmax rate)",
    "mlp:scoring": "25 parameters: a few small ops per layer and chunk, per-call overhead only",
}


def bench_agreement(model_spec: str, out: str, prompts: int, population: int, ref_population: int,
                    context_length: int, tasks: list[str], seed: int, max_answer_tokens: int, pop_chunk: int,
                    budget: float, mlp: bool) -> dict:
    import torch

    from experiments.fitness.agreement import AgreementFitness
    from experiments.lib.models import load_model
    from experiments.tasks import build_prompts, load_task
    from namm.config import NAMMConfig, ScorerConfig
    from namm.shards import atomic_write_json
    from namm.torch.policy import calibrate_norm_stats
    from namm.torch.scoring import num_params

    t_start = time.time()
    torch.manual_seed(seed)
    model, tok = load_model(model_spec)
    chat = model_spec == "smollm2"
    per_task = max(1, -(-prompts // len(tasks)))
    rows = load_task({"name": "builtin", "tasks": tasks, "n": per_task, "context_lengths": [context_length],
                      "seed": seed}, tok, split="train")
    rows = rows[:prompts]
    items = list(range(len(rows)))
    cfgs = {"bam": NAMMConfig()}
    if mlp:
        cfgs["mlp"] = NAMMConfig(scorer=ScorerConfig(kind="mlp"))
    built = build_prompts(rows, tok, chat, 8192)
    t0 = time.perf_counter()
    norm = tuple(x.numpy() for x in calibrate_norm_stats(model, [torch.tensor([p.ids]) for p in built],
                                                         cfgs["bam"], progress=False))
    calib_s = time.perf_counter() - t0
    common = dict(chat=chat, max_context=8192, budget=budget, max_answer_tokens=max_answer_tokens)
    shared_src = None
    results = {}
    for name, cfg in cfgs.items():
        rng = np.random.default_rng(seed)
        pop = (0.065 * rng.standard_normal((population, num_params(cfg)))).astype(np.float32)
        ref = AgreementFitness(model, tok, rows, cfg, norm, batched=False, **common)
        bat = AgreementFitness(model, tok, rows, cfg, norm, batched=True, pop_chunk=pop_chunk, **common)
        if shared_src is None:
            for i in items:
                ref._prepare(i)
            shared_src, prep = ref, dict(ref.timings)
        ref._shared, ref._answers = shared_src._shared, shared_src._answers
        bat._shared, bat._answers = shared_src._shared, shared_src._answers
        bat.evaluate(pop[:pop_chunk], [0])                   # warm-up (allocations, first calls)
        ref.evaluate(pop[:1], [0])
        bat.timings.clear()
        ref.timings.clear()
        t0 = time.perf_counter()
        f_bat = bat.evaluate(pop, items)
        bat_s = time.perf_counter() - t0
        details = {k: v.tolist() for k, v in bat.last_details.items()}
        t0 = time.perf_counter()
        f_ref = ref.evaluate(pop[:ref_population], items)
        ref_s = time.perf_counter() - t0
        results[name] = {
            "batched": {"seconds": bat_s, "candidates": population, "candidate_evals_per_s": population / bat_s,
                        "stages_s": dict(bat.timings), "fitness": f_bat.tolist(), "details": details},
            "unbatched": {"seconds": ref_s, "candidates": ref_population,
                          "candidate_evals_per_s": ref_population / ref_s, "fitness": f_ref.tolist()},
            "speedup": (population / bat_s) / (ref_population / ref_s),
            "max_fitness_diff": float(np.abs(f_bat[:ref_population] - f_ref).max()),
        }
    shapes = [{"S": len(shared_src._split(i)[0]), "n": int(shared_src._shared[i].tail.shape[1]),
               "m": int(shared_src._shared[i].p_full.shape[0])} for i in items]
    mean_s = int(np.mean([p["S"] for p in shapes]))
    c = model.config
    rates = machine_rates(pop_chunk * max(p["n"] for p in shapes), c.hidden_size, c.intermediate_size,
                          16 * pop_chunk, mean_s // 2, (pop_chunk, getattr(c, "num_key_value_heads", None)
                                                         or c.num_attention_heads, mean_s))
    tables = {}
    for name, cfg in cfgs.items():
        timings = {**prep, **results[name]["batched"]["stages_s"]}
        tables[name] = profile_table(timings, stage_work(model, cfg, shapes, population), rates)
    out_d = {"suite": "agreement", "model": model_spec, "prompts": len(rows), "context_length": context_length,
             "prompt_shapes": shapes, "population": population, "ref_population": ref_population,
             "pop_chunk": pop_chunk, "budget": budget, "max_answer_tokens": max_answer_tokens,
             "torch_threads": torch.get_num_threads(), "norm_calibration_s": calib_s, "rates": rates,
             "results": results, "profile": tables, "explanations": EXPLAIN,
             "note": "a candidate evaluation = one candidate on all the prompts; the shared per-prompt state "
                     "(prefill, features, reference) is prepared once and excluded from both rates",
             "wall_s": round(time.time() - t_start, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out), out_d)
    return out_d


def print_agreement(r: dict) -> None:
    rates = r["rates"]
    print(f"machine: fp32 GEMM {rates['linear_gflops']:.1f} GFLOP/s at {rates['shapes']['linear']}, "
          f"{rates['bam_tile_gflops']:.1f} GFLOP/s at the BAM tile {rates['shapes']['bam_tile']}, softmax "
          f"{rates['softmax_gelems']:.2f} G elements/s, stable argsort {rates['argsort_gelems'] * 1e3:.0f} M "
          f"elements/s at {rates['shapes']['argsort']}, memcpy {rates['memcpy_gbs']:.1f} GB/s; "
          f"{r['torch_threads']} torch thread(s)")
    print(f"{r['prompts']} prompts of {[p['S'] for p in r['prompt_shapes']]} tokens, answer tails "
          f"{[p['n'] for p in r['prompt_shapes']]}; population {r['population']} (reference: first "
          f"{r['ref_population']}), pop_chunk {r['pop_chunk']}, budget {r['budget']}")
    for name, res in r["results"].items():
        print(f"{name}: batched {res['batched']['candidate_evals_per_s']:.3f} candidates/s, unbatched "
              f"{res['unbatched']['candidate_evals_per_s']:.3f} candidates/s, speedup {res['speedup']:.2f}x, "
              f"max |fitness difference| {res['max_fitness_diff']:.2e}")
    for name, rows in r["profile"].items():
        print(f"\nprofile ({name} scorer, batched run; per-candidate stages over all {r['population']} candidates)")
        print(f"{'stage':<15}{'seconds':>9}{'GFLOP':>9}{'G exp':>8}{'M sort':>8}{'GB':>7}{'floor s':>9}"
              f"{'x floor':>9}")
        for row in rows:
            x = "" if row["x_floor"] is None else f"{row['x_floor']:.1f}"
            why = r["explanations"].get(f"{name}:{row['stage']}", r["explanations"].get(row["stage"], ""))
            print(f"{row['stage']:<15}{row['seconds']:>9.2f}{row['gflop']:>9.1f}{row['gexp']:>8.2f}"
                  f"{row['gsort'] * 1e3:>8.1f}{row['gbytes']:>7.2f}{row['floor_s']:>9.2f}{x:>9}"
                  + (f"  {why}" if row["x_floor"] and row["x_floor"] > 3 else ""))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench.fitness", description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("agreement", "stats"), default="agreement")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stats-dir", default="outputs/bench_fitness/kv_stats")
    ap.add_argument("--out", default=None, help="JSON file (default outputs/bench_fitness/<suite>.json)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--population", type=int, default=None, help="candidates (agreement 32, stats 4)")
    ap.add_argument("--ref-population", type=int, default=8, help="agreement: candidates of the unbatched path")
    ap.add_argument("--layers", type=int, default=6, help="stats: layers recorded at extraction (evenly spaced)")
    ap.add_argument("--sim-layers", type=int, default=None, help="stats: layers simulated by the stats fitness")
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--tasks", default="passkey,kv_retrieval,needle_qa,passage_retrieval_en")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="stats: task fitness answer tokens")
    ap.add_argument("--max-answer-tokens", type=int, default=16, help="agreement: answer tokens fed per prompt")
    ap.add_argument("--budget", type=float, default=0.5, help="agreement: fitness.policy_budget")
    ap.add_argument("--no-mlp", action="store_true", help="agreement: skip the MLP scorer ablation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the comparison is per core)")
    ap.add_argument("--pop-chunk", type=int, default=None,
                    help="candidates computed together (agreement 16; stats fitness.pop_chunk, 1)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import torch

    torch.set_num_threads(a.threads)
    out = a.out or f"outputs/bench_fitness/{a.suite}.json"
    if a.suite == "agreement":
        r = bench_agreement(a.model, out, a.prompts, a.population or 32, a.ref_population, a.context_length,
                            a.tasks.split(","), a.seed, a.max_answer_tokens, a.pop_chunk or 16, a.budget,
                            not a.no_mlp)
        print_agreement(r)
        print(f"batched_fitness_speedup: {r['results']['bam']['speedup']:.1f} (target: >= 10)")
        return r
    r = bench_stats(a.model, a.stats_dir, out, a.prompts, a.population or 4, a.layers, a.context_length,
                    a.tasks.split(","), a.repeats, a.seed, a.max_new_tokens, a.sim_layers, a.pop_chunk or 1)
    print(json.dumps({k: r[k] for k in ("stats", "task")}, indent=1))
    print(f"stats: {r['stats']['candidate_evals_per_s']:.3f} candidates/s  task: "
          f"{r['task']['candidate_evals_per_s']:.3f} candidates/s  ({r['prompts']} prompts, "
          f"{r['population']} candidates, {len(r['simulated_layers'])} simulated layers)")
    print(f"stats_vs_task_speedup: {r['speedup']:.1f} (target: >= 20)")
    return r


if __name__ == "__main__":
    main()
