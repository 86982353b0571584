"""Runtime cost of KV policies on SmolLM2: prefill time, decode time per token, KV bytes.

    python -m experiments.bench.runtime [--contexts 2048 4096 8192] [--decode-tokens 16] [--out outputs/bench_runtime.json]

For each context length (Paul Graham essays, tokenised): full cache vs a NAMM policy vs H2O at a
25 % budget, all through the same runtime (``namm.torch``: chunked prefill of 128 tokens, policy
updates every 512 tokens, explicit positions), plus the full cache in one plain forward as a
reference. The NAMM is a policy directory exported with ``namm.export.save_pretrained`` holding
random-but-fixed BAM parameters (seed 0, N(0, 0.3^2)), normalisation statistics calibrated on the
first 2K tokens with the full cache, and a top-k cap at 25 % of the tokens seen with the threshold
disabled (so it keeps exactly a quarter, chosen by its BAM scores). An untrained NAMM would keep
everything, which measures nothing.

Prefill time: the whole prompt, policy updates included. Decode: greedy, median ms per token over
``--decode-tokens`` steps. Peak KV bytes: largest K/V footprint over the run (just before an
update the cache holds up to one update interval more than the budget); KV bytes at the end of
prefill are compared with the budget (25 % of the full cache's). ``--one-forward`` also times the
full cache in one plain forward (transformers' own cache and mask). Writes a JSON file, prints a table,
and the headline last.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path

log = logging.getLogger("bench_runtime")

BUDGET = 0.25
TARGETS = {"prefill_ratio_4k": 1.25, "prefill_ratio_8k": 1.0, "decode_speedup_8k": 1.3, "kv_budget_error": 0.05}


def context_ids(tokenizer, n: int, vocab: int):
    """``[1, n]`` token ids of essay text (random ids if the essays are not available)."""
    import torch

    try:
        from experiments.lib.assets import essays

        text = "\n\n".join(essays())
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n:
            return torch.tensor([ids[:n]])
        log.warning("essays give only %d tokens; padding with random ids", len(ids))
    except Exception as e:  # timing does not depend on the text
        log.warning("essays unavailable (%s); using random token ids", e)
        ids = []
    g = torch.Generator().manual_seed(0)
    extra = torch.randint(0, vocab, (n - len(ids),), generator=g).tolist()
    return torch.tensor([ids + extra])


def make_namm_dir(model, calib_ids, path: Path, seed: int = 0, scale: float = 0.3) -> Path:
    """Export a NAMM with random-but-fixed parameters and calibrated normalisation statistics."""
    import numpy as np

    from namm.config import NAMMConfig
    from namm.export import save_pretrained
    from namm.scoring import num_params
    from namm.torch.cache import model_signature
    from namm.torch.policy import calibrate_norm_stats

    cfg = NAMMConfig()
    mean, var = calibrate_norm_stats(model, [calib_ids], cfg)
    flat = np.random.default_rng(seed).normal(size=num_params(cfg)).astype(np.float32) * scale
    return save_pretrained(path, flat, cfg, (mean.numpy(), var.numpy()), model_signature(model))


def run_policy(model, policy, ids, decode_tokens: int) -> dict:
    """Prefill ``ids`` through ``policy``'s cache, then greedy-decode; times and KV sizes."""
    import torch

    from namm.torch.generate import _forward, prefill

    with torch.no_grad():
        cache = policy.make_cache(model)
        t0 = time.perf_counter()
        logits = prefill(model, cache, ids)
        cache.end_prefill()
        prefill_s = time.perf_counter() - t0
        kv_prefill = cache.kv_bytes()
        frac_prefill = cache.kv_fraction()
        steps = []
        token = logits.argmax(-1, keepdim=True)
        for _ in range(decode_tokens):
            t = time.perf_counter()
            logits = _forward(model, cache, token)
            steps.append(time.perf_counter() - t)
            token = logits.argmax(-1, keepdim=True)
    return {
        "prefill_s": prefill_s,
        "decode_ms_per_token": 1000 * statistics.median(steps),
        "decode_ms_all": [round(1000 * s, 2) for s in steps],
        "kv_bytes_end_prefill": kv_prefill,
        "kv_bytes_peak": cache.peak_bytes,
        "kv_fraction_prefill": frac_prefill,
        "stored_tokens_end": cache.stored_tokens(),
    }


