"""Extract KV statistics: run the target with a full cache over a task's training prompts.

    python -m experiments.extract model=smollm2 task=builtin split=train layers=[0,6,12,18,24,29]

Per prompt: the full-cache greedy answer (scored with the task metric: the fitness normaliser),
then one teacher-forced forward over prompt + answer that records, per selected layer, the
post-RoPE queries, keys and values (fp16) through a registered attention function. One shard per
prompt in ``stats_dir`` (``namm.stats``); a rerun skips finished shards (and rewrites a truncated or
corrupt one, which it finds by its recorded size and checksum); a directory extracted
from another model or config is refused. Prints the storage cost per prompt per 1K tokens last.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from namm import stats

log = logging.getLogger(__name__)

CAPTURE_ATTN = "namm_capture"


class ExtractError(ValueError):
    """Extraction settings that cannot work (bad layer list, empty task)."""


def resolve_layers(layers: Sequence[int] | int | None, num_layers: int) -> list[int]:
    """None: every layer; an int n: n layers evenly spaced (first and last included); a list: as given."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int):
        if not 1 <= layers <= num_layers:
            raise ExtractError(f"layers={layers}: the model has {num_layers} layers; use 1..{num_layers}")
        return sorted({int(round(x)) for x in np.linspace(0, num_layers - 1, layers)})
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if not 0 <= x < num_layers]
    if bad or not out:
        raise ExtractError(f"layers={list(layers)}: the model has layers 0..{num_layers - 1}; fix {bad or 'the list'}")
    return out


def _register_capture() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def capture_attention(module, query, key, value, attention_mask, **kwargs):
        rec = _Recorder.active
        if rec is not None and getattr(module, "layer_idx", None) in rec.layers:
            # query [B, Hq, T, d] and key/value [B, Hkv, T, d]: post-RoPE, before any GQA repeat
            rec.out[module.layer_idx] = tuple(x[0].detach().to("cpu").half().numpy() for x in (query, key, value))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_ATTN, capture_attention)
    AttentionMaskInterface.register(CAPTURE_ATTN, sdpa_mask)


class _Recorder:
    active: "_Recorder | None" = None

    def __init__(self, layers: Sequence[int]):
        self.layers = set(layers)
        self.out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


@contextlib.contextmanager
def capture(model, layers: Sequence[int]):
    """Within the block, a forward records ``{layer: (q, k, v)}`` of the selected layers."""
    _register_capture()
    rec = _Recorder(layers)
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE_ATTN)
    _Recorder.active = rec
    try:
        yield rec
    finally:
        _Recorder.active = None
        model.set_attn_implementation(previous)


