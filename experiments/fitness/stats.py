"""The ``stats`` fitness of a training stage: the stage's prompts through the full cache once, then the JAX
simulation over what was recorded.

    train_fit, eval_fit, norm = build_stats(fit_cfg, cfg, model=model, tokenizer=tok, rows=rows, ...)

The full-cache pass (``experiments.extract``: greedy answer, score and the post-RoPE q/k/v of
``cfg.extract_layers``) writes one shard per prompt to ``cfg.stats_dir`` and skips the prompts already there.
The simulation itself, its settings (``namm.fitness.StatsFitnessConfig``, the ``fitness`` node) and its
feature normalisation are ``namm.fitness``'s (pure JAX).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def build_stats(fit_cfg: dict, cfg, *, model, tokenizer, rows, train_idx, held_idx, namm_cfg, norm, norm_path: Path):
    """``(train_fit, eval_fit, norm)`` of ``fitness=stats`` (see ``experiments.fitness.build``): two
    ``namm.fitness.StatsFitness`` over the training and held-out prompts' shards, the held-out one under the
    training one's normalisation (calibrated from the training shards and written to ``norm_path`` when ``norm``
    is None)."""
    from experiments.extract import extract
    from experiments.fitness import save_norm
    from namm import stats as kvstats
    from namm.fitness import StatsFitness, StatsFitnessConfig, load_stats_data

    chat, max_context = bool(cfg.model.get("chat", False)), cfg.model.get("max_context")
    summary_x = extract(model, tokenizer, rows, str(cfg.stats_dir), layers=_plain(cfg.get("extract_layers")),
                        chat=chat, max_context=max_context,
                        compress_question=bool(cfg.get("question_in_compression", True)),
                        progress=bool(cfg.get("progress", True)), model_name=str(cfg.model.get("name")))
    log.info("kv stats: %s prompts, %.0f bytes per prompt per 1K tokens", summary_x["prompts"],
             summary_x["bytes_per_prompt_per_1k_tokens"])
    names = [kvstats.shard_name(r["dataset"], str(r["_id"])) for r in rows]
    prompts = kvstats.load_prompts(str(cfg.stats_dir), names)
    s_cfg = StatsFitnessConfig.from_mapping(fit_cfg)
    train_fit = StatsFitness(load_stats_data([prompts[i] for i in train_idx], namm_cfg, s_cfg), namm_cfg, s_cfg,
                             norm=None if norm is None else _norm_params(norm))
    if norm is None:
        norm = tuple(np.asarray(x) for x in train_fit.norm)
        save_norm(norm_path, norm)
    eval_fit = (StatsFitness(load_stats_data([prompts[i] for i in held_idx], namm_cfg, s_cfg), namm_cfg, s_cfg,
                             norm=train_fit.norm) if len(held_idx) else None)
    return train_fit, eval_fit, norm


def _plain(x):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def _norm_params(norm):
    import jax.numpy as jnp

    from namm.features import NormParams

    return NormParams(jnp.asarray(norm[0], jnp.float32), jnp.asarray(norm[1], jnp.float32))
