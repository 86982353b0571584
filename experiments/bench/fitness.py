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
parameters) is timed the same way. Unless ``--no-bf16``, each scorer's batched path also runs with
``fitness.precision=bf16`` (scorer attention and answer forward in bfloat16), reported against the fp32
batched fitness of the same candidates (largest and mean difference, Spearman rank correlation). A profile
table gives each stage's measured time against its floor: the stage's FLOP count at the GFLOP/s a plain
matmul of a similar shape and of the path's dtype reaches in the same run, plus its exps at the fp32 softmax
rate (bytes at a measured memcpy's GB/s for the memory-bound stages). The headline is the fastest batched
path against the current fitness (BAM, fp32, one candidate at a time).

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


def gemm_rates(rows: int, width: int, inner: int, tile_rows: int, tile_keys: int, dtype=None) -> dict:
    """GEMM GFLOP/s of ``dtype`` (default fp32) at the answer forward's shape (``rows x width @ width x inner``)
    and at the BAM tile's (``tile_rows x 32 @ 32 x tile_keys``, the logits and the probabilities' product)."""
    import torch

    dtype = dtype or torch.float32
    a, w = torch.randn(rows, width, dtype=dtype), torch.randn(width, inner, dtype=dtype)
    q, k = torch.randn(tile_rows, 32, dtype=dtype), torch.randn(tile_keys, 32, dtype=dtype)
    probs = torch.randn(tile_rows, tile_keys, dtype=dtype)
    t_lin = _best_of(lambda: a @ w)
    t_qk = _best_of(lambda: q @ k.T)
    t_av = _best_of(lambda: probs @ k)
    return {"linear_gflops": 2 * rows * width * inner / t_lin / 1e9,
            "bam_tile_gflops": 2 * 2 * tile_rows * tile_keys * 32 / (t_qk + t_av) / 1e9,
            "dtype": str(dtype).removeprefix("torch.")}


def machine_rates(rows: int, width: int, inner: int, tile_rows: int, tile_keys: int, sort_shape) -> dict:
    """What this CPU reaches now: fp32 ``gemm_rates``, softmax elements/s on the BAM tile (fp32: what the fused
    attention kernels and the measure exponentiate in, whatever the GEMMs' dtype), a stable descending
    argsort's elements/s at the selection's ``sort_shape`` (a chunk's scores of one layer), and memcpy GB/s
    (64 MiB, read + write). A bf16 path's rates are these with ``gemm_rates(..., torch.bfloat16)`` over them."""
    import torch

    tile = torch.randn(tile_rows, tile_keys)
    src = torch.randn(16 * 2 ** 20)
    dst = torch.empty_like(src)
    t_sm = _best_of(lambda: torch.softmax(tile, -1))
    t_cp = _best_of(lambda: dst.copy_(src))
    scores = torch.randn(*sort_shape)
    t_sort = _best_of(lambda: torch.argsort(-scores, dim=-1, stable=True))
    return {**gemm_rates(rows, width, inner, tile_rows, tile_keys),
            "softmax_gelems": tile.numel() / t_sm / 1e9,
            "memcpy_gbs": 2 * src.numel() * 4 / t_cp / 1e9,
            "argsort_gelems": scores.numel() / t_sort / 1e9,
            "shapes": {"linear": [rows, width, inner], "bam_tile": [tile_rows, 32, tile_keys],
                       "argsort": list(sort_shape)}}


def stage_work(model, namm_cfg, prompts: list[dict], population: int) -> dict:
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
            pairs = S * (S + 1) / 2                           # backward-masked (query, key) pairs
            per_layer = hkv * (2 * 2 * fp * pairs + 2 * (f + 1) * fp * S + 2 * fp * (1 + f) * S)
            w["scoring"]["flops"] += population * L * per_layer
            w["scoring"]["exps"] += population * L * hkv * pairs
        else:
            width = namm_cfg.scorer.mlp_width or f
            w["scoring"]["flops"] += population * L * hkv * S * 2 * (f * width * (namm_cfg.scorer.mlp_depth - 1) + width)
        w["selection"]["sorts"] += population * L * hkv * S     # one stable argsort of every slot's score
        w["answer_forward"]["flops"] += population * (2 * L * lin * n + L * 4 * hq * d * n * (S + n) + 2 * D * V * m)
        w["answer_forward"]["exps"] += population * L * hq * n * (S + n)
        w["measure"]["exps"] += population * m * V            # a softmax over the vocabulary
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
    "measure": "per candidate: a softmax over the 49K vocabulary, then min and sums against p_full in float64",
    "mlp:scoring": "25 parameters: a few small ops per layer and chunk, per-call overhead only",
    "bf16:answer_forward": "bf16: the attention's masked softmax over the shared slots, the fp32 log-sum-exps "
                           "and the casts are memory-bound beside GEMMs that AMX runs ~8x faster than fp32",
    "bf16:scoring": "bf16: the fused backward attention computes the diagonal blocks whole and, with K = 32, "
                    "its bf16 GEMMs run far below the linear layers' rate; the exps (fp32 inside) dominate",
}


