"""Teacher data for draft distillation: target continuations of task prompts + top-k next-token logprobs.

    python -m experiments.extract_teacher target=smollm2 out_dir=/path/teacher

Prompts: the *train* split of HumanEval (held-out problems never enter) and of the built-in suite.
Each shard (``ShardStore`` kind "teacher", atomic, resumable) holds a batch of sequences::

    tokens      [N] int32        prompt + continuation of every sequence, concatenated
    offsets     [n + 1] int64    sequence i is tokens[offsets[i]:offsets[i+1]]
    prompt_lens [n] int64
    topk_ids    [N, k] int32     the target's top-k next-token ids after each position
    topk_logp   [N, k] float32   their log-probabilities under the full softmax (tail mass = 1 - sum exp)
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from namm.shards import ShardStore

log = logging.getLogger(__name__)


def task_prompts(tokenizer, cfg, split: str) -> list[tuple[str, list[int]]]:
    """``(id, prompt ids)`` of the HumanEval and built-in-suite rows in ``split`` (train or test)."""
    from experiments.tasks import build_prompt, load_task

    out = []
    for source in cfg:
        rows = load_task(OmegaConf.to_container(source, resolve=True) if isinstance(source, DictConfig) else source,
                         tokenizer, split=split)
        for row in rows:
            p = build_prompt(row, tokenizer, chat=bool(source.get("chat", False)),
                             max_prompt_tokens=source.get("max_prompt_tokens"))
            out.append((row["_id"], list(p.context_ids) + list(p.question_ids)))
    return out


@torch.no_grad()
def teacher_topk(model, sequences: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k next-token ``(ids [T, k] int32, logprobs [T, k] float32)`` of the target after every position."""
    out = []
    for seq in sequences:
        logits = model(torch.tensor([seq])).logits[0].float()                       # [T, V]
        logp = torch.log_softmax(logits, -1)
        v, i = torch.topk(logp, k, dim=-1)
        out.append((i.numpy().astype(np.int32), v.numpy().astype(np.float32)))
    return out


@torch.no_grad()
def continue_prompts(model, prompts: list[list[int]], max_new_tokens: int, eos, pad_id: int,
                     temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Target continuations (batched, left-padded ``generate``), cut after the first EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    torch.manual_seed(seed)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                         pad_token_id=pad_id, eos_token_id=eos)[:, width:].tolist()
    eos_set = set(eos if isinstance(eos, list) else [eos])
    outs = []
    for g in gen:
        cut = next((i + 1 for i, t in enumerate(g) if t in eos_set), len(g))
        outs.append(g[:cut])
    return outs


def pack(prompts: list[list[int]], conts: list[list[int]], topk: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    seqs = [p + c for p, c in zip(prompts, conts)]
    return {"tokens": np.concatenate([np.asarray(s, np.int32) for s in seqs]),
            "offsets": np.cumsum([0] + [len(s) for s in seqs]).astype(np.int64),
            "prompt_lens": np.asarray([len(p) for p in prompts], np.int64),
            "topk_ids": np.concatenate([t[0] for t in topk]), "topk_logp": np.concatenate([t[1] for t in topk])}


def extract(model, tokenizer, cfg, out_dir: str | Path) -> ShardStore:
    """Write (or finish) the teacher store for ``cfg``; finished shards are skipped on a rerun."""
    fingerprint = {"target": getattr(model.config, "name_or_path", "?"), "vocab": model.config.vocab_size,
                   "sources": OmegaConf.to_container(cfg.sources, resolve=True), "top_k": cfg.top_k,
                   "max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": cfg.seed}
    store = ShardStore(out_dir, "teacher", fingerprint)
    prompts = task_prompts(tokenizer, cfg.sources, "train")
    prompts.sort(key=lambda x: len(x[1]))                       # similar lengths share a batch
    batches = [prompts[i:i + cfg.batch_size] for i in range(0, len(prompts), cfg.batch_size)]
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    for b, batch in enumerate(tqdm(batches, desc="teacher shards")):
        name = f"shard-{b:05d}"
        if store.has(name, verify=True):      # a truncated or altered shard is written again
            continue
        ids = [p for _, p in batch]
        conts = continue_prompts(model, ids, cfg.max_new_tokens, eos, pad, cfg.temperature, cfg.seed + b)
        topk = teacher_topk(model, [p + c for p, c in zip(ids, conts)], cfg.top_k)
        store.write(name, pack(ids, conts, topk), meta={"ids": [i for i, _ in batch]})
    log.info("teacher store %s: %d shards, %.1f MB", store.root, len(store.names()), store.total_bytes() / 1e6)
    return store


@hydra.main(config_path="../configs", config_name="extract_teacher", version_base=None)
def main(cfg: DictConfig) -> None:
    from experiments.lib.models import load_model

    torch.manual_seed(cfg.seed)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    model, tokenizer = load_model(cfg.target)
    store = extract(model, tokenizer, cfg, cfg.out_dir)
    n_tokens = sum(int(store.read(n, verify=False)[0]["tokens"].shape[0]) for n in store.names())
    print(f"teacher_tokens: {n_tokens} (target: > 0)")


if __name__ == "__main__":
    main()
