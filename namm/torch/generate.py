"""Greedy decoding through a policy-managed cache, with chunked prefill and explicit positions.

The prompt is split at logical multiples of the policy's chunk size (default 128) and fed with
explicit ``position_ids``; evictions happen inside the cache at logical multiples of the update
interval. With ``compress_question=False`` the question is appended after the compressed context
and never evicted (kvpress protocol); with True it goes through compression like the context
(LongBench / paper protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from namm.torch.cache import FullPolicy, NAMMCache, TorchPolicy

DEFAULT_CHUNK = 128


@dataclass
class GenerationOutput:
    """token_ids: generated tokens only. kv_fraction_*: mean over layers of stored / seen tokens."""

    token_ids: list[int]
    kv_fraction_prefill: float
    kv_fraction_decode: float
    stored_tokens: list[int] = field(default_factory=list)
    seen_tokens: int = 0
    kv_bytes_peak: int = 0
    prefill_tokens: int = 0


def _forward(model, cache: NAMMCache, ids: torch.Tensor) -> torch.Tensor:
    """One forward of ``ids [1, q]`` at the cache's logical offset; returns logits ``[1, vocab]`` of the last token."""
    start = cache.seen_tokens
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
    out = model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1]


def prefill(model, cache: NAMMCache, ids: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Feed ``ids [1, T]`` in chunks ending at logical multiples of ``chunk_size``; returns the last logits."""
    chunk = chunk_size or cache.chunk_size or DEFAULT_CHUNK
    cache.explicit_prefill = True  # a last chunk of one token is still prefill: the caller calls end_prefill
    total = ids.shape[1]
    pos, logits = 0, None
    while pos < total:
        logical = cache.seen_tokens
        stop = min(total, pos + chunk - (logical % chunk))
        logits = _forward(model, cache, ids[:, pos:stop])
        pos = stop
    return logits


class ContextLengthError(ValueError):
    """A prompt plus ``max_new_tokens`` that does not fit the model's context."""


def model_context(model) -> int | None:
    """The model's context in tokens (``max_position_embeddings`` of its decoder config), or None if unknown."""
    config = model.config
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if n else None


def check_context(model, prompt_tokens: int, max_new_tokens: int, where: str = "") -> None:
    """Raise a one-line :class:`ContextLengthError` when ``prompt_tokens + max_new_tokens`` exceeds the model's
    context, naming the three numbers and the fix."""
    ctx = model_context(model)
    if ctx is None or prompt_tokens + max_new_tokens <= ctx:
        return
    fixes = [f"truncate the prompt to {ctx - max_new_tokens} tokens" if ctx > max_new_tokens else None,
             f"lower max_new_tokens to {ctx - prompt_tokens}" if ctx > prompt_tokens else None,
             "or set model.max_context (evaluation truncates each prompt to max_context - max_new_tokens)"]
    raise ContextLengthError(
        f"{where + ': ' if where else ''}a prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} = "
        f"{prompt_tokens + max_new_tokens} tokens exceeds the model's context of {ctx} tokens "
        f"(max_position_embeddings); {', '.join(f for f in fixes if f)}")


def _check_ids(name: str, ids) -> torch.Tensor | None:
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"{name} must be a LongTensor of shape [1, T]; got {getattr(ids, 'shape', type(ids))}")
    return ids.long()


@torch.no_grad()
def greedy_generate(
    model,
    context_ids: torch.Tensor,
    question_ids: torch.Tensor | None,
    max_new_tokens: int,
    policy: TorchPolicy | None = None,
    eos_token_ids=None,
    compress_question: bool = True,
    stop_strings=None,
    tokenizer=None,
) -> GenerationOutput:
    """Greedy decoding of ``context_ids [1, Tc]`` (+ ``question_ids [1, Tq]``) under ``policy`` (None: full cache)."""
    context_ids = _check_ids("context_ids", context_ids)
    question_ids = _check_ids("question_ids", question_ids)
    if context_ids.shape[1] == 0 and (question_ids is None or question_ids.shape[1] == 0):
        raise ValueError("the prompt is empty; pass at least one context or question token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs the tokenizer; pass tokenizer=...")
    check_context(model, context_ids.shape[1] + (0 if question_ids is None else question_ids.shape[1]), max_new_tokens)
    if isinstance(eos_token_ids, int):
        eos_token_ids = [eos_token_ids]
    eos = set(eos_token_ids or [])
    device = next(model.parameters()).device
    context_ids = context_ids.to(device)
    policy = policy or FullPolicy()
    cache = policy.make_cache(model)

    if question_ids is not None and question_ids.shape[1] > 0 and compress_question:
        logits = prefill(model, cache, torch.cat([context_ids, question_ids.to(device)], dim=1))
        cache.end_prefill()
    else:
        logits = prefill(model, cache, context_ids) if context_ids.shape[1] else None
        cache.end_prefill()
        if question_ids is not None and question_ids.shape[1] > 0:
            cache.freeze()
            logits = prefill(model, cache, question_ids.to(device))
    kv_prefill = cache.kv_fraction()
    prefill_tokens = cache.seen_tokens

    tokens: list[int] = []
    decode_fractions: list[float] = []
    while True:
        token = int(logits.argmax(-1).item())
        tokens.append(token)
        if token in eos or len(tokens) >= max_new_tokens:
            break
        if stop_strings and any(s in tokenizer.decode(tokens) for s in stop_strings):
            break
        logits = _forward(model, cache, torch.tensor([[token]], device=device))
        decode_fractions.append(cache.kv_fraction())
    kv_decode = sum(decode_fractions) / len(decode_fractions) if decode_fractions else kv_prefill
    return GenerationOutput(
        token_ids=tokens,
        kv_fraction_prefill=kv_prefill,
        kv_fraction_decode=kv_decode,
        stored_tokens=cache.stored_tokens(),
        seen_tokens=cache.seen_tokens,
        kv_bytes_peak=cache.peak_bytes,
        prefill_tokens=prefill_tokens,
    )