def bench_agreement(model_spec: str, out: str, prompts: int, population: int, ref_population: int,
                    context_length: int, tasks: list[str], seed: int, max_answer_tokens: int, pop_chunk: int,
                    budget: float, mlp: bool, bf16: bool = True) -> dict:
    import torch

    from experiments.fitness.agreement import AgreementFitness
    from experiments.lib.models import load_model
    from experiments.studies.fitness_correlation import spearman
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
        low = AgreementFitness(model, tok, rows, cfg, norm, batched=True, pop_chunk=pop_chunk, precision="bf16",
                               **common) if bf16 else None
        if shared_src is None:
            for i in items:
                ref._prepare(i)
            shared_src, prep = ref, dict(ref.timings)
        for fit in (bat, low) if low else (bat,):
            fit._shared, fit._answers = shared_src._shared, shared_src._answers
            fit.evaluate(pop[:pop_chunk], [0])               # warm-up (allocations, first calls, the bf16 copy)
            fit.timings.clear()
        ref._shared, ref._answers = shared_src._shared, shared_src._answers
        ref.evaluate(pop[:1], [0])
        ref.timings.clear()

        def timed(fit):
            t0 = time.perf_counter()
            f = fit.evaluate(pop, items)
            sec = time.perf_counter() - t0
            return f, {"seconds": sec, "candidates": population, "candidate_evals_per_s": population / sec,
                       "stages_s": dict(fit.timings), "fitness": f.tolist(),
                       "details": {k: v.tolist() for k, v in fit.last_details.items()}}

        f_bat, r_bat = timed(bat)
        t0 = time.perf_counter()
        f_ref = ref.evaluate(pop[:ref_population], items)
        ref_s = time.perf_counter() - t0
        ref_rate = ref_population / ref_s
        results[name] = {
            "batched": r_bat,
            "unbatched": {"seconds": ref_s, "candidates": ref_population,
                          "candidate_evals_per_s": ref_rate, "fitness": f_ref.tolist()},
            "speedup": r_bat["candidate_evals_per_s"] / ref_rate,
            "max_fitness_diff": float(np.abs(f_bat[:ref_population] - f_ref).max()),
        }
        if low:
            f_low, r_low = timed(low)
            results[name]["batched_bf16"] = {
                **r_low, "speedup": r_low["candidate_evals_per_s"] / ref_rate,
                "max_fitness_diff_vs_fp32": float(np.abs(f_low - f_bat).max()),
                "mean_fitness_diff_vs_fp32": float(np.abs(f_low - f_bat).mean()),
                "rank_correlation_vs_fp32": spearman(f_low, f_bat)["rho"],
                "best_fp32_rank_in_bf16": int(np.argsort(np.argsort(-f_low))[int(np.argmax(f_bat))]) + 1}
    shapes = [{"S": len(shared_src._split(i)[0]), "n": int(shared_src._shared[i].tail.shape[1]),
               "m": int(shared_src._shared[i].p_full.shape[0])} for i in items]
    mean_s = int(np.mean([p["S"] for p in shapes]))
    c = model.config
    shape_args = (pop_chunk * max(p["n"] for p in shapes), c.hidden_size, c.intermediate_size, 16 * pop_chunk,
                  mean_s // 2, (pop_chunk, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, mean_s))
    rates = machine_rates(*shape_args)
    rates_bf16 = {**rates, **gemm_rates(*shape_args[:5], dtype=torch.bfloat16)} if bf16 else None
    tables = {}
    for name, cfg in cfgs.items():
        work = stage_work(model, cfg, shapes, population)
        tables[name] = profile_table({**prep, **results[name]["batched"]["stages_s"]}, work, rates)
        if bf16:
            # the prompt's shared stages stay fp32 (and at fp32 floors); the per-candidate ones at bf16 rates
            low = profile_table({**prep, **results[name]["batched_bf16"]["stages_s"]}, work, rates_bf16)
            tables[f"{name}_bf16"] = [row if row["per_candidate"] else fp for row, fp in zip(low, tables[name])]
    out_d = {"suite": "agreement", "model": model_spec, "prompts": len(rows), "context_length": context_length,
             "prompt_shapes": shapes, "population": population, "ref_population": ref_population,
             "pop_chunk": pop_chunk, "budget": budget, "max_answer_tokens": max_answer_tokens,
             "torch_threads": torch.get_num_threads(), "norm_calibration_s": calib_s, "rates": rates,
             "rates_bf16": rates_bf16,
             "results": results, "profile": tables, "explanations": EXPLAIN,
             "note": "a candidate evaluation = one candidate on all the prompts; the shared per-prompt state "
                     "(prefill, features, reference) is prepared once and excluded from both rates",
             "wall_s": round(time.time() - t_start, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out), out_d)
    return out_d


def _fmt(rho) -> str:
    return "n/a (under 3 candidates or constant)" if rho is None else f"{rho:.3f}"


def print_agreement(r: dict) -> None:
    rates = r["rates"]
    if r.get("rates_bf16"):
        b = r["rates_bf16"]
        print(f"machine, bf16: GEMM {b['linear_gflops']:.1f} GFLOP/s at {b['shapes']['linear']}, "
              f"{b['bam_tile_gflops']:.1f} GFLOP/s at the BAM tile")
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
        if "batched_bf16" in res:
            b = res["batched_bf16"]
            print(f"{name}, bf16: batched {b['candidate_evals_per_s']:.3f} candidates/s, {b['speedup']:.2f}x the "
                  f"fp32 unbatched; against the fp32 batched fitness of all {r['population']} candidates: max "
                  f"|difference| {b['max_fitness_diff_vs_fp32']:.2e}, mean {b['mean_fitness_diff_vs_fp32']:.2e}, "
                  f"Spearman {_fmt(b['rank_correlation_vs_fp32'])}, fp32's best ranked {b['best_fp32_rank_in_bf16']}")
    for name, rows in r["profile"].items():
        print(f"\nprofile ({name.split('_')[0]} scorer{', bf16' if name.endswith('_bf16') else ''}, batched run; per-candidate stages over all {r['population']} candidates)")
        print(f"{'stage':<15}{'seconds':>9}{'GFLOP':>9}{'G exp':>8}{'M sort':>8}{'GB':>7}{'floor s':>9}"
              f"{'x floor':>9}")
        for row in rows:
            x = "" if row["x_floor"] is None else f"{row['x_floor']:.1f}"
            keys = [f"{part}:{row['stage']}" for part in (name, name.split("_")[0], name.split("_")[-1])]
            why = next((r["explanations"][k] for k in keys + [row["stage"]] if k in r["explanations"]), "")
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
    ap.add_argument("--no-bf16", action="store_true", help="agreement: skip the bf16 batched path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the comparison is per core)")
    ap.add_argument("--pop-chunk", type=int, default=None,
                    help="candidates computed together (agreement 16; stats fitness.pop_chunk, 1)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    import torch

    from namm.shards import atomic_write_json

    torch.set_num_threads(a.threads)
    out = a.out or f"outputs/bench_fitness/{a.suite}.json"
    if a.suite == "agreement":
        r = bench_agreement(a.model, out, a.prompts, a.population or 32, a.ref_population, a.context_length,
                            a.tasks.split(","), a.seed, a.max_answer_tokens, a.pop_chunk or 16, a.budget,
                            not a.no_mlp, not a.no_bf16)
        print_agreement(r)
        bam = r["results"]["bam"]
        current = bam["unbatched"]["candidate_evals_per_s"]   # the agreement fitness as trained before: BAM, fp32
        paths = {(name, "fp32"): res["batched"]["candidate_evals_per_s"] for name, res in r["results"].items()}
        paths.update({(name, "bf16"): res["batched_bf16"]["candidate_evals_per_s"]
                      for name, res in r["results"].items() if "batched_bf16" in res})
        print("\nbatched paths against the current fitness (BAM scorer, fp32, one candidate at a time, "
              f"{current:.3f} candidates/s):")
        for (name, prec), rate in paths.items():
            print(f"  {name} scorer, {prec}: {rate:.3f} candidates/s, {rate / current:.2f}x")
        (name, prec), rate = max(paths.items(), key=lambda kv: kv[1])
        r["headline"] = {"path": f"{name}, {prec}", "speedup_vs_current": rate / current}
        atomic_write_json(Path(out), r)
        print(f"batched_fitness_speedup (BAM, fp32, fitness equal to the reference): {bam['speedup']:.1f}")
        print(f"fitness_speedup_vs_current ({name} scorer, {prec}, batched): {rate / current:.1f} (target: >= 10)")
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
