"""Can a NAMM express a hand-designed eviction rule? Fit its scorer to a baseline's keep decisions and measure.

    python -m experiments.studies.imitation --teacher snapkv --init smollm2-gold-long \
        [--train 24] [--heldout 12] [--steps 300] [--out-dir outputs/imitation_snapkv]

The question it answers: when an evolved NAMM stays below SnapKV (or H2O) on held-out prompts, is that the
search (CMA-ES on a noisy fitness never found a better scorer) or the features (no scorer on the NAMM's
spectrogram features can pick the tokens the baseline picks)? Setting: the agreement fitness' (one eviction at
the end of a full-cache prefill, ``experiments.fitness.agreement``), at the policy's trained cap. On built-in
training-split prompts (``--tasks``, ``--context-length``, ``--task-seed``; seed 0 is the training stages'):

1. Each prompt is prefilled once with the full cache; every layer's NAMM features at the end of the prefill are
   recorded (``AgreementFitness``' shared state, the features every candidate is scored from).
2. The teacher (``--teacher``, a runtime baseline with its ``configs/policy`` knobs, one eviction at the end of
   the prefill, the same cap) prefills the same prompt; its keep decision per layer and KV head is the label.
   With ``--pool-kernel K`` the features also carry their max over K chronological neighbours
   (``features.pool_kernel``; the init's parameters widened with zero weights for them, ``widen_features``).
   With ``--ema-coeff G`` the spectrogram's EMA runs at coefficient G per query instead of the init's
   (``features.ema_coeff``; 0.99 is about 100 queries, 0.95 about 20); the normalisation is then recalibrated
   on the training prompts (``calibrate_norm_stats``), since the init's statistics belong to the other EMA.
3. The scorer (BAM or MLP, ``namm.scoring.score_tokens``, JAX) is fitted from ``--init``'s parameters with optax
   Adam on a pairwise ranking loss, ``softplus(s_evicted - s_kept)`` over ``--pairs`` random (kept, evicted)
   pairs per layer and head, ``--batch`` (prompt, layer) instances a step, on the training prompts.
4. On the held-out prompts, for the initial and the fitted scorer (the runtime's selection at the cap,
   ``AgreementFitness.population_keeps``) and for ``--compare`` baselines: the share of the teacher's kept tokens
   each keeps (``overlap``, mean over prompts, layers and heads; equal caps make it symmetric), and each one's
   fitness under ``--target`` (``full``: acceptance of the full-cache answer; ``gold``: probability of the
   reference answer), the measure the stages evolve on.

High overlap with a fitness at the teacher's means the scorer class holds the teacher's rule, so the evolved
NAMM's gap is the search's; low overlap means the features limit it. The fitted scorer is exported to
``OUT_DIR/namm_policy`` (``run.init_policy=DIR`` starts a CMA-ES stage from it; ``policy.path=DIR`` evaluates it).
Outputs in ``--out-dir``: ``imitation.json``, ``imitation.md``, ``imitation_loss.png``; the headline (the fitted
scorer's held-out overlap) is printed last. Deterministic given ``--seed`` on CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TASKS = "passkey,needle_qa,kv_retrieval,passage_retrieval_en,lcc"
OUT_NAME = "imitation"


class ImitationError(ValueError):
    """A bad setting of the study."""


def teacher_config(name: str, budget) -> dict:
    """The runtime config of a baseline as ``experiments.evaluate`` runs it, one eviction at the end of the prefill."""
    from experiments.lib.cli import policy_yaml

    knobs = {k: v for k, v in (policy_yaml(name) or {}).items() if k not in ("name", "budget") and v is not None}
    knobs.update(update_interval=0, final_update=True)
    return {"name": name, "budget": budget, **knobs}


def with_pool_kernel(flat, cfg, kernel, name):
    """``--pool-kernel``: the init's parameters and config with neighbour-pooled features switched on (the new
    inputs' weights zero, so the scorer starts where the init is); unchanged when ``kernel`` is None or the same."""
    from dataclasses import replace

    from namm.config import ConfigError
    from namm.scoring import widen_features

    if kernel is None or kernel == cfg.features.pool_kernel:
        return flat, cfg
    if cfg.features.pool_kernel:
        raise ImitationError(f"--init {name} already pools over {cfg.features.pool_kernel} neighbours; "
                             f"drop --pool-kernel or give it {cfg.features.pool_kernel}")
    try:
        wide = replace(cfg, features=replace(cfg.features, pool_kernel=int(kernel)))
    except ConfigError as e:
        raise ImitationError(f"--pool-kernel {kernel}: {e}") from None
    return widen_features(flat, cfg, wide), wide


