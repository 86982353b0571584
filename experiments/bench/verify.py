"""Cost of a speculative verification call: the target over n new tokens against a one-token decode step.

    python -m experiments.bench.verify [--rows 1 2 3 5 7 9 17] [--context 512] [--threads 1] [--out ...]

The target (SmolLM2 by default) holds ``--context`` tokens of essay text in its KV cache; each timed
call feeds n new tokens and is cropped back, so every call sees the same cache. Two ways of running
the same weights are interleaved in one run: plain ``nn.Linear`` (``F.linear``) and
``spec_decode.torch.linear.SmallBatchLinear`` (``weight @ x.T`` for 2 to ``--max-rows`` rows, default 6). A draft of length
gamma is verified with n = gamma + 1 tokens, so ``cost(n) / cost(1)`` is what one verification costs
in decode steps: the smaller, the more a speculative round saves. Also reports the largest logit
difference between the two ways (float rounding only). Writes a JSON file, prints a table, and the
headline last: how much faster a 5-token verification (gamma = 4) is with the few-row path.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
from pathlib import Path

log = logging.getLogger("bench_verify")

TARGET_SPEEDUP = 1.0   # the few-row path must not be slower than F.linear at gamma + 1 = 5 rows


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench.verify", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 5, 7, 9, 17],
                    help="new tokens per timed call (5 = verifying a draft of length 4)")
    ap.add_argument("--context", type=int, default=512, help="tokens already in the KV cache")
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per (rows, mode); the median is kept")
    ap.add_argument("--model", default="smollm2", help="model spec for experiments.lib.models.load_model")
    ap.add_argument("--max-rows", type=int, default=None,
                    help="largest row count on the few-row path (default: spec_decode.torch.linear.DEFAULT_MAX_ROWS)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (specbench's default is 1)")
    ap.add_argument("--out", default="outputs/bench_verify.json")
    args = ap.parse_args(argv)
    if any(r < 1 for r in args.rows) or 1 not in args.rows:
        ap.error(f"--rows {args.rows}: every value must be >= 1 and 1 (the decode step) must be among them")
    if 5 not in args.rows:
        ap.error("--rows must include 5 (gamma = 4, the headline)")
    if args.context < 1 or args.repeats < 1 or (args.max_rows is not None and args.max_rows < 2):
        ap.error("--context and --repeats must be >= 1, --max-rows >= 2")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import torch
    from tqdm import tqdm
    from transformers import DynamicCache

    from experiments.bench.runtime import context_ids
    from experiments.lib.models import load_model
    from namm.shards import atomic_write_json
    from spec_decode.torch.linear import DEFAULT_MAX_ROWS, use_small_batch_linear

    torch.set_num_threads(args.threads)
    few_rows = args.max_rows or DEFAULT_MAX_ROWS
    model, tokenizer = load_model(args.model)
    ids = context_ids(tokenizer, args.context + max(args.rows), model.config.vocab_size)
    ctx, new = ids[:, : args.context], ids[:, args.context:]
    cache = DynamicCache(config=model.config)
    times: dict[tuple[str, int], list[float]] = {}
    max_diff = 0.0
    with torch.no_grad():
        model(ctx, past_key_values=cache, use_cache=True, logits_to_keep=1)
        for rep in tqdm(range(args.repeats + 1), desc="repeats"):
            for n in args.rows:
                logits = {}
                for mode, max_rows in (("plain", 1), ("small_batch", few_rows)):
                    use_small_batch_linear(model, max_rows)
                    t0 = time.perf_counter()
                    logits[mode] = model(new[:, :n], past_key_values=cache, use_cache=True).logits
                    dt = time.perf_counter() - t0
                    cache.crop(-n)
                    if rep:                                   # the first pass warms up
                        times.setdefault((mode, n), []).append(dt)
                max_diff = max(max_diff, float((logits["plain"] - logits["small_batch"]).abs().max()))
    use_small_batch_linear(model, 1)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    rows = [{"rows": n, "plain_ms": ms["plain", n], "small_batch_ms": ms["small_batch", n],
             "plain_vs_decode_step": ms["plain", n] / ms["plain", 1],
             "small_batch_vs_decode_step": ms["small_batch", n] / ms["plain", 1],
             "speedup": ms["plain", n] / ms["small_batch", n]} for n in args.rows]
    headline = next(r["speedup"] for r in rows if r["rows"] == 5)
    result = {"model": args.model, "context": args.context, "repeats": args.repeats, "max_rows": few_rows,
              "device": "cpu",
              "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
              "rows": rows, "max_abs_logit_diff": max_diff, "verify5_speedup": headline,
              "target": {"verify5_speedup": f"> {TARGET_SPEEDUP}"}}
    atomic_write_json(Path(args.out), result)
    print(f"{'rows':>5} {'plain ms':>9} {'few-row ms':>11} {'plain/step':>11} {'few-row/step':>13} {'speedup':>8}")
    for r in rows:
        print(f"{r['rows']:>5} {r['plain_ms']:>9.1f} {r['small_batch_ms']:>11.1f} {r['plain_vs_decode_step']:>11.2f} "
              f"{r['small_batch_vs_decode_step']:>13.2f} {r['speedup']:>8.2f}")
    print(f"max |logit difference| plain vs few-row: {max_diff:.2e}   (JSON: {args.out})")
    print(f"verify5_speedup: {headline:.3f} (target: > {TARGET_SPEEDUP})")
    return result


if __name__ == "__main__":
    main()