def record_qkv(model, ids: Sequence[int], layers: Sequence[int]):
    """One full forward over ``ids``: -> q [L, Hq, T, d], k [L, Hkv, T, d], v [L, Hkv, T, d] (fp16)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad(), capture(model, layers) as rec:
        model(input_ids=torch.tensor([list(ids)], dtype=torch.long, device=device), use_cache=False,
              logits_to_keep=1)
    missing = sorted(set(layers) - set(rec.out))
    if missing:
        raise ExtractError(f"layers {missing} recorded nothing: the model's attention does not go through "
                           f"transformers' AttentionInterface")
    return tuple(np.stack([rec.out[l][i] for l in layers]) for i in range(3))


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for v in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif v:
            ids.update(int(x) for x in v)
    return sorted(ids)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = len(text)
    for s in stops or ():
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
    return text[:cut]


def generate_answer(model, tokenizer, prompt, spec, max_new_tokens: int, *, policy=None, eos_token_ids=None,
                    compress_question: bool = True):
    """Greedy answer to a built prompt through the runtime (``policy`` None: full cache).

    Returns (the decoded text cut at the task's stop strings for this prompt's format, the
    ``GenerationOutput``); generation itself stops at the same strings.
    """
    import torch

    from namm.torch.generate import greedy_generate

    device = next(model.parameters()).device
    ctx = torch.tensor([prompt.context_ids], dtype=torch.long, device=device)
    q = torch.tensor([prompt.question_ids], dtype=torch.long, device=device) if prompt.question_ids else None
    stops = spec.stops(prompt.chat)
    with torch.no_grad():
        out = greedy_generate(model, ctx, q, max_new_tokens, policy=policy, eos_token_ids=eos_token_ids,
                              compress_question=compress_question, stop_strings=list(stops) or None,
                              tokenizer=tokenizer)
    return cut_at_stop(tokenizer.decode(out.token_ids, skip_special_tokens=True), stops), out


def extract(model, tokenizer, rows: Sequence[Mapping], stats_dir: str | Path, *, layers=None, chat: bool,
            max_context: int | None, templates: Mapping[str, str] | None = None, compress_question: bool = True,
            progress: bool = True, model_name: str | None = None) -> dict:
    """Write one kv_stats shard per row (skipping finished ones); returns ``namm.stats.summary``."""
    from tqdm import tqdm

    from experiments.lib.models import model_signature
    from experiments.tasks import build_prompts, get_spec, score_prediction

    if not rows:
        raise ExtractError("no prompts to extract; check task=... and split=... (split=all uses every prompt)")
    sig = model_signature(model)
    if model_name:
        sig["name"] = model_name
    layer_ids = resolve_layers(layers, sig["num_layers"])
    fp = stats.fingerprint(sig, layer_ids, chat=bool(chat), max_context=max_context, dtype="float16", record="qkv",
                           answer="full_cache_greedy", compress_question=bool(compress_question))
    store = stats.open_store(stats_dir, fp)
    prompts = build_prompts(list(rows), tokenizer, chat, max_context, templates)
    eos = eos_ids(model, tokenizer)
    t0, done = time.time(), 0
    bar = tqdm(total=len(rows), disable=not progress, desc="extract", unit="prompt", dynamic_ncols=True,
               file=sys.stderr)
    for row, prompt in zip(rows, prompts):
        name = stats.shard_name(row["dataset"], str(row["_id"]))
        if store.has(name, verify=True):
            bar.update(1)
            continue
        if store.has(name):                   # recorded, but its file was truncated or altered since
            log.warning("%s; extracting it again", store.problem(name))
        spec = get_spec(row["dataset"])
        text, out = generate_answer(model, tokenizer, prompt, spec, spec.max_new_tokens, eos_token_ids=eos,
                                    compress_question=compress_question)
        score = float(score_prediction(row["dataset"], text, row))
        answer_ids = list(out.token_ids) or [eos[0] if eos else 0]
        qs, ks, vs = record_qkv(model, prompt.ids + answer_ids, layer_ids)
        stats.write_prompt(store, stats.PromptStats(
            q=qs, k=ks, v=vs, layers=np.asarray(layer_ids), task=row["dataset"], id=str(row["_id"]),
            context_len=len(prompt.context_ids), question_len=len(prompt.question_ids),
            answer_len=len(answer_ids), score=score, answer=text))
        done += 1
        bar.update(1)
        bar.set_postfix(task=row["dataset"], score=f"{score:.2f}")
    bar.close()
    out = stats.summary(stats_dir)
    out.update({"extracted_now": done, "wall_s": round(time.time() - t0, 1), "layers": layer_ids})
    return out


def _plain(x: Any) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def run(cfg) -> dict:
    from experiments.lib.models import load_model_from_cfg
    from experiments.tasks import load_task
    from namm.shards import atomic_write_json

    model, tokenizer = load_model_from_cfg(cfg.model, device=str(cfg.device), cache=cfg.get("cache_dir"))
    rows = load_task(cfg.task, tokenizer, split=str(cfg.split), cache_dir=cfg.get("cache_dir"))
    if cfg.get("max_prompts"):
        rows = rows[: int(cfg.max_prompts)]
    summary = extract(model, tokenizer, rows, str(cfg.stats_dir), layers=_plain(cfg.get("layers")),
                      chat=bool(cfg.model.get("chat", False)), max_context=cfg.model.get("max_context"),
                      compress_question=bool(cfg.get("question_in_compression", True)),
                      progress=bool(cfg.get("progress", True)), model_name=str(cfg.model.get("name")))
    atomic_write_json(Path(str(cfg.output_dir)) / "extract_summary.json", summary)
    print(f"prompts: {summary['prompts']}  bytes: {summary['bytes']}  mean full-cache score: "
          f"{summary['mean_full_cache_score']}")
    print(f"bytes_per_prompt_per_1k_tokens: {summary['bytes_per_prompt_per_1k_tokens']:.0f} "
          f"(target: none; layers={len(summary['layers'])}, fp16 q/k/v)")
    return summary


def _main():
    import hydra

    @hydra.main(config_path="../configs", config_name="extract", version_base=None)
    def main(cfg):
        try:
            run(cfg)
        except (ExtractError, stats.ShardError) as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    main()


if __name__ == "__main__":
    _main()
