"""A thin wrapper over transformers' assisted generation and prompt lookup, with per-step acceptance.

transformers reads the draft length from the *draft's* generation_config (``num_assistant_tokens``,
schedule, ``assistant_confidence_threshold``); we set a constant length and threshold 0. The number
of accepted tokens per step is recorded by wrapping the candidate generator's
``update_candidate_strategy(input_ids, scores, num_matches)`` for the duration of one call.
"""

from __future__ import annotations

import time

import torch

from namm.torch.generate import check_context
from spec_decode.torch.draft import check_compatible
from spec_decode.torch.speculative import SpecStats


def _recording(target, stats: SpecStats, gamma: int):
    original = target._get_candidate_generator

    def wrapped(*args, **kwargs):
        gen = original(*args, **kwargs)
        update = gen.update_candidate_strategy

        def record(input_ids, scores, num_matches):
            g = min(gamma, scores.shape[1] - 1) if scores is not None else gamma
            stats.record(g, int(num_matches))
            stats.rounds += 1
            return update(input_ids, scores, num_matches)

        gen.update_candidate_strategy = record
        return gen

    return original, wrapped


@torch.no_grad()
def hf_generate(target, input_ids: torch.Tensor, max_new_tokens: int, *, draft=None, draft_length: int = 4,
                prompt_lookup: int | None = None, do_sample: bool = False, eos_token_id=None,
                **gen_kwargs) -> tuple[torch.Tensor, SpecStats]:
    """``target.generate`` with ``assistant_model=draft`` (or ``prompt_lookup_num_tokens``), greedy by default."""
    check_context(target, input_ids.shape[1], max_new_tokens)
    stats = SpecStats()
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos_token_id,
                  pad_token_id=eos_token_id if isinstance(eos_token_id, int) else None, **gen_kwargs)
    if draft is not None:
        check_compatible(target, draft)
        gc = draft.generation_config
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = draft_length, "constant"
        gc.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = draft
        gamma = draft_length
    elif prompt_lookup is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup
        gamma = prompt_lookup
    else:
        gamma = 0
    original, wrapped = _recording(target, stats, gamma)
    target._get_candidate_generator = wrapped
    t0 = time.perf_counter()
    try:
        out = target.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    finally:
        del target._get_candidate_generator   # back to the class method
    stats.wall_time = time.perf_counter() - t0
    stats.new_tokens = out.shape[1] - input_ids.shape[1]
    if gamma == 0:
        stats.rounds = stats.new_tokens
    return out, stats
