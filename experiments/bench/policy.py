"""Cost of one NAMM policy update against the target's own forward pass over the chunk that triggers it.

    python -m experiments.bench.policy [--contexts 1024 2048 4096] [--repeats 5] [--out outputs/bench_policy.json]

SmolLM2-135M's shape (30 layers, 9 query / 3 KV heads, head dim 64) on CPU. For each cached-token
count N: the time of one policy update over all 30 layers (features + BAM + selection, median of
repeats) on GQA-averaged attention rows [30, 3, 512, N], against the time of SmolLM2's forward pass
over the 512-token chunk with N - 512 tokens already cached, measured in the same run. Two
implementations of the same update are timed: the PyTorch runtime's (``NAMMPolicy.update``, what
runs beside the forward pass inside the model; the headline ratio) and the JAX one (``namm.policy``,
jit-compiled, compile excluded; what the stats fitness simulates), each split into pieces to say
where the time goes. Writes a JSON file; prints the headline last.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_policy")

LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM, N_NEW = 30, 9, 3, 64, 512
TARGET = 0.25


def _median_time(fn, repeats: int, setup=None) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# --------------------------------------------------------------------------------------------
# The target model's forward pass
# --------------------------------------------------------------------------------------------

def load_target(model_spec: str):
    """SmolLM2 (converted GGUF); a randomly initialised LlamaConfig of the same shapes if unavailable."""
    import torch

    try:
        from experiments.lib.models import load_model

        model, _ = load_model(model_spec)
        return model, model_spec
    except Exception as e:  # no asset: same shapes, same cost
        log.warning("could not load %r (%s); timing a random LlamaConfig with SmolLM2's shapes", model_spec, e)
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=LAYERS,
                          num_attention_heads=Q_HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                          vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
                          attn_implementation="sdpa")
        return LlamaForCausalLM(cfg).eval(), "random-smollm2-shape"


def time_forward(model, n_cached: int, repeats: int) -> tuple[float, list[float]]:
    """Median seconds of ``model(chunk of 512 tokens, past_key_values=<n_cached - 512 tokens>)``."""
    import torch
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    past_len = n_cached - N_NEW
    ids = torch.randint(0, vocab, (1, n_cached), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        if past_len:
            model(ids[:, :past_len], past_key_values=cache, use_cache=True)
        chunk = ids[:, past_len:]
        pos = torch.arange(past_len, n_cached)[None]

        def run():
            model(chunk, past_key_values=cache, use_cache=True, position_ids=pos)

        def reset():
            extra = cache.get_seq_length() - past_len
            if extra > 0:
                cache.crop(-extra)                              # drop the chunk appended by the last run

        reset(); run()                                          # warm-up
        return _median_time(run, repeats, setup=reset)


# --------------------------------------------------------------------------------------------
# The policy update
# --------------------------------------------------------------------------------------------

def policy_inputs(n_cached: int, seed: int = 0):
    """Stacked per-layer inputs: rows [L, 3, 512, N] (causal softmax-like), state, positions, valid."""
    import jax.numpy as jnp

    from namm.config import NAMMConfig
    from namm.policy import PolicyState

    cfg = NAMMConfig()
    rng = np.random.default_rng(seed)
    past = n_cached - N_NEW
    rows = rng.random((LAYERS, KV_HEADS, N_NEW, n_cached), dtype=np.float32)
    q = np.arange(N_NEW)[:, None]
    rows[..., past:] *= (np.arange(N_NEW)[None, :] <= q)       # causal inside the new block
    rows /= rows.sum(-1, keepdims=True)
    valid = np.ones((LAYERS, KV_HEADS, n_cached), bool)
    old = np.broadcast_to(np.arange(n_cached) < past, valid.shape)
    state = PolicyState(
        ema=jnp.asarray(rng.random((LAYERS, KV_HEADS, n_cached, cfg.features.spec_dim), dtype=np.float32) * old[..., None] * 0.01),
        left_context=jnp.asarray(rng.random((LAYERS, KV_HEADS, n_cached, cfg.features.context), dtype=np.float32) * old[..., None] / n_cached),
        positions=jnp.asarray(np.broadcast_to(np.arange(n_cached, dtype=np.int32), valid.shape)),
        valid=jnp.asarray(old),
    )
    return cfg, jnp.asarray(rows), state, jnp.arange(n_cached, dtype=jnp.int32), jnp.asarray(valid)


def time_policy(n_cached: int, repeats: int) -> dict:
    """Median seconds of the full update over all layers, and of each piece jitted on its own."""
    import jax
    import jax.numpy as jnp

    from namm import features as F
    from namm import policy, scoring, selection

    cfg, rows, state, positions, valid = policy_inputs(n_cached)
    params = jnp.asarray(np.random.default_rng(1).normal(0, 0.05, scoring.num_params(cfg)), jnp.float32)

    def over_layers(fn):
        """Apply ``fn`` layer by layer (lax.map: one compiled body, memory of one layer)."""
        return jax.jit(lambda *xs: jax.lax.map(lambda a: fn(*a), xs))

    # Normalisation statistics calibrated on these inputs (raw EMA of every valid token, all layers).
    raw_ema = over_layers(lambda s, r, v: policy.update(scoring.zeros(cfg), None, s, r, positions, v, cfg)[0].ema)
    norm = F.NormStats.init(cfg.features.spec_dim).update(raw_ema(state, rows, valid), valid).finalize()
    step = policy.make_update(cfg, norm)

    full = over_layers(lambda s, r, v: step(params, s, r, positions, v))

    # Pieces, on the same inputs, each jitted separately.
    pos2 = jnp.broadcast_to(positions, valid.shape[1:])
    info = lambda s, v: policy.slot_info(s, positions, v)

    def stft(s, r, v):
        """Spectrogram only (summed over frames so that nothing big is written out)."""
        _, is_new, _, _ = info(s, v)
        ctx = jnp.where(is_new[..., None], 0.0, s.left_context)
        series = jnp.concatenate([ctx, jnp.swapaxes(r, -1, -2)], axis=-1)
        return F._spectrogram(series, cfg.features).sum(-2)                        # [H, N, S]

    def feats(s, r, v):
        _, is_new, recency, _ = info(s, v)
        return F.token_features(r, s.left_context, s.ema, is_new, recency, norm, cfg)[0]

    x = over_layers(feats)(state, rows, valid)
    bam = over_layers(lambda xx, v: scoring.score_tokens(params, cfg, xx, v, order=pos2))
    scores = bam(x, valid)
    newest = jnp.broadcast_to(positions == n_cached - 1, valid.shape)
    sel = over_layers(lambda sc, v, nw: selection.select(sc, v, nw, cfg.selection))

    # Build each jitted callable once so the timed calls reuse the compiled executable.
    compiled = {
        "update_all_layers": (full, (state, rows, valid)),
        "stft": (over_layers(stft), (state, rows, valid)),
        "features_total": (over_layers(feats), (state, rows, valid)),
        "bam": (bam, (x, valid)),
        "selection": (sel, (scores, valid, newest)),
    }
    out = {}
    for name, (fn, args) in compiled.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))                                            # compile + warm-up
        compile_s = time.perf_counter() - t0
        med, times = _median_time(lambda: jax.block_until_ready(fn(*args)), repeats)
        out[name] = {"median_s": med, "times_s": times, "compile_and_first_call_s": compile_s}
    # GQA averaging of the raw [L, 9, 512, N] rows is done by the runtime when it recomputes the rows;
    # timed for reference, not part of the update.
    raw = jnp.repeat(rows, Q_HEADS // KV_HEADS, axis=1)
    gqa = jax.jit(lambda a: F.gqa_average(a, KV_HEADS))
    jax.block_until_ready(gqa(raw))
    out["gqa_average_not_in_update"] = {"median_s": _median_time(lambda: jax.block_until_ready(gqa(raw)), repeats)[0]}
    del raw
    _, _, keep = full(state, rows, valid)
    out["kept_fraction"] = float(np.asarray(keep).mean())
    out["ema_norm_age_derived_s"] = out["features_total"]["median_s"] - out["stft"]["median_s"]
    out["runtime"] = time_runtime_update(cfg, params, norm, rows, state, n_cached, repeats)
    return out


def time_runtime_update(cfg, params, norm, rows, state, n_cached: int, repeats: int) -> dict:
    """The same update through the PyTorch runtime (``NAMMPolicy.update``, what runs inside the model):
    all layers in turn, same parameters, normalisation and inputs; split into features and BAM."""
    import torch

    from namm.torch import features as TF
    from namm.torch import scoring as TS
    from namm.torch.policy import NAMMPolicy

    pol = NAMMPolicy.from_flat(np.asarray(params), cfg, norm_stats=(np.asarray(norm.mean), np.asarray(norm.var)))
    past = n_cached - N_NEW
    t_rows = torch.from_numpy(np.asarray(rows))[:, None]                                # [L, 1, H, n, N]
    ema = torch.from_numpy(np.asarray(state.ema))[:, None, :, :past]
    ctx = torch.from_numpy(np.asarray(state.left_context))[:, None, :, :past]
    pos = torch.arange(n_cached).expand(1, KV_HEADS, n_cached)
    keys = torch.zeros(1, KV_HEADS, n_cached, HEAD_DIM)
    kept = []

    def update_all():
        kept.clear()
        for layer in range(LAYERS):
            up = pol.update({"ema": ema[layer], "left_context": ctx[layer]}, t_rows[layer], keys, pos, None,
                            N_NEW, n_cached, layer, False)
            kept.append(1.0 if up.keep is None else up.keep.shape[-1] / n_cached)

    is_new = (torch.arange(n_cached) >= past).expand(1, KV_HEADS, n_cached)
    recency = n_cached - 1 - pos
    ema_full = torch.cat([ema, torch.zeros(LAYERS, 1, KV_HEADS, N_NEW, ema.shape[-1])], -2)
    ctx_full = torch.cat([ctx, torch.zeros(LAYERS, 1, KV_HEADS, N_NEW, ctx.shape[-1])], -2)
    tnorm = pol._norm("cpu")

    def features_all():
        return [TF.token_features(t_rows[i], ctx_full[i], ema_full[i], is_new, recency, tnorm, cfg)[0]
                for i in range(LAYERS)]

    feats = features_all()
    lp = pol._layer_params(0, "cpu")

    def bam_all():
        for i in range(LAYERS):
            TS.score_tokens(lp, cfg, feats[i], None)

    out = {}
    with torch.inference_mode():
        for name, fn in (("update_all_layers", update_all), ("features_total", features_all), ("bam", bam_all)):
            fn()                                                                        # warm-up
            med, times = _median_time(fn, repeats)
            out[name] = {"median_s": med, "times_s": times}
        update_all()
    out["kept_fraction"] = float(np.mean(kept))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.bench.policy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--model", default="smollm2", help="model spec for experiments.lib.models.load_model")
    ap.add_argument("--out", default="outputs/bench_policy.json")
    args = ap.parse_args(argv)
    for n in args.contexts:
        if n < N_NEW or n % 16:
            ap.error(f"--contexts {n}: each context must be >= {N_NEW} and a multiple of 16")
    if 2048 not in args.contexts:
        ap.error("--contexts must include 2048 (the headline is measured there)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import jax
    import torch
    from tqdm import tqdm

    model, model_name = load_target(args.model)
    rows = []
    for n in tqdm(args.contexts, desc="contexts"):
        fwd, fwd_times = time_forward(model, n, args.repeats)
        pol = time_policy(n, args.repeats)
        rows.append({"cached_tokens": n, "forward_512_s": fwd, "forward_times_s": fwd_times,
                     "policy": pol, "ratio": pol["runtime"]["update_all_layers"]["median_s"] / fwd,
                     "jax_ratio": pol["update_all_layers"]["median_s"] / fwd})
    result = {
        "model": model_name, "layers": LAYERS, "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "n_new": N_NEW, "repeats": args.repeats, "device": "cpu", "platform": platform.platform(),
        "jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "rows": rows, "target_ratio_2k": TARGET,
        "policy_update_ratio_2k": next(r["ratio"] for r in rows if r["cached_tokens"] == 2048),
        "jax_update_ratio_2k": next(r["jax_ratio"] for r in rows if r["cached_tokens"] == 2048),
        "headline_is": "the PyTorch runtime's update (what runs beside the model's forward); jax_* is namm.policy jitted",
        "note": "CPU timings on a shared machine; model forward and policy update measured in the same run",
    }
    from namm.shards import atomic_write_json

    atomic_write_json(Path(args.out), result)

    pieces = ["stft", "features_total", "bam", "selection"]
    print("PyTorch runtime update (NAMMPolicy.update, all layers):")
    print(f"{'N':>6} {'fwd512 s':>9} {'update s':>9} {'ratio':>6} {'features s':>11} {'bam s':>8} {'kept':>5}")
    for r in rows:
        p = r["policy"]["runtime"]
        print(f"{r['cached_tokens']:>6} {r['forward_512_s']:>9.3f} {p['update_all_layers']['median_s']:>9.3f} "
              f"{r['ratio']:>6.3f} {p['features_total']['median_s']:>11.3f} {p['bam']['median_s']:>8.3f} "
              f"{p['kept_fraction']:>5.2f}")
    print("JAX update (namm.policy, jit over all layers):")
    head = f"{'N':>6} {'fwd512 s':>9} {'update s':>9} {'ratio':>6} " + " ".join(f"{p:>14}" for p in pieces) + f" {'kept':>5}"
    print(head)
    for r in rows:
        p = r["policy"]
        print(f"{r['cached_tokens']:>6} {r['forward_512_s']:>9.3f} {p['update_all_layers']['median_s']:>9.3f} "
              f"{r['jax_ratio']:>6.3f} " + " ".join(f"{p[k]['median_s']:>14.4f}" for k in pieces)
              + f" {p['kept_fraction']:>5.2f}")
    print("where the time goes (runtime): " + ", ".join(
        f"{r['cached_tokens']}: features {r['policy']['runtime']['features_total']['median_s'] / r['policy']['runtime']['update_all_layers']['median_s']:.0%}"
        f" BAM {r['policy']['runtime']['bam']['median_s'] / r['policy']['runtime']['update_all_layers']['median_s']:.0%}"
        for r in rows))
    print("where the time goes (JAX; share of the update; pieces jitted separately, so they need not add up):")
    for r in rows:
        p, tot = r["policy"], r["policy"]["update_all_layers"]["median_s"]
        print(f"  {r['cached_tokens']:>5}: STFT {p['stft']['median_s'] / tot:.0%}, EMA+norm+age "
              f"{p['ema_norm_age_derived_s'] / tot:.0%}, BAM {p['bam']['median_s'] / tot:.0%}, "
              f"selection {p['selection']['median_s'] / tot:.0%}")
    print(f"(JSON: {args.out}; GQA averaging, done by the runtime, not in the update: "
          + ", ".join(f"{r['cached_tokens']}: {r['policy']['gqa_average_not_in_update']['median_s']:.3f} s" for r in rows)
          + ")")
    print(f"jax_update_ratio_2k: {result['jax_update_ratio_2k']:.3f}")
    print(f"policy_update_ratio_2k: {result['policy_update_ratio_2k']:.3f} (target: < {TARGET})")
    return result


if __name__ == "__main__":
    main()
