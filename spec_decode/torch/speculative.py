"""Our speculative decoding loop (Leviathan et al. 2023; Chen et al. 2023), batch size 1, lossless.

Each round the proposer (a draft model or an n-gram lookup) proposes gamma tokens d_1..d_gamma with
probabilities q_i; the target scores the gamma + 1 prefixes in one forward pass and

- greedy: accepts while d_i == argmax p_i and emits argmax p_n at the first mismatch;
- sampling: accepts d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection emits a
  token from norm(max(0, p_i - q_i)); if all gamma are accepted emits a bonus token from p_{gamma+1}.

Temperature / top-k / top-p apply to both p and q before the ratio. Both KV caches keep every
committed token except the newest one; rejected positions are rolled back with ``cache.crop(-n)``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Protocol

import torch
from transformers import DynamicCache

from namm.torch.generate import check_context
from spec_decode.torch.draft import DraftHandle


@dataclasses.dataclass
class SpecStats:
    """Counters of one or more generations; ``accepted[i] / proposed[i]`` is acceptance at draft position i."""

    proposed: list[int] = dataclasses.field(default_factory=list)
    accepted: list[int] = dataclasses.field(default_factory=list)
    rounds: int = 0               # target verification calls (after the prefill)
    new_tokens: int = 0
    draft_calls: int = 0          # draft forward passes
    draft_time: float = 0.0       # seconds inside the proposer
    target_time: float = 0.0      # seconds inside target forwards (prefill included)
    prefill_time: float = 0.0
    wall_time: float = 0.0
    gammas: list[int] = dataclasses.field(default_factory=list)

    def record(self, gamma: int, n_accepted: int) -> None:
        while len(self.proposed) < gamma:
            self.proposed.append(0)
            self.accepted.append(0)
        for i in range(gamma):
            self.proposed[i] += 1
            self.accepted[i] += i < n_accepted
        self.gammas.append(gamma)

    def merge(self, other: "SpecStats") -> "SpecStats":
        out = SpecStats()
        n = max(len(self.proposed), len(other.proposed))
        pad = lambda x: x + [0] * (n - len(x))  # noqa: E731
        out.proposed = [a + b for a, b in zip(pad(self.proposed), pad(other.proposed))]
        out.accepted = [a + b for a, b in zip(pad(self.accepted), pad(other.accepted))]
        for f in ("rounds", "new_tokens", "draft_calls", "draft_time", "target_time", "prefill_time", "wall_time"):
            setattr(out, f, getattr(self, f) + getattr(other, f))
        out.gammas = self.gammas + other.gammas
        return out

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens over all positions."""
        return sum(self.accepted) / max(sum(self.proposed), 1)

    @property
    def per_position(self) -> list[float]:
        return [a / p if p else float("nan") for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_call(self) -> float:
        """Block efficiency: new tokens per target verification call."""
        return self.new_tokens / max(self.rounds, 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("gammas")
        d.update(acceptance_rate=self.acceptance_rate, per_position=self.per_position,
                 tokens_per_call=self.tokens_per_call, mean_gamma=sum(self.gammas) / max(len(self.gammas), 1))
        return d


class Proposer(Protocol):
    """Proposes up to ``gamma`` tokens after ``ids``; ``q`` is ``[g, V]`` probabilities or None (one-hot).

    Optional: ``make_target_cache(target)`` returns the verifier's cache (None: a ``DynamicCache``), and
    ``sync(ids, target_cache)`` runs after every ``commit`` (timed as drafting), e.g. to re-select a
    compressed draft cache from the verifier's full one (``SelfSpecProposer(refresh_every=...)``).
    """

    def start(self, ids: list[int]) -> None: ...

    def propose(self, ids: list[int], gamma: int, sampling: "Sampling") -> tuple[list[int], torch.Tensor | None]: ...

    def commit(self, ids: list[int]) -> None: ...


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Greedy when ``do_sample`` is False; otherwise temperature / top-k / top-p on both models."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed next-token distribution ``[..., V]`` (fp32)."""
        x = logits.float() / max(self.temperature, 1e-6)
        if self.top_k:
            kth = torch.topk(x, min(self.top_k, x.shape[-1]), dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            s, idx = torch.sort(x, dim=-1, descending=True)
            cum = torch.softmax(s, -1).cumsum(-1)
            drop = cum - torch.softmax(s, -1) > self.top_p   # keep the smallest prefix reaching top_p
            x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        return torch.softmax(x, dim=-1)


class DraftProposer:
    """A draft model with its own KV cache (``DraftHandle``: the HF model and an optional reduced head).

    ``min_confidence``: stop drafting at the first position where the draft's top probability (of its
    processed distribution) is below this value, so a round proposes only what the draft is sure of and
    may propose nothing (then it is one plain decoding step). A draft-length rule of the draft's own
    distribution: the output stays exactly the target's.

    Invariant between rounds: the cache holds a prefix of the committed ids.
    """

    def __init__(self, draft: DraftHandle, min_confidence: float | None = None):
        if min_confidence is not None and not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence={min_confidence} must be a probability in [0, 1] (or None: off)")
        self.draft = draft
        self.min_confidence = min_confidence
        self.calls = 0
        self.generator: torch.Generator | None = None

    def start(self, ids: list[int]) -> None:
        self.cache = DynamicCache(config=self.draft.model.config)
        self.fed: list[int] = []             # tokens in the cache, in order
        self.base = 0
        if len(ids) > 1:                     # prefill everything but the newest token
            self.draft.next_logits(torch.tensor([ids[:-1]]), self.cache)
            self.fed = list(ids[:-1])

    @torch.no_grad()
    def propose(self, ids, gamma, sampling):
        toks, qs = [], []
        self.base = len(self.fed)
        pending = ids[len(self.fed):]
        for _ in range(gamma):
            logits = self.draft.next_logits(torch.tensor([pending]), self.cache)      # [V]
            self.calls += 1
            self.fed += pending
            q = sampling.probs(logits) if sampling.do_sample or self.min_confidence is not None else None
            if self.min_confidence is not None and float(q.max()) < self.min_confidence:
                break
            if sampling.do_sample:
                tok = int(torch.multinomial(q, 1, generator=self.generator))
                qs.append(q)
            else:
                tok = int(torch.argmax(logits))
            toks.append(tok)
            pending = [tok]
        return toks, (torch.stack(qs) if qs else None)

    def commit(self, ids: list[int]) -> None:
        """Roll the cache back to its longest prefix that agrees with ``ids`` minus the newest token."""
        keep = self.base
        limit = min(len(self.fed), len(ids) - 1)
        while keep < limit and self.fed[keep] == ids[keep]:
            keep += 1
        if len(self.fed) > keep:
            self.cache.crop(-(len(self.fed) - keep))
            del self.fed[keep:]


@torch.no_grad()
def speculative_generate(target, input_ids: torch.Tensor, proposer, max_new_tokens: int, gamma: int = 4,
                         sampling: Sampling = Sampling(), adaptive: bool = False, gamma_max: int = 8,
                         eos_token_id: int | list[int] | None = None, generator: torch.Generator | None = None,
                         stats: SpecStats | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Generate with ``proposer`` drafting for ``target``. input_ids [1, P] -> ([1, P + n], stats).

    ``adaptive``: gamma grows by one after a fully accepted round and shrinks by one after a rejection
    (bounded to [1, gamma_max]). Output equals ``target``'s own greedy decoding in greedy mode and is
    distributed exactly as the target's sampling distribution in sampling mode.
    """
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, prompt_len], got {tuple(input_ids.shape)}; batch size 1 only")
    if gamma < 0 or max_new_tokens < 1:
        raise ValueError(f"need gamma >= 0 and max_new_tokens >= 1, got gamma={gamma}, max_new_tokens={max_new_tokens}")
    check_context(target, input_ids.shape[1], max_new_tokens)
    stats = stats or SpecStats()
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    t_start = time.perf_counter()
    ids = input_ids[0].tolist()
    prompt_len = len(ids)
    make_cache = getattr(proposer, "make_target_cache", None)   # optional hooks (SelfSpecProposer's refresh)
    sync = getattr(proposer, "sync", None)
    cache = (make_cache(target) if make_cache else None) or DynamicCache(config=target.config)
    t0 = time.perf_counter()
    if prompt_len > 1:
        target(input_ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
    stats.prefill_time += time.perf_counter() - t0
    stats.target_time += time.perf_counter() - t0
    proposer.generator = generator
    t0 = time.perf_counter()
    proposer.start(ids)
    if sync is not None:
        sync(ids, cache)
    stats.prefill_time += time.perf_counter() - t0
    g = gamma
    while len(ids) - prompt_len < max_new_tokens:
        g_now = min(g, max_new_tokens - (len(ids) - prompt_len) - 1)
        t0 = time.perf_counter()
        draft, q = proposer.propose(ids, g_now, sampling) if g_now > 0 else ([], None)
        stats.draft_time += time.perf_counter() - t0
        g_now = len(draft)
        t0 = time.perf_counter()
        logits = target(torch.tensor([[ids[-1]] + draft]), past_key_values=cache, use_cache=True).logits[0]  # [g+1, V]
        stats.target_time += time.perf_counter() - t0
        stats.rounds += 1
        n, tok = _verify(logits, draft, q, sampling, generator)
        stats.record(g_now, n)
        new = draft[:n] + [tok]
        cache.crop(-(g_now - n))        # drop the rejected drafts; the emitted token is fed next round
        ids += new
        stats.new_tokens += len(new)
        proposer.commit(ids)
        if sync is not None:
            t0 = time.perf_counter()
            sync(ids, cache)              # the proposer may read the verifier's cache (it holds ids[:-1])
            stats.draft_time += time.perf_counter() - t0
        if adaptive and g_now > 0:
            g = min(g + 1, gamma_max) if n == g_now else max(g - 1, 1)
        if eos & set(new):
            cut = next(i for i, t in enumerate(ids[prompt_len:]) if t in eos)
            stats.new_tokens -= len(ids) - (prompt_len + cut + 1)
            ids = ids[: prompt_len + cut + 1]
            break
    extra = len(ids) - prompt_len - max_new_tokens
    if extra > 0:
        ids = ids[:-extra]
        stats.new_tokens -= extra
    stats.draft_calls += getattr(proposer, "calls", 0)
    if hasattr(proposer, "calls"):
        proposer.calls = 0
    stats.wall_time += time.perf_counter() - t_start
    return torch.tensor([ids]), stats


def _verify(logits, draft, q, sampling: Sampling, generator) -> tuple[int, int]:
    """Number of accepted drafts ``n`` and the token emitted after them (correction or bonus)."""
    g = len(draft)
    if not sampling.do_sample:
        best = torch.argmax(logits, dim=-1).tolist()         # [g+1]
        n = 0
        while n < g and draft[n] == best[n]:
            n += 1
        return n, best[n]
    p = sampling.probs(logits)                                # [g+1, V]
    for i, x in enumerate(draft):
        qx = 1.0 if q is None else float(q[i, x])             # q None: deterministic (one-hot) proposal
        px = float(p[i, x])
        if float(torch.rand((), generator=generator)) < min(1.0, px / max(qx, 1e-30)):
            continue
        if q is None:
            resid = p[i].clone()
            resid[x] = 0.0                                    # max(0, p - onehot(x))
        else:
            resid = torch.clamp(p[i] - q[i], min=0.0)         # max(0, p - q)
        if float(resid.sum()) <= 0:                           # p == q: any sample of p is exact
            resid = p[i]
        return i, int(torch.multinomial(resid / resid.sum(), 1, generator=generator))
    return g, int(torch.multinomial(p[g], 1, generator=generator))   # bonus token from p_{gamma+1}


@torch.no_grad()
def autoregressive_generate(model, input_ids: torch.Tensor, max_new_tokens: int, sampling: Sampling = Sampling(),
                            eos_token_id=None, generator: torch.Generator | None = None) -> tuple[torch.Tensor, SpecStats]:
    """Target-only decoding with the same loop overheads (the speedup baseline): one call per token."""
    check_context(model, input_ids.shape[1], max_new_tokens)
    stats = SpecStats()
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    t_start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    ids = input_ids[0].tolist()
    prompt_len = len(ids)
    t0 = time.perf_counter()
    logits = model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    stats.prefill_time = time.perf_counter() - t0
    while True:
        tok = int(torch.multinomial(sampling.probs(logits), 1, generator=generator)) if sampling.do_sample \
            else int(torch.argmax(logits))
        ids.append(tok)
        stats.new_tokens += 1
        if len(ids) - prompt_len >= max_new_tokens or tok in eos:
            break
        t0 = time.perf_counter()
        logits = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
        stats.target_time += time.perf_counter() - t0
        stats.rounds += 1
    stats.target_time += stats.prefill_time
    stats.wall_time = time.perf_counter() - t_start
    return torch.tensor([ids]), stats