def with_ema_coeff(cfg, coeff, name):
    """``--ema-coeff``: the config with the EMA coefficient ``coeff`` (unchanged when None or the same); returns
    ``(cfg, changed)``."""
    from dataclasses import replace

    from namm.config import ConfigError

    if coeff is None or float(coeff) == float(cfg.features.ema_coeff):
        return cfg, False
    try:
        return replace(cfg, features=replace(cfg.features, ema_coeff=float(coeff))), True
    except ConfigError as e:
        raise ImitationError(f"--ema-coeff {coeff} (init {name}): {e}") from None


def runtime_keeps(model, policy, ids, shared_features) -> list:
    """Per layer, ``[H, S]`` bool: which of the shared prefill's slots ``policy`` keeps when it prefills ``ids``
    with its own cache and evicts at the end of the prefill (matched by absolute position)."""
    import torch

    from namm.torch.generate import prefill

    cache = policy.make_cache(model)
    with torch.no_grad():
        prefill(model, cache, torch.tensor([ids], dtype=torch.long))
        cache.end_prefill()
    out = []
    for layer, (_, positions, valid, _) in zip(cache.layers, shared_features):
        kept = layer.positions[0]                                            # [H, S']
        kept_valid = torch.ones_like(kept, dtype=torch.bool) if layer.valid is None else layer.valid[0]
        pos = positions[0]                                                   # [H, S]
        hit = (pos[:, :, None] == kept[:, None, :]) & kept_valid[:, None, :]
        keep = hit.any(-1)
        if valid is not None:
            keep &= valid[0]
        out.append(keep)
    return out


def overlap(keep, teacher) -> float:
    """Mean over heads of |keep & teacher| / |teacher| (``[H, S]`` bool each)."""
    t = teacher.sum(-1).clamp(min=1)
    return float(((keep & teacher).sum(-1) / t).double().mean())