def run_one_forward(model, ids) -> dict:
    """The full cache in one plain forward (transformers' own DynamicCache and sdpa mask)."""
    import torch
    from transformers import DynamicCache

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return {"prefill_s": time.perf_counter() - t0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench.runtime", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--model", default="smollm2", help="model spec for experiments.lib.models.load_model")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--one-forward", action="store_true", help="also time the full cache in one plain forward")
    ap.add_argument("--out", default="outputs/bench_runtime.json")
    args = ap.parse_args(argv)
    for n in args.contexts:
        if n < 512 or n % 128:
            ap.error(f"--contexts {n}: each context must be >= 512 and a multiple of 128")
    if args.decode_tokens < 1:
        ap.error("--decode-tokens must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from tqdm import tqdm

    from experiments.lib.models import load_model
    from namm.shards import atomic_write_json
    from namm.torch.policies import build_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    longest = context_ids(tokenizer, max(args.contexts), model.config.vocab_size)
    namm_dir = make_namm_dir(model, longest[:, :2048], Path(tempfile.mkdtemp(prefix="namm_bench_")) / "policy")
    policies = {
        "full": {"name": "full", "chunk_size": 128},
        "namm": {"name": "namm", "path": str(namm_dir), "budget": BUDGET, "threshold": -1e30},
        "h2o": {"name": "h2o", "budget": BUDGET},
    }
    rows = []
    for n in tqdm(args.contexts, desc="contexts"):
        ids = longest[:, :n]
        row = {"context": n}
        if args.one_forward:
            row["full_one_forward"] = run_one_forward(model, ids)
        for label, pcfg in tqdm(policies.items(), desc=f"{n} tokens", leave=False):
            row[label] = run_policy(model, build_policy(pcfg), ids, args.decode_tokens)
        full = row["full"]
        budget_bytes = BUDGET * full["kv_bytes_end_prefill"]
        for label in ("namm", "h2o"):
            r = row[label]
            r["prefill_ratio_vs_full"] = r["prefill_s"] / full["prefill_s"]
            if "full_one_forward" in row:
                r["prefill_ratio_vs_one_forward"] = r["prefill_s"] / row["full_one_forward"]["prefill_s"]
            r["decode_speedup_vs_full"] = full["decode_ms_per_token"] / r["decode_ms_per_token"]
            r["kv_budget_error"] = r["kv_bytes_end_prefill"] / budget_bytes - 1.0
        rows.append(row)
        log.info("%d tokens done", n)

    by_n = {r["context"]: r for r in rows}
    summary = {}
    if 4096 in by_n:
        summary["namm_prefill_ratio_4k"] = by_n[4096]["namm"]["prefill_ratio_vs_full"]
    if 8192 in by_n:
        summary["namm_prefill_ratio_8k"] = by_n[8192]["namm"]["prefill_ratio_vs_full"]
        summary["namm_kv_budget_error_8k"] = by_n[8192]["namm"]["kv_budget_error"]
    last = rows[-1]
    summary[f"namm_decode_speedup_{last['context'] // 1024}k"] = last["namm"]["decode_speedup_vs_full"]
    result = {
        "model": args.model,
        "budget": BUDGET,
        "contexts": args.contexts,
        "decode_tokens": args.decode_tokens,
        "schedule": {"chunk_size": 128, "update_interval": 512, "selection": "ragged_max"},
        "namm_policy": "random-but-fixed BAM parameters (seed 0, N(0, 0.3^2)), calibrated norm stats, "
        "threshold disabled, top-k cap at 25% of tokens seen",
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "rows": rows,
        "summary": summary,
        "targets": TARGETS,
        "note": "CPU timings on a shared machine (other jobs running): ratios measured in the same run",
    }
    atomic_write_json(Path(args.out), result)

    print(f"{'ctx':>5} {'policy':>12} {'prefill s':>10} {'vs full':>8} {'decode ms/tok':>14} {'speedup':>8} "
          f"{'KV MiB end':>11} {'KV MiB peak':>12} {'kv frac':>8}")
    for r in rows:
        if "full_one_forward" in r:
            print(f"{r['context']:>5} {'full 1-fwd':>12} {r['full_one_forward']['prefill_s']:>10.2f}")
        for label in ("full", "namm", "h2o"):
            p = r[label]
            print(f"{r['context']:>5} {label:>12} {p['prefill_s']:>10.2f} {p.get('prefill_ratio_vs_full', 1.0):>8.2f} "
                  f"{p['decode_ms_per_token']:>14.1f} {p.get('decode_speedup_vs_full', 1.0):>8.2f} "
                  f"{p['kv_bytes_end_prefill'] / 2**20:>11.1f} {p['kv_bytes_peak'] / 2**20:>12.1f} "
                  f"{p['kv_fraction_prefill']:>8.3f}")
    print(f"(JSON: {args.out})")
    for key, value in summary.items():
        if "budget_error" in key:
            print(f"{key}: {value:+.4f} (target: within +-{TARGETS['kv_budget_error']})")
    if "namm_prefill_ratio_4k" in summary:
        print(f"namm_prefill_ratio_4k: {summary['namm_prefill_ratio_4k']:.3f} (target: <= {TARGETS['prefill_ratio_4k']})")
    if "namm_prefill_ratio_8k" in summary:
        print(f"namm_prefill_ratio_8k: {summary['namm_prefill_ratio_8k']:.3f} (target: < {TARGETS['prefill_ratio_8k']})")
    key = f"namm_decode_speedup_{last['context'] // 1024}k"
    print(f"{key}: {summary[key]:.3f} (target: >= {TARGETS['decode_speedup_8k']})")
    return result


if __name__ == "__main__":
    main()
