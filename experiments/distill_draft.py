"""Distil a draft for the target and export it as a Hugging Face Llama directory.

    python -m experiments.distill_draft draft=smollm2_2l distill.divergence=tvd
    python -m experiments.distill_draft -m distill.divergence=fkl,rkl,jsd,tvd      # one run per divergence
    python -m experiments.distill_draft distill.steps=0 export_dir=...             # the undistilled draft

Data: the teacher store (``experiments.extract_teacher``) gives the ``fixed`` (prompt positions) and
``teacher`` (target continuations) pools; with ``onpolicy.rounds > 0`` each round the draft samples
continuations of training prompts in JAX, the target scores them in torch (top-k), and they join the
``draft`` pool. Batches mix the pools by ``distill.mix``. Metrics go to ``metrics.jsonl`` (+ wandb).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sysconfig
from pathlib import Path

import hydra
import jax
import jax.numpy as jnp
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from experiments.extract_teacher import teacher_topk
from experiments.lib.tracking import Tracker
from namm.shards import ShardStore, atomic_write_json
from spec_decode.data import Windows, frequent_vocab, inverse_map, make_windows, sequences_from_shard
from spec_decode.distill import DistillConfig, train
from spec_decode.draft import DraftConfig, init_params, params_from_hf, sample
from spec_decode.export import export_draft

log = logging.getLogger(__name__)


def load_sequences(teacher_dir: str | Path) -> list[dict]:
    store = ShardStore(teacher_dir, "teacher")
    seqs = []
    for name in store.names():
        arrays, meta = store.read(name)
        for s, sid in zip(sequences_from_shard(arrays), meta["ids"]):
            s["id"] = sid
            seqs.append(s)
    if not seqs:
        raise RuntimeError(f"teacher store {teacher_dir} is empty; run python -m experiments.extract_teacher first")
    return seqs


def is_val(sid: str, fraction: float) -> bool:
    return int(hashlib.sha256(f"val:{sid}".encode()).hexdigest()[:8], 16) / 2 ** 32 < fraction


def stdlib_token_lists(tokenizer, max_chars: int) -> list[list[int]]:
    """Token ids of Python standard-library sources (code-token frequencies for the reduced head)."""
    out, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(errors="ignore")
        out.append(tokenizer.encode(text, add_special_tokens=False))
        total += len(text)
        if total >= max_chars:
            break
    return out


def build_vocab_map(cfg, tokenizer, seqs, vocab_size: int) -> np.ndarray | None:
    if not cfg.draft.reduced_vocab:
        return None
    lists = [s["tokens"] for s in seqs]
    if cfg.draft.vocab_extra_stdlib_chars:
        lists += stdlib_token_lists(tokenizer, int(cfg.draft.vocab_extra_stdlib_chars))
    eos = tokenizer.eos_token_id
    always = list(tokenizer.all_special_ids) + ([eos] if eos is not None else [])
    return frequent_vocab(lists, int(cfg.draft.reduced_vocab), vocab_size, always=always)


def onpolicy_round(dcfg, params, vocab_map, target, prompts: list[list[int]], cfg, key) -> list[dict]:
    """Draft samples continuations (JAX); the target scores them (torch) -> ``draft``-pool sequences."""
    width = max(len(p) for p in prompts)
    arr = np.zeros((len(prompts), width), np.int32)
    for r, p in enumerate(prompts):
        arr[r, :len(p)] = p
    toks = np.asarray(sample(dcfg, params, jnp.asarray(arr), jnp.asarray([len(p) for p in prompts]),
                             int(cfg.onpolicy.new_tokens), key, float(cfg.onpolicy.temperature),
                             None if vocab_map is None else jnp.asarray(vocab_map)))
    seqs = [p + t.tolist() for p, t in zip(prompts, toks)]
    scored = teacher_topk(target, seqs, int(cfg.top_k))
    return [{"tokens": np.asarray(s, np.int32), "prompt_len": len(p), "topk_ids": i, "topk_logp": lp}
            for s, p, (i, lp) in zip(seqs, prompts, scored)]


def run(cfg: DictConfig) -> dict:
    from experiments.lib.models import load_model

    out = Path(cfg.output_dir)
    target, tokenizer = load_model(cfg.target)
    state = {k: v.detach().float().numpy() for k, v in target.state_dict().items()}
    dcfg = DraftConfig.from_target(target.config.to_dict(), int(cfg.draft.num_layers),
                                   **(OmegaConf.to_container(cfg.draft.overrides, resolve=True) if cfg.draft.overrides else {}))
    if cfg.draft.init == "target":
        layers = list(cfg.draft.init_layers) if cfg.draft.init_layers else None
        params = params_from_hf(state, dcfg, layers)
    elif cfg.draft.init == "scratch":
        params = init_params(dcfg, jax.random.PRNGKey(cfg.seed))
    else:
        raise ValueError(f"draft.init={cfg.draft.init!r}; use target or scratch")

    seqs = load_sequences(cfg.teacher_dir)
    train_seqs = [s for s in seqs if not is_val(s["id"], cfg.val_fraction)]
    val_seqs = [s for s in seqs if is_val(s["id"], cfg.val_fraction)]
    vocab_map = build_vocab_map(cfg, tokenizer, train_seqs, dcfg.vocab_size)
    inv = inverse_map(vocab_map, dcfg.vocab_size)
    w = int(cfg.window)
    pools = {"fixed": make_windows(train_seqs, "fixed", w), "teacher": make_windows(train_seqs, "teacher", w)}
    eval_sets = {"val": make_windows(val_seqs, "teacher", w)} if val_seqs else {}
    dist = OmegaConf.to_container(cfg.distill, resolve=True)
    dist["mix"] = tuple(sorted(dist["mix"].items()))
    dc = DistillConfig(**dist)
    tracker = Tracker(out, OmegaConf.to_container(cfg, resolve=True), mode=cfg.logging.wandb_mode,
                      project=cfg.logging.project, name=f"distill-{dc.divergence}")
    history = []
    rounds = int(cfg.onpolicy.rounds) if dict(dc.mix).get("draft", 0) > 0 else 0
    key = jax.random.PRNGKey(cfg.seed)
    vm = None if vocab_map is None else np.asarray(vocab_map)
    for r in range(rounds + 1):
        steps = dc.steps if rounds == 0 else int(round(dc.steps * (r + 1) / (rounds + 1)))
        if r > 0:  # on-policy data from the current draft
            key, sub = jax.random.split(key)
            rng = np.random.default_rng(cfg.seed + r)
            pick = rng.choice(len(train_seqs), size=min(int(cfg.onpolicy.prompts), len(train_seqs)), replace=False)
            prompts = [train_seqs[i]["tokens"][:train_seqs[i]["prompt_len"]].tolist()[-int(cfg.onpolicy.max_prompt):]
                       for i in pick]
            new = onpolicy_round(dcfg, params, vm, target, prompts, cfg, sub)
            pools["draft"] = Windows.concat([pools[k] for k in ["draft"] if k in pools] + [make_windows(new, "draft", w)])
            log.info("on-policy round %d: %d draft sequences", r, len(pools["draft"]))
        params, hist = train(dcfg, params, pools, dc, vocab_map=vm, inv_map=inv, eval_sets=eval_sets,
                             ckpt_path=out / "checkpoint.msgpack", log=tracker.log, until=steps)
        history += hist
    export_dir = Path(cfg.export_dir) if cfg.export_dir else out / "draft"
    info = {"target": getattr(target.config, "name_or_path", "?"), "divergence": dc.divergence, "steps": dc.steps,
            "init": cfg.draft.init, "mix": dict(dc.mix), "onpolicy_rounds": rounds,
            "reduced_vocab": None if vocab_map is None else len(vocab_map)}
    export_draft(export_dir, dcfg, params, tokenizer_dir=cfg.tokenizer_dir or _model_dir(target),
                 vocab_map=vocab_map, draft_length=int(cfg.draft_length), info=info)
    result = {"export_dir": str(export_dir), **info, "history": history,
              "final": history[-1] if history else {}}
    atomic_write_json(out / "distill_result.json", result)
    tracker.close()
    return result


def _model_dir(model) -> str | None:
    from experiments.lib.assets import smollm2_dir

    name = getattr(model.config, "name_or_path", "")
    if Path(str(name)).is_dir():
        return str(name)
    try:
        return str(smollm2_dir()) if "smollm2" in str(name).lower() else None
    except Exception:
        return None


@hydra.main(config_path="../configs", config_name="distill_draft", version_base=None)
def main(cfg: DictConfig) -> None:
    torch.manual_seed(cfg.seed)
    result = run(cfg)
    final = result["final"]
    print(json.dumps({k: v for k, v in final.items() if k != "step"}))
    print(f"val_alpha: {final.get('eval/val/alpha', float('nan')):.4f} (target: above the undistilled draft)")


if __name__ == "__main__":
    main()