def pack(fit, items, teacher_keeps) -> dict:
    """The (prompt, layer) instances of ``items`` as padded arrays: features [B, H, N, F], valid, order, label."""
    inst = []
    for i in items:
        shared = fit._prepare(i)
        for (feats, positions, valid, _), label in zip(shared.features, teacher_keeps[i]):
            v = np.ones(positions.shape[1:], bool) if valid is None else valid[0].numpy()
            inst.append((feats[0].numpy(), v, positions[0].numpy(), label.numpy()))
    n = max(x[0].shape[1] for x in inst)
    b, h, f = len(inst), inst[0][0].shape[0], inst[0][0].shape[2]
    feats = np.zeros((b, h, n, f), np.float32)
    valid = np.zeros((b, h, n), bool)
    order = np.full((b, h, n), np.iinfo(np.int32).max // 2, np.int32)
    label = np.zeros((b, h, n), bool)
    for k, (x, v, p, y) in enumerate(inst):
        s = x.shape[1]
        feats[k, :, :s], valid[k, :, :s], order[k, :, :s], label[k, :, :s] = x, v, p, y & v
    return {"features": feats, "valid": valid, "order": order, "label": label}


def fit_scorer(flat0: np.ndarray, cfg, data: dict, *, steps: int, batch: int, pairs: int, lr: float, seed: int):
    """Adam on the pairwise ranking loss (module docstring) -> (fitted flat params, loss per step)."""
    import jax
    import jax.numpy as jnp
    import optax

    from namm.scoring import score_tokens

    feats, valid, order, label = (jnp.asarray(data[k]) for k in ("features", "valid", "order", "label"))
    n_inst = feats.shape[0]
    if not bool(jnp.any(label & valid)) or not bool(jnp.any(~label & valid)):
        raise ImitationError("the teacher keeps every token or none: nothing to rank; use a budget below 1")

    def sample(key, lab, val):
        """``pairs`` (kept, evicted) slot pairs of one head, uniform over each set."""
        k1, k2 = jax.random.split(key)
        kept = jax.random.categorical(k1, jnp.where(lab & val, 0.0, -jnp.inf), shape=(pairs,))
        evicted = jax.random.categorical(k2, jnp.where(~lab & val, 0.0, -jnp.inf), shape=(pairs,))
        return kept, evicted

    def loss_fn(flat, idx, key):
        def one(b, k):
            s = score_tokens(flat, cfg, feats[b], valid[b], order[b])              # [H, N]
            keys = jax.random.split(k, s.shape[0])
            kept, evicted = jax.vmap(sample)(keys, label[b], valid[b])           # [H, pairs] each
            d = jnp.take_along_axis(s, kept, -1) - jnp.take_along_axis(s, evicted, -1)
            return jax.nn.softplus(-d).mean()
        return jax.vmap(one)(idx, jax.random.split(key, idx.shape[0])).mean()

    opt = optax.adam(lr)

    @jax.jit
    def step(flat, state, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.choice(k1, n_inst, (min(batch, n_inst),), replace=False)
        loss, grad = jax.value_and_grad(loss_fn)(flat, idx, k2)
        updates, state = opt.update(grad, state, flat)
        return optax.apply_updates(flat, updates), state, loss

    from tqdm import tqdm

    flat = jnp.asarray(flat0, jnp.float32)
    state = opt.init(flat)
    key = jax.random.PRNGKey(seed)
    losses = []
    for _ in tqdm(range(steps), desc="fit scorer", file=sys.stderr, leave=False):
        key, sub = jax.random.split(key)
        flat, state, loss = step(flat, state, sub)
        losses.append(float(loss))
    return np.asarray(flat, np.float32), losses


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [f"Teacher `{a['teacher']}` at {a['budget']} kept, one eviction at the end of the prefill; "
             f"{result['n_train']} training and {result['n_heldout']} held-out prompts "
             f"({a['tasks']} at {a['context_length']} tokens, task seed {a['task_seed']}); fitness target "
             f"`{a['target']}`.", "",
             "| policy | overlap with the teacher's kept tokens (train) | (held-out) | held-out fitness |",
             "|---|---:|---:|---:|"]
    for name, r in result["policies"].items():
        tr = "" if r.get("overlap_train") is None else f"{r['overlap_train']:.3f}"
        lines.append(f"| {name} | {tr} | {r['overlap_heldout']:.3f} | {r['fitness_heldout']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(losses, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("pairwise ranking loss")
    ax.set_title("fitting the scorer to the teacher's keep decisions", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_study(a) -> dict:
    import torch

    from experiments.fitness.agreement import AgreementFitness
    from experiments.lib.models import load_model, model_signature
    from experiments.tasks import load_task
    from namm.export import load_pretrained, save_pretrained
    from namm.pretrained import resolve
    from namm.shards import atomic_write_json
    from namm.torch.policies import build_policy

    torch.manual_seed(a.seed)
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    flat0, cfg, norm, meta = load_pretrained(resolve(a.init))
    if flat0.ndim != 1:
        raise ImitationError(f"--init {a.init} has per-layer parameters; the study fits a shared scorer")
    flat0, cfg = with_pool_kernel(flat0, cfg, a.pool_kernel, a.init)
    cfg, recalibrate = with_ema_coeff(cfg, a.ema_coeff, a.init)
    budget = a.budget if a.budget is not None else meta.get("trained_budget")
    if budget is None:
        raise ImitationError(f"--init {a.init} has no trained cap; give --budget (e.g. 0.5)")
    model, tok = load_model(a.model, seed=a.seed)
    sig = model_signature(model)
    if (meta["base_model"]["num_layers"], meta["base_model"]["num_kv_heads"]) != (sig["num_layers"], sig["num_kv_heads"]):
        raise ImitationError(f"--init {a.init} was exported for {meta['base_model']['name']} "
                             f"({meta['base_model']['num_layers']} layers), not this model ({sig['num_layers']}); "
                             "give a policy of this model")
    tasks = [t for t in a.tasks.split(",") if t]
    rows = load_task({"name": "builtin", "tasks": tasks, "context_lengths": [a.context_length],
                      "n": -(-(a.train + a.heldout) // len(tasks)), "seed": a.task_seed}, tok, split="train")
    by_task = {t: [r for r in rows if r["dataset"] == t] for t in tasks}
    rows = [by_task[t][k] for k in range(max(len(v) for v in by_task.values())) for t in tasks
            if k < len(by_task[t])][: a.train + a.heldout]                # interleaved over the tasks
    if len(rows) < a.train + a.heldout:
        raise ImitationError(f"only {len(rows)} prompts for --train {a.train} + --heldout {a.heldout}")
    fit = AgreementFitness(model, tok, rows, cfg, norm, chat=False, max_context=None, budget=budget,
                           target=a.target, max_answer_tokens=a.max_answer_tokens, progress=False)
    if recalibrate:   # on the prompts the fit compresses; fit.norm is first read by _prepare below
        from namm.torch.policy import calibrate_norm_stats

        norm = calibrate_norm_stats(model, [torch.tensor([fit._split(i)[0]], dtype=torch.long)
                                            for i in range(a.train)], cfg)
        fit.norm = norm = tuple(np.asarray(x, np.float32) for x in norm)
    train, held = list(range(a.train)), list(range(a.train, a.train + a.heldout))
    names = [a.teacher] + [c for c in a.compare.split(",") if c and c != a.teacher]
    policies = {n: build_policy(teacher_config(n, budget)) for n in names}
    keeps = {n: {} for n in names}
    from tqdm import tqdm

    t0 = time.perf_counter()
    for i in tqdm(range(len(rows)), desc="prefill and teacher", file=sys.stderr):
        shared = fit._prepare(i)
        ids, _ = fit._split(i)
        for n in names:
            if n == a.teacher or i in held:
                keeps[n][i] = runtime_keeps(model, policies[n], ids, shared.features)
    t_prep = time.perf_counter() - t0
    data = pack(fit, train, keeps[a.teacher])
    t0 = time.perf_counter()
    flat, losses = fit_scorer(flat0, cfg, data, steps=a.steps, batch=a.batch, pairs=a.pairs, lr=a.lr, seed=a.seed)
    t_fit = time.perf_counter() - t0

    def namm_overlap(flats, items):
        per = np.zeros((len(flats), len(items)))
        for j, i in enumerate(items):
            ks = fit.population_keeps(np.stack(flats), fit._prepare(i))
            for p in range(len(flats)):
                per[p, j] = np.mean([overlap(k[p], t) for k, t in zip(ks, keeps[a.teacher][i])])
        return per.mean(1)

    ov_train = namm_overlap([flat0, flat], train)
    ov_held = namm_overlap([flat0, flat], held)
    fitness = fit.evaluate(np.stack([flat0, flat]), held)
    res = {f"NAMM {a.init} (initial)": {"overlap_train": float(ov_train[0]), "overlap_heldout": float(ov_held[0]),
                                         "fitness_heldout": float(fitness[0])},
           f"NAMM fitted to {a.teacher}": {"overlap_train": float(ov_train[1]), "overlap_heldout": float(ov_held[1]),
                                           "fitness_heldout": float(fitness[1])}}
    for n in names:
        ov = np.mean([np.mean([overlap(k, t) for k, t in zip(keeps[n][i], keeps[a.teacher][i])]) for i in held])
        res[n] = {"overlap_train": None, "overlap_heldout": float(ov),
                  "fitness_heldout": float(fit.evaluate_policy(policies[n], held)["fitness"])}
    export = save_pretrained(out / "namm_policy", flat, cfg, norm, meta["base_model"],
                             trained_budget=meta.get("trained_budget"), trained_schedule=meta.get("trained_schedule"))
    result = {"args": {**vars(a), "budget": budget}, "n_train": len(train), "n_heldout": len(held),
              "policies": res, "loss": losses, "wall_s": {"prefill_and_teachers": t_prep, "fit": t_fit},
              "export_dir": str(export)}
    atomic_write_json(out / f"{OUT_NAME}.json", result)
    (out / f"{OUT_NAME}.md").write_text(markdown(result))
    plot(losses, out / f"{OUT_NAME}_loss.png")
    return result


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.studies.imitation",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 | tiny_random | a local dir")
    ap.add_argument("--init", default="smollm2-gold-long", help="the NAMM to start from (bundled name or directory)")
    ap.add_argument("--pool-kernel", type=int, default=None,
                    help="switch on neighbour-pooled features (features.pool_kernel, an odd k >= 3) for the fit")
    ap.add_argument("--ema-coeff", type=float, default=None,
                    help="EMA coefficient per query of the spectrogram features (features.ema_coeff); the "
                         "normalisation is recalibrated on the training prompts when it differs from the init's")
    ap.add_argument("--teacher", default="snapkv", help="the baseline whose keep decisions are fitted")
    ap.add_argument("--compare", default="snapkv,h2o,streamingllm", help="baselines also measured on held-out")
    ap.add_argument("--budget", type=float, default=None, help="cap (fraction); default the policy's trained cap")
    ap.add_argument("--tasks", default=DEFAULT_TASKS, help="comma-separated built-in tasks")
    ap.add_argument("--context-length", type=int, default=1024)
    ap.add_argument("--task-seed", type=int, default=0, help="seed of the generated prompts (the stages': 0)")
    ap.add_argument("--train", type=int, default=24, help="prompts to fit on (interleaved over the tasks)")
    ap.add_argument("--heldout", type=int, default=12, help="prompts measured after the fit")
    ap.add_argument("--target", default="gold", choices=("full", "gold"), help="the fitness measure (agreement)")
    ap.add_argument("--max-answer-tokens", type=int, default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8, help="(prompt, layer) instances per step")
    ap.add_argument("--pairs", type=int, default=256, help="(kept, evicted) pairs per head and instance")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=f"outputs/{OUT_NAME}")
    return ap


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    a = build_parser().parse_args(argv)
    if a.train < 1 or a.heldout < 1 or a.steps < 1 or a.batch < 1 or a.pairs < 1:
        print("error: --train, --heldout, --steps, --batch and --pairs must be >= 1", file=sys.stderr)
        return 2
    try:
        result = run_study(a)
    except ImitationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(result))
    fitted = result["policies"][f"NAMM fitted to {a.teacher}"]
    print(f"imitation_overlap_heldout: {fitted['overlap_heldout']:.3f} (target: >= 0.9 of the {a.teacher} "
          f"teacher's kept tokens, the scorer class can express it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
