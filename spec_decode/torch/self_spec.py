"""Self-speculation for long prompts: the target drafts for itself through a compressed KV cache.

The draft is the target model with a policy-managed cache (a NAMM, H2O, StreamingLLM, ...: any
``namm.torch`` policy); the verifier is the same model with a full ``DynamicCache`` (the loop in
``speculative.py``). A draft step reads only the kept fraction of the KV cache, so when decoding is
bound by KV reads its cost ratio c is about the budget (TriForce, Sun et al. 2024; MagicDec, Chen
et al. 2024). Verification keeps it lossless whatever the policy evicts.

Rollback. ``NAMMLayer.crop(-n)`` can only remove tokens appended since the last policy update (an
update evicts and folds the new tokens into the policy state). So the draft never lets an update
see a speculative token: before drafting it feeds the committed tokens it has not seen (in chunks
ending at logical multiples of the chunk size, as the policy's own prefill does: an update fires
there exactly as in ``namm.torch.generate.greedy_generate``), then drafts at most until the next
update point (``room``). Rejected drafts are therefore always after the last update, and ``crop``
removes them together with their buffered queries; accepted drafts stay, exactly as if they had
been fed as committed tokens. Once per ``update_interval`` tokens a round drafts fewer tokens.

Refresh (``refresh_every=R``; TriForce re-builds its draft cache from the full one in the same spirit).
An evicted token is gone from the draft cache for good, but not from the verifier's: the loop gives the
verifier a full cache that also buffers its last ``refresh_window`` queries (``make_target_cache``), and
once at least R tokens were committed since the last refresh (``sync``, after a round's commit) the draft
cache is forked from it and the policy re-selects its budget from the attention of those recent verified
queries (``NAMMCache.reselect``: every token is new, no policy state carries over). Tokens the answer
needs that the prompt's own attention did not single out (a value looked up late in the answer) come back.
``fork_prefill``: the draft cache is not prefilled on its own either, but forked from the verifier's
prefill and selected by the attention of the prompt's last ``refresh_window`` queries (one prefill in
all, where the default computes the prompt twice).
``carry_state``: a refresh does not start the policy afresh from a few rows but continues it over the full
cache: the state of the previous update (the NAMM's EMA spectrogram, H2O's accumulated attention, kept for
every token before the eviction: ``NAMMLayer.full_state``; the first from the draft's own prefill when that
kept every token until its final update, else from the first refresh, made afresh) carries over, and the update
reads the verified queries since then, in whole blocks of ``policy.row_multiple`` (the NAMM's hop). So the
draft cache is, at every refresh, the budget the policy would keep had it run on the full cache all along
(the prompt's attention fading with the EMA, the answer's added), and a refresh rolls the draft back to the
last whole block (the few committed tokens after it are fed again, unscored, as between two updates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from namm.torch.cache import NAMMCache, RecentQueries, TorchPolicy
from namm.torch.generate import prefill
from namm.torch.policies import build_policy
from spec_decode.torch.speculative import DraftProposer


class SelfSpecProposer(DraftProposer):
    """The target ``model`` with a compressed cache from ``policy`` (a ``TorchPolicy`` or a config dict).

    ``policy.make_cache(model)`` switches ``model`` to the ``"namm"`` attention backend, which is
    exactly ``sdpa`` for any other cache: the verifier (a ``DynamicCache``) is unaffected.

    Invariant between rounds (as ``DraftProposer``, whose ``commit`` crops the rejected drafts): the
    cache holds a prefix of the committed ids, never the newest token, and no policy update has seen
    an uncommitted token.
    """

    def __init__(self, model, policy: TorchPolicy | Mapping, refresh_every: int | None = None,
                 refresh_window: int = 32, fork_prefill: bool = False, carry_state: bool = False):
        if refresh_every is not None and int(refresh_every) < 1:
            raise ValueError(f"refresh_every={refresh_every} must be >= 1 committed tokens (or None: never refresh)")
        if int(refresh_window) < 1:
            raise ValueError(f"refresh_window={refresh_window} must be >= 1 verified queries")
        self.model = model
        self.policy = build_policy(policy) if isinstance(policy, Mapping) else policy
        self.refresh_every = int(refresh_every) if refresh_every else None
        self.refresh_window = int(refresh_window)
        self.fork_prefill = bool(fork_prefill)
        self.carry_state = bool(carry_state)
        if self.carry_state and not self.refresh_every:
            raise ValueError("carry_state carries the policy state from one refresh to the next; set refresh_every")
        self.refreshes = 0
        self.calls = 0
        self.generator: torch.Generator | None = None
        self.kv_fractions: list[float] = []   # stored / seen of the draft cache at each round
        self.cache: NAMMCache | None = None

    def start(self, ids: list[int]) -> None:
        """Chunked prefill of everything but the newest token, evicting as the policy dictates; with
        ``fork_prefill`` nothing here: the first ``sync`` (right after this) forks the verifier's prefill."""
        self.cache = self.policy.make_cache(self.model)
        self.cache.record_state = self.carry_state
        self.fed: list[int] = []
        self.base = 0
        self.kv_fractions = []
        self.refreshed_at = -math.inf if self.fork_prefill else len(ids) - 1
        self.refreshes = 0
        if self.fork_prefill:
            return
        if len(ids) > 1:
            self._feed(ids[:-1])
            self.fed = list(ids[:-1])
        self.cache.end_prefill()

    @property
    def carried(self) -> list | None:
        """With ``carry_state``: what the next refresh carries, per layer the draft cache's last update's state
        over every token and that token count (``NAMMLayer.full_state``); None when there is none yet."""
        if not self.carry_state or self.cache is None:
            return None
        states = [layer.full_state for layer in self.cache.layers]
        return states if all(s is not None for s in states) else None

    def _feed(self, toks: list[int]) -> torch.Tensor:
        """Feed ``toks`` (q tokens) to the draft cache; returns the next-token logits ``[V]``."""
        device = next(self.model.parameters()).device
        return prefill(self.model, self.cache, torch.tensor([toks], device=device))[0]

    def room(self) -> int | float:
        """Tokens the draft may propose before a feed would trigger a policy update (inf: never)."""
        layer = self.cache.layers[0]
        interval = self.policy.update_interval
        if not interval or layer.frozen:
            return math.inf
        return interval - layer.seen % interval   # feeding room - 1 drafts keeps seen below the next multiple

    @torch.no_grad()
    def propose(self, ids, gamma, sampling):
        """Draft up to ``gamma`` tokens after ``ids``; returns (tokens, q ``[g, V]`` or None when greedy)."""
        self.base = len(self.fed)
        logits = self._feed(ids[len(self.fed):])          # committed tokens the draft has not seen yet
        self.fed = list(ids)
        self.calls += 1
        self.kv_fractions.append(self.kv_fraction)
        toks, qs = [], []
        for i in range(min(gamma, self.room())):
            if i:
                logits = self._feed(toks[-1:])            # a speculative token: rolled back by commit()
                self.fed.append(toks[-1])
                self.calls += 1
            if sampling.do_sample:
                q = sampling.probs(logits)
                toks.append(int(torch.multinomial(q, 1, generator=self.generator)))
                qs.append(q)
            else:
                toks.append(int(torch.argmax(logits)))
        return toks, (torch.stack(qs) if qs else None)

    def make_target_cache(self, target):
        """The verifier's cache (``speculative_generate`` asks for it): full, buffering the last verified
        queries when refreshing (a few more than ``refresh_window``: rejected drafts' queries are rolled
        back); None (a plain ``DynamicCache``) otherwise."""
        if not (self.refresh_every or self.fork_prefill):
            return None
        if target is not self.model:
            raise ValueError("a refreshed self-speculation draft is the target itself; pass the same model")
        window = self.refresh_window + 8
        if self.carry_state:   # the queries since the carried state: a refresh interval, a round, a partial block
            window = max(window, self.refresh_every + 2 * self.policy.row_multiple + 16)
        return RecentQueries(window).make_cache(target)

    def sync(self, ids: list[int], target_cache) -> None:
        """After ``start`` and after each round's commit: refresh the draft cache from ``target_cache`` (holding
        ``ids[:-1]``) when at least ``refresh_every`` tokens were committed since the last refresh, or fork
        the verifier's prefill (``fork_prefill``, first call)."""
        if self.refreshed_at > -math.inf and (
                not self.refresh_every or len(ids) - 1 - self.refreshed_at < self.refresh_every):
            return
        if target_cache.seen_tokens == 0:                 # a one-token prompt: nothing to fork yet
            self.refreshed_at = len(ids) - 1
            return
        upto, carried = len(ids) - 1, self.carried
        if carried is not None:                           # continue the policy from its last update, whole blocks
            n_old = carried[0][1]
            step = self.policy.row_multiple
            upto = n_old + (upto - n_old) // step * step
            if upto == n_old:
                return
        cache = target_cache.fork(self.model, self.policy)
        cache.record_state = self.carry_state
        if carried is not None:
            cache.reselect(carried=carried, upto=upto)
        else:
            cache.reselect(self.refresh_window)
        self.cache, self.fed = cache, list(ids[:upto])
        self.refreshes += self.refreshed_at > -math.inf     # the forked prefill is not a refresh
        self.refreshed_at = len(ids) - 1

    @property
    def kv_fraction(self) -> float:
        """Stored / seen tokens of the draft cache now (mean over layers)."""
        return self.cache.kv_fraction() if self.cache is not None else 1.0

    @property
    def mean_kv_fraction(self) -> float:
        """Mean over the rounds of the last generation of the fraction of the KV cache the draft reads."""
        return sum(self.kv_fractions) / len(self.kv_fractions) if self.kv_fractions else self.kv_fraction
