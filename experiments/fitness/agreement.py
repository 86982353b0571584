"""The ``agreement`` fitness: how faithfully the model with a compressed cache reproduces the full cache.

    fit = AgreementFitness(model, tokenizer, rows, namm_cfg, norm, chat=False, max_context=8192, budget=0.5)
    fit.evaluate(population [P, D], items [B]) -> [P]

Schedule: the runtime's ``NAMMPolicy(budget=b, update_interval=0, final_update=True)`` - the prompt is
prefilled with the full cache and the policy evicts once, at the end of the prefill, from the attention
of every prompt query (the regime of SnapKV-style prompt compression). Everything before that eviction
is the same for every candidate, so per prompt it is computed once and shared by the population: the
prefilled cache, each layer's NAMM features, the full-cache greedy answer and the full-cache next-token
distributions along it. Per candidate only the scoring network, the cap, the eviction (the runtime's own
``NAMMPolicy.select_tokens`` / ``decision`` and ``NAMMLayer.apply``) and one forward of the answer through the
compressed cache remain.

Measure of a prompt: the mean, over the answer positions whose prediction reads the evicted cache, of
``sum_v min(p_full(v), p_cache(v))`` - the acceptance rate of the compressed-cache model as a speculative
draft of the full-cache one (Leviathan et al. 2023, eq. 3's alpha), 1.0 when every distribution is
reproduced. Greedy decoding reproduces the full cache's answer, and so its task score, while every argmax
is reproduced (reported as ``token_match``). With the question inside compression (default) the first
answer token comes from the prefill logits, before the eviction, and is not scored. Fitness: the
unweighted mean over tasks of the mean over the task's prompts.

Target (``target``): ``full`` (default) measures against the full cache's own greedy answer, as above;
``gold`` against the row's reference answer instead (its first, tokenised as the prompt's continuation, at most
``max_answer_tokens``): the reference is fed through the compressed cache and each scored position's target is
the one-hot of the next reference token, so the measure reads the mean probability the compressed-cache model
gives the reference (and ``token_match`` its teacher-forced accuracy). The full-cache answer rewards
reproducing a wrong answer as much as a right one; the reference rewards what the task metric grades. Its
first token, like the full answer's, comes from the prefill logits and is not scored. The prompt store is
shared by both targets (a prompt is stored under its full-cache answer; the reference tail replaces it on
loading), so ``gold`` still computes the full-cache answer of a prompt the store lacks. No refresh.

Refresh (``refresh_every=R``, ``refresh_window=W``): the draft cache of refreshed self-speculation
(``spec_decode.torch.self_spec.SelfSpecProposer`` with the same keys). After every R answer tokens the
compressed cache is re-selected from the full cache (prompt and answer so far) by the policy, from the
attention of the last W full-cache queries alone (``NAMMCache.reselect(W)``: every token new, no state
carried), and the next R answer tokens are fed through it. The full cache, and each refresh's NAMM
features, are again the same for every candidate and computed once per prompt; per candidate, one
eviction and one forward of R tokens per refresh. The runtime refreshes once at least R tokens were
committed since the last refresh, at the end of a verification round; here every R tokens exactly.

Population-batched (``batched``, the default without a refresh): the candidates of a generation are
evaluated together, ``pop_chunk`` at a time (``namm.torch.population``): one batched scoring network over
the shared features (parameters stacked along a population axis), the runtime's selection per candidate as
a keep mask over the shared prefilled keys and values (nothing gathered or copied), and one forward of the
answer for all of them through a ``PopulationCache`` (the registered attention masks each candidate's
evicted slots per KV head and appends the candidate's own answer keys and values). The same measure as the
unbatched path (the reference, ``batched=False``), equal within fp32 rounding (tested). A refresh is served
by the unbatched path only: ``batched=None`` falls back to it, ``batched=True`` refuses.

Precision (``precision``, batched path only): ``fp32`` (default) as above. ``bf16`` runs the two heavy
per-candidate stages in bfloat16 - BAM's backward attention (its GEMMs and softmax; the queries, the output
projection and the accumulation stay fp32) and the answer forward (a bf16 copy of the model over the shared
keys and values cast to bf16; logits, log-sum-exps and the measure in fp32) - which on a CPU with bf16
matrix units (AMX) runs several times faster. The prompt's shared state (prefill, features, full-cache
distributions) stays fp32. Fitness then differs from the fp32 path: a score near the selection threshold
can swap a token, and the bf16 answer forward's noisier logits lower the probability of the target token on
average, so bf16 reads lower than fp32 (up to 0.03 per candidate on the bench's 1K prompts,
``python -m experiments.bench.fitness``; 0.041 on the gold stage's held-out prompts of 1K-1.5K tokens for one
policy, 0.6257 against 0.6666). Candidates keep their order (Spearman 0.998 on the bench), but compare bf16
fitness values only with bf16 ones.

Prompt store (``store_dir``): the shared state of every prompt is written once, atomically, to
``<store_dir>/<key>.safetensors`` (the prefilled keys, values and positions, the features, the tail and the
full-cache distributions; about 55 MB per 1K tokens in float32) and read back from there on every later visit,
by this run, a resumed one or another stage: a prompt is prefilled once per model, NAMM feature setting and
normalisation, not once per process. The key hashes all of these (the model's weights included), so a stale
file is never read. The first visit also uses the stored copy, so a resumed run computes the same numbers as
an uninterrupted one. Without a refresh only (a refresh's full cache stays in memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from namm.config import NAMMConfig
from namm.shards import atomic_write_json

log = logging.getLogger(__name__)


TARGETS = ("full", "gold")   # what the answer positions are measured against (module docstring)
PRECISIONS = ("fp32", "bf16")  # what the batched path's scorer and answer forward run in (module docstring)


class AgreementFitnessError(ValueError):
    """A bad ``fitness=agreement`` setting."""


@dataclass
class _Shared:
    """Candidate-independent state of one prompt (see the module docstring)."""

    cache: object               # NAMMCache after the prefill, before any eviction
    features: list              # per layer: (features [1, H, S, F], positions [1, H, S], valid or None, seen)
    tail: object                # LongTensor [1, n]: tokens fed after the eviction
    scored: slice               # tail positions whose logits predict an answer token
    p_full: object              # [m, V] full-cache next-token distributions at those positions
    full: object = None         # with a refresh: NAMMCache of the prompt and the whole tail, every token kept,
                                # buffering the queries of the tail and of the prompt's last refresh_window tokens
    refreshes: tuple = ()       # with a refresh: per refresh, (tail index it starts at, the full cache up to it,
                                # its features per layer as ``features``)


def acceptance(p_full, logits):
    """``(mean_t sum_v min(p_full, softmax(logits)), fraction of argmax(logits) == argmax(p_full))``.

    logits ``[m, V]`` -> two floats; ``[P, m, V]`` (a population's) -> two float64 arrays ``[P]``, the same
    numbers candidate by candidate (computed one candidate at a time: its ``[m, V]`` stays in cache). The
    softmax and the minimum run in fp32 (float64 exps over the vocabulary cost ~10x), the sums accumulate in
    float64."""
    if p_full.shape[0] == 0:
        return (1.0, 1.0) if logits.ndim == 2 else (np.ones(len(logits)), np.ones(len(logits)))
    if logits.ndim == 2:
        return _acceptance(p_full, p_full.argmax(-1), logits)
    p32, target = p_full.float(), p_full.argmax(-1)
    pairs = [_acceptance(p32, target, one) for one in logits]
    return np.array([a for a, _ in pairs]), np.array([m for _, m in pairs])


def _acceptance(p_full, target, logits) -> tuple[float, float]:
    import torch

    q = torch.softmax(logits.float(), -1)
    match = (q.argmax(-1) == target).double().mean()
    acc = torch.minimum(q, p_full.to(q.dtype), out=q).sum(-1, dtype=torch.float64).mean()
    return float(acc), float(match)


class AgreementFitness:
    def __init__(self, model, tokenizer, rows: Sequence[Mapping], namm_cfg: NAMMConfig, norm, *, chat: bool,
                 max_context: int | None, budget, compress_question: bool = True, max_answer_tokens: int | None = None,
                 cache_prompts: bool = True, answers_path: str | Path | None = None,
                 templates: Mapping[str, str] | None = None, progress: bool = False,
                 refresh_every: int | None = None, refresh_window: int = 16, batched: bool | None = None,
                 pop_chunk: int = 16, store_dir: str | Path | None = None, target: str = "full",
                 precision: str = "fp32"):
        from experiments.extract import eos_ids
        from experiments.tasks import build_prompts
        from namm.torch.selection import budget_tokens

        if not rows:
            raise AgreementFitnessError("agreement fitness: no prompts; check task=... and split=...")
        if budget is None:
            raise AgreementFitnessError("fitness=agreement needs fitness.policy_budget (the cache kept after the "
                                        "prefill: a fraction of the prompt like 0.5, or a token count)")
        try:
            budget_tokens(budget, 1)
        except (TypeError, ValueError) as e:
            raise AgreementFitnessError(f"fitness.policy_budget={budget!r}: {e}") from None
        if max_answer_tokens is not None and int(max_answer_tokens) < 1:
            raise AgreementFitnessError(f"fitness.max_answer_tokens={max_answer_tokens}; use null or an int >= 1")
        if refresh_every is not None and (isinstance(refresh_every, bool) or not isinstance(refresh_every, int)
                                          or refresh_every < 1):
            raise AgreementFitnessError(f"fitness.refresh_every={refresh_every!r}; use null (no refresh) or an int "
                                        ">= 1 (answer tokens between two refreshes)")
        if isinstance(refresh_window, bool) or not isinstance(refresh_window, int) or refresh_window < 1:
            raise AgreementFitnessError(f"fitness.refresh_window={refresh_window!r}; use an int >= 1 (the full "
                                        "cache's last queries a refresh reads)")
        self.refresh_every, self.refresh_window = refresh_every, refresh_window
        if target not in TARGETS:
            raise AgreementFitnessError(f"fitness.target={target!r}; use full (reproduce the full-cache answer) or "
                                        "gold (predict the reference answer)")
        if target == "gold" and refresh_every is not None:
            raise AgreementFitnessError(f"fitness.target=gold serves no refresh (fitness.refresh_every="
                                        f"{refresh_every}: a refresh re-selects along the full-cache answer); set "
                                        "refresh_every: null or target: full")
        self.target = target
        if batched is not None and not isinstance(batched, bool):
            raise AgreementFitnessError(f"fitness.batched={batched!r}; use null (batched unless refresh_every is "
                                        "set), true or false")
        if batched and refresh_every is not None:
            raise AgreementFitnessError(f"fitness.batched=true cannot serve fitness.refresh_every={refresh_every} "
                                        "(refreshes run on the unbatched path); set batched: null or false")
        if isinstance(pop_chunk, bool) or not isinstance(pop_chunk, int) or pop_chunk < 1:
            raise AgreementFitnessError(f"fitness.pop_chunk={pop_chunk!r}; use an int >= 1 (candidates run "
                                        "together in one batched forward)")
        self.batched = refresh_every is None if batched is None else batched
        if batched is None and refresh_every is not None:
            log.info("fitness.refresh_every=%d: candidates are evaluated one at a time (the population-batched "
                     "path serves no refresh)", refresh_every)
        self.pop_chunk = pop_chunk
        if precision not in PRECISIONS:
            raise AgreementFitnessError(f"fitness.precision={precision!r}; use fp32 or bf16 (the batched path's "
                                        "scorer and answer forward in bfloat16)")
        if precision != "fp32" and not self.batched:
            raise AgreementFitnessError(f"fitness.precision={precision} serves the batched path only (candidates "
                                        "one at a time are the fp32 reference); set precision: fp32 or batched: "
                                        "null/true without refresh_every")
        self.precision = precision
        self._low_model = None
        if store_dir is not None and refresh_every is not None:
            raise AgreementFitnessError(f"fitness.store_dir serves no refresh (fitness.refresh_every="
                                        f"{refresh_every}); set store_dir: null")
        self.store_dir = None if store_dir is None else Path(store_dir)
        self._weights_hash: str | None = None
        self.timings: dict[str, float] = defaultdict(float)   # seconds per stage, accumulated (bench.fitness)
        self.model, self.tokenizer, self.rows = model, tokenizer, list(rows)
        self.namm_cfg, self.budget = namm_cfg, budget
        self.norm = None if norm is None else tuple(np.asarray(x, np.float32) for x in norm)
        self.prompts = build_prompts(self.rows, tokenizer, chat, max_context, templates)
        self.compress_question = bool(compress_question)
        self.max_answer_tokens = None if max_answer_tokens is None else int(max_answer_tokens)
        self.cache_prompts = bool(cache_prompts)
        self.eos = eos_ids(model, tokenizer)
        self.progress = progress
        self.last_details: dict = {}
        self._shared: dict[int, _Shared] = {}
        self.answers_path = Path(answers_path) if answers_path else None
        self._answers: dict[str, list[int]] = {}
        if self.answers_path and self.answers_path.exists():
            self._answers = json.loads(self.answers_path.read_text())

    @property
    def num_items(self) -> int:
        return len(self.rows)

    # --- the runtime policy of a candidate ---------------------------------------------------------
    def policy_for(self, flat):
        """The candidate as the runtime runs it: ``NAMMPolicy`` with this fitness' budget and schedule."""
        from namm.torch.policy import NAMMPolicy

        return NAMMPolicy.from_flat(np.array(flat, np.float32), self.namm_cfg, self.norm, budget=self.budget,
                                    update_interval=0, final_update=True)

    # --- per prompt, once --------------------------------------------------------------------------
    def _split(self, i: int):
        """(tokens compressed, tokens fed after the eviction before the answer) of prompt ``i``."""
        p = self.prompts[i]
        if self.compress_question or not p.question_ids:
            return list(p.context_ids) + list(p.question_ids), []
        return list(p.context_ids), list(p.question_ids)

    def _answer(self, i: int) -> list[int]:
        """The full-cache greedy answer (the task's stop strings, EOS and token limit); kept in ``answers_path``."""
        from experiments.extract import generate_answer
        from experiments.tasks import get_spec

        spec = get_spec(self.rows[i]["dataset"])
        n = spec.max_new_tokens if self.max_answer_tokens is None else min(spec.max_new_tokens, self.max_answer_tokens)
        key = f"{self.rows[i]['dataset']}/{self.rows[i]['_id']}/{n}/{int(self.compress_question)}"
        if key not in self._answers:
            _, out = generate_answer(self.model, self.tokenizer, self.prompts[i], spec, n, eos_token_ids=self.eos,
                                     compress_question=self.compress_question)
            self._answers[key] = list(out.token_ids)
            if self.answers_path:   # merged with what another process (prepare_store) wrote meanwhile
                on_disk = json.loads(self.answers_path.read_text()) if self.answers_path.exists() else {}
                self._answers = {**on_disk, **self._answers}
                atomic_write_json(self.answers_path, self._answers)
        return list(self._answers[key])

    def _tap(self):
        """A NAMM that records the candidates' features at its update (into ``.recorded``) and keeps every token."""
        from namm.torch.cache import PolicyUpdate
        from namm.torch.policy import NAMMPolicy

        class Tap(NAMMPolicy):
            def update(self, state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
                feats, _, _, _ = self.features(state, rows, positions, valid, n_new)
                self.recorded[layer_idx] = (feats, positions, valid, seen)
                return PolicyUpdate(state={})  # the candidates evict once: no state to carry

        tap = Tap.untrained(self.namm_cfg, self.norm, update_interval=0, final_update=True)
        tap.recorded = {}
        return tap

    def _refresh_points(self, n_after: int, n_tail: int) -> list[int]:
        """Tail indices where a refresh starts: every ``refresh_every`` answer tokens (the tail's first ``n_after``
        are the question fed after the eviction), before the tail's end."""
        if not self.refresh_every:
            return []
        return list(range(n_after + self.refresh_every, n_tail, self.refresh_every))

    def _full_upto(self, full, n_tail: int, j: int, policy):
        """``full`` forked with ``policy``, rolled back to its first ``j`` tail tokens and re-selected from the
        attention of the last ``refresh_window`` queries (``NAMMCache.reselect``, as a refresh does it)."""
        import torch

        cache = full.fork(self.model, policy)
        with torch.no_grad():
            cache.reselect(self.refresh_window, upto=full.seen_tokens - n_tail + j)
        return cache

    def _prepare(self, i: int) -> _Shared:
        """The shared state of prompt ``i`` (kept in memory with ``cache_prompts``), its tail the target's."""
        if i in self._shared:
            return self._shared[i]
        shared = self._prepare_full(i)
        if self.target == "gold":
            shared = self._gold(i, shared)
        if self.cache_prompts:
            self._shared[i] = shared
        return shared

    def _gold_ids(self, i: int) -> list[int]:
        """The row's first reference answer, tokenised as the continuation of the prompt (a space first where the
        prompt ends in none and the answer starts with none), at most the task's token limit / max_answer_tokens."""
        from experiments.tasks import get_spec

        row, p = self.rows[i], self.prompts[i]
        answers = row.get("answers") or []
        if not answers or not str(answers[0]):
            raise AgreementFitnessError(f"fitness.target=gold: prompt {row['dataset']}/{row['_id']} has no reference "
                                        "answer; use fitness.target=full or tasks with answers")
        text = str(answers[0])
        if not text[0].isspace() and not self.tokenizer.decode(p.ids[-1:])[-1:].isspace():
            text = " " + text
        spec = get_spec(row["dataset"])
        n = spec.max_new_tokens if self.max_answer_tokens is None else min(spec.max_new_tokens, self.max_answer_tokens)
        return self.tokenizer.encode(text, add_special_tokens=False)[:n]

    def _gold(self, i: int, shared: _Shared) -> _Shared:
        """``shared`` with the reference answer as its tail: the target distribution of every scored position is
        the one-hot of the next reference token, so the acceptance measure reads p_cache(reference token)."""
        import torch

        _, after = self._split(i)
        seq = after + self._gold_ids(i)
        tail = torch.tensor([seq[:-1]], dtype=torch.long, device=shared.tail.device)
        scored = slice(len(after) - 1 if after else 0, tail.shape[1])
        targets = torch.tensor(seq[scored.start + 1:], dtype=torch.long, device=tail.device)
        p_gold = torch.zeros(len(targets), shared.p_full.shape[-1], dtype=torch.float64, device=tail.device)
        p_gold[torch.arange(len(targets)), targets] = 1.0
        return replace(shared, tail=tail, scored=scored, p_full=p_gold)

    def _prepare_full(self, i: int) -> _Shared:
        """The shared state of prompt ``i`` with the full-cache answer as its tail: from the store, or computed."""
        import torch

        from namm.torch.cache import FullPolicy, RecentQueries
        from namm.torch.generate import prefill

        device = next(self.model.parameters()).device
        compressed, after = self._split(i)
        if not compressed:
            raise AgreementFitnessError(f"prompt {self.rows[i]['dataset']}/{self.rows[i]['_id']} has no context")
        answer = self._answer(i)
        tail = torch.tensor([after + answer[:-1]], dtype=torch.long, device=device)
        scored = slice(len(after) - 1 if after else 0, tail.shape[1])
        points = self._refresh_points(len(after), tail.shape[1])
        path = None
        if self.store_dir is not None:
            path = self.store_dir / f"{self._store_key(compressed, tail, scored)}.safetensors"
            if path.exists():
                return self._load_shared(path, device)
        tap = self._tap()
        cache = tap.make_cache(self.model)
        with torch.no_grad():
            t0 = time.perf_counter()
            prefill(self.model, cache, torch.tensor([compressed], dtype=torch.long, device=device))
            # the full cache the tail runs through; with a refresh it buffers the queries the refreshes read
            full = cache.fork(self.model, RecentQueries(self.refresh_window + tail.shape[1]) if points
                              else FullPolicy())
            t1 = time.perf_counter()
            cache.end_prefill()
            self.timings["prefill"] += t1 - t0
            self.timings["features"] += time.perf_counter() - t1
        if len(tap.recorded) != len(cache.layers):
            raise AgreementFitnessError(f"the prompt has {len(compressed)} tokens; the features need at least "
                                        f"{self.namm_cfg.features.hop}")
        features = [tap.recorded[k] for k in range(len(cache.layers))]
        t0 = time.perf_counter()
        p_full = torch.softmax(self._tail_logits(full, tail, scored).double(), -1)
        self.timings["reference"] += time.perf_counter() - t0
        refreshes = []
        for j in points:
            rtap = self._tap()
            snap = self._full_upto(full, tail.shape[1], j, rtap)
            refreshes.append((j, snap, [rtap.recorded[k] for k in range(len(snap.layers))]))
        shared = _Shared(cache=cache, features=features, tail=tail, scored=scored, p_full=p_full,
                         full=full if points else None, refreshes=tuple(refreshes))
        for layer in cache.layers:  # the buffered queries are not needed any more
            layer.queries = []
        if path is not None:    # every visit, the first included, runs on the stored copy (bit-identical runs)
            self._save_shared(path, shared)
            shared = self._load_shared(path, device)
        return shared

    def prepare(self, items: Sequence[int], desc: str = "prompt store") -> int:
        """Compute and store the shared state of ``items`` not yet in the store (``store_dir`` needed); returns how
        many were computed. Another process can fill the store while training reads it."""
        from tqdm import tqdm

        if self.store_dir is None:
            raise AgreementFitnessError("preparing the prompt store needs fitness.store_dir (a folder)")
        before = self.timings["prefill"]
        done = 0
        for i in tqdm(list(items), desc=desc, disable=not self.progress, file=sys.stderr):
            self._prepare(int(i))
            self._shared.pop(int(i), None)
            done += self.timings["prefill"] > before
            before = self.timings["prefill"]
        return done

    # --- the prompt store (module docstring) ------------------------------------------------------
    _STORE_FORMAT = "namm-agreement-prompt/1"
    _LAYER_SCALARS = ("seen", "last_update_seen", "scaling", "frozen", "prefill_closed", "last_q_len", "num_updates")

    def _store_key(self, compressed, tail, scored) -> str:
        """Hash of everything the shared state of a prompt depends on."""
        import torch

        from experiments.lib.models import model_signature

        if self._weights_hash is None:
            h = hashlib.sha256()
            for name, p in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(str(p.dtype).encode())
                h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
            self._weights_hash = h.hexdigest()
        norm = None if self.norm is None else [hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()
                                               for x in self.norm]
        key = {"format": self._STORE_FORMAT, "model": model_signature(self.model), "weights": self._weights_hash,
               "compressed": list(map(int, compressed)), "tail": tail[0].tolist(), "scored": [scored.start, scored.stop],
               "features": self.namm_cfg.to_dict()["features"], "norm": norm}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def _save_shared(self, path: Path, shared: _Shared) -> None:
        """Write ``shared`` to ``path`` atomically (a temporary file in the same folder, then a rename)."""
        from safetensors.torch import save_file

        tensors = {"tail": shared.tail, "p_full": shared.p_full}
        layers = []
        for k, layer in enumerate(shared.cache.layers):
            tensors.update({f"L{k}.keys": layer.keys, f"L{k}.values": layer.values, f"L{k}.positions": layer.positions})
            if layer.valid is not None:
                tensors[f"L{k}.valid"] = layer.valid
            feats, positions, valid, seen = shared.features[k]
            tensors.update({f"F{k}.feats": feats, f"F{k}.positions": positions})
            if valid is not None:
                tensors[f"F{k}.valid"] = valid
            layers.append({**{a: getattr(layer, a) for a in self._LAYER_SCALARS}, "features_seen": int(seen)})
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        meta = {"format": self._STORE_FORMAT, "meta": json.dumps(
            {"layers": layers, "scored": [shared.scored.start, shared.scored.stop]})}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def _load_shared(self, path: Path, device) -> _Shared:
        """The shared state stored at ``path``; a damaged file is one clear error with its fix."""
        from safetensors import safe_open

        from namm.torch.cache import FullPolicy

        fix = f"delete {path} (it is recomputed on the next visit)"
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                if meta.get("format") != self._STORE_FORMAT:
                    raise AgreementFitnessError(f"{path} is not a stored agreement prompt "
                                                f"(format {meta.get('format')!r}, expected {self._STORE_FORMAT!r}); {fix}")
                info = json.loads(meta["meta"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except AgreementFitnessError:
            raise
        except Exception as e:  # truncated or corrupt: safetensors' own error, named
            raise AgreementFitnessError(f"stored agreement prompt {path} cannot be read ({e}); {fix}") from None
        cache = FullPolicy().make_cache(self.model)
        if len(info["layers"]) != len(cache.layers):
            raise AgreementFitnessError(f"{path} holds {len(info['layers'])} layers, the model has "
                                        f"{len(cache.layers)}; {fix}")
        features = []
        for k, (layer, li) in enumerate(zip(cache.layers, info["layers"])):
            layer.keys, layer.values, layer.positions = t[f"L{k}.keys"], t[f"L{k}.values"], t[f"L{k}.positions"]
            layer.valid = t.get(f"L{k}.valid")
            layer.is_initialized, layer.dtype, layer.device = True, layer.keys.dtype, layer.keys.device
            for a in self._LAYER_SCALARS:
                setattr(layer, a, li[a])
            features.append((t[f"F{k}.feats"], t[f"F{k}.positions"], t.get(f"F{k}.valid"), li["features_seen"]))
        cache.explicit_prefill = True
        return _Shared(cache=cache, features=features, tail=t["tail"], scored=slice(*info["scored"]),
                       p_full=t["p_full"])

    def _tail_logits(self, cache, tail, scored):
        """Logits ``[m, V]`` at the scored tail positions, the tail fed through ``cache`` in one forward."""
        import torch

        if tail.shape[1] == 0:
            return torch.zeros(0, self.model.config.vocab_size, device=tail.device)
        seen = cache.seen_tokens
        positions = torch.arange(seen, seen + tail.shape[1], device=tail.device)[None]
        with torch.no_grad():
            out = self.model(input_ids=tail, position_ids=positions, past_key_values=cache, use_cache=True)
        return out.logits[0, scored]

    def _measure(self, shared: _Shared, caches) -> tuple[float, float, float]:
        """(acceptance, token match, kept fraction) of a compressed cache and its refreshes: ``caches`` yields
        the cache the tail's first segment runs through, then each refresh's; each gets its segment of the tail
        (the whole tail without a refresh). Kept fraction: the mean over the segments, as each starts."""
        import torch

        starts = [0] + [j for j, _, _ in shared.refreshes]
        logits, kept = [], []
        for a, b, cache in zip(starts, starts[1:] + [shared.tail.shape[1]], caches):
            kept.append(cache.kv_fraction())   # the segment's scored positions: empty while before shared.scored
            logits.append(self._tail_logits(cache, shared.tail[:, a:b], slice(max(shared.scored.start - a, 0), None)))
        acc, match = acceptance(shared.p_full, torch.cat(logits))
        return acc, match, float(np.mean(kept))

    # --- per candidate ---------------------------------------------------------------------------------
    def _evicted(self, policy, source, features):
        """``source`` (every token kept) forked and evicted by the candidate ``policy`` from shared ``features``."""
        from namm.torch.cache import FullPolicy

        cache = source.fork(self.model, FullPolicy())
        for layer, (feats, positions, valid, seen) in zip(cache.layers, features):
            params = policy._layer_params(layer.layer_idx, feats.device)
            keep, scores, sel = policy.select_tokens(params, feats, positions, valid, seen)
            layer.apply(policy.decision(keep, sel, {}, scores))  # as NAMMLayer.run_update applies it
        return cache

    def _candidate(self, policy, shared: _Shared) -> tuple[float, float, float]:
        """(acceptance, token match, kept fraction) of one candidate on one prepared prompt."""
        caches = (self._evicted(policy, src, feats) for src, feats in
                  [(shared.cache, shared.features)] + [(snap, feats) for _, snap, feats in shared.refreshes])
        return self._measure(shared, caches)

    def population_keeps(self, flats: np.ndarray, shared: _Shared) -> list:
        """Per layer, the keep masks ``[P, Hkv, S]`` of ``P`` candidates on a prepared prompt (batched scorer and
        selection over the shared features)."""
        import torch

        from namm.torch.population import population_scores, select_population, stack_params

        params = {k: v.to(shared.tail.device) for k, v in stack_params(flats, self.namm_cfg).items()}
        dtype = self._dtype()
        keeps = []
        with torch.no_grad():
            for feats, positions, valid, seen in shared.features:
                t0 = time.perf_counter()
                scores = population_scores(params, self.namm_cfg, feats, valid, dtype=dtype)
                t1 = time.perf_counter()
                keeps.append(select_population(scores, positions, valid, seen, self.namm_cfg.selection,
                                               self.budget))
                self.timings["scoring"] += t1 - t0
                self.timings["selection"] += time.perf_counter() - t1
        return keeps

    def _dtype(self):
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    def _answer_model(self):
        """The model the batched answer forward runs: this fitness' own, or (``precision=bf16``) a bf16 copy of
        it, made once."""
        import copy

        if self.precision == "fp32":
            return self.model
        if self._low_model is None:
            self._low_model = copy.deepcopy(self.model).to(self._dtype()).eval()
        return self._low_model

    def _population(self, flats: np.ndarray, shared: _Shared) -> np.ndarray:
        """``[P, 3]`` (acceptance, token match, kept fraction) of ``P`` candidates at once (module docstring)."""
        import torch

        from namm.torch.population import PopulationCache

        device = shared.tail.device
        keeps = self.population_keeps(flats, shared)
        stored = [keep.sum(-1).amax(-1) for keep in keeps]   # the slots the candidate's own cache would store
        keeps = [None if bool(keep.all()) else keep for keep in keeps]
        with torch.no_grad():
            kept = (torch.stack(stored).double().mean(0) / shared.cache.seen_tokens).cpu().numpy()
            t0 = time.perf_counter()
            n, start = shared.tail.shape[1], shared.scored.start
            out = np.zeros((len(flats), 3))
            out[:, 2] = kept
            if n - start == 0:
                out[:, :2] = 1.0
                return out
            model = self._answer_model()
            low = None if model is self.model else self._dtype()
            cache = PopulationCache(model, shared.cache, keeps, dtype=low)
            seen = shared.cache.seen_tokens
            positions = torch.arange(seen, seen + n, device=device)[None].expand(len(flats), n)
            logits = model(input_ids=shared.tail.expand(len(flats), n), position_ids=positions,
                           past_key_values=cache, use_cache=True, logits_to_keep=n - start).logits.float()
            t1 = time.perf_counter()
            out[:, 0], out[:, 1] = acceptance(shared.p_full, logits)
            self.timings["answer_forward"] += t1 - t0
            self.timings["measure"] += time.perf_counter() - t1
        return out

    def _policy_run(self, policy, i: int) -> tuple[float, float, float]:
        """Any runtime policy (a baseline), run as the runtime runs it: its own prefill and end-of-prefill update,
        and each refresh ``NAMMCache.reselect`` on the full cache forked with it."""
        import torch

        from namm.torch.generate import prefill

        shared = self._prepare(i)
        compressed, _ = self._split(i)

        def caches():
            cache = policy.make_cache(self.model)
            with torch.no_grad():
                prefill(self.model, cache, torch.tensor([compressed], dtype=torch.long, device=shared.tail.device))
                cache.end_prefill()
            cache.freeze()
            yield cache
            for j, _, _ in shared.refreshes:
                cache = self._full_upto(shared.full, shared.tail.shape[1], j, policy)
                cache.freeze()
                yield cache

        return self._measure(shared, caches())

    def _by_task(self, values: np.ndarray, items: Sequence[int]) -> float:
        tasks = [self.rows[i]["dataset"] for i in items]
        return float(np.mean([values[[t == x for x in tasks]].mean() for t in sorted(set(tasks))]))

    def evaluate(self, population, items) -> np.ndarray:
        from tqdm import tqdm

        population = np.asarray(population, np.float32)
        items = [int(i) for i in np.asarray(items)]
        bar = tqdm(total=len(items) * (1 + len(population)), disable=not self.progress, desc="agreement fitness",
                   leave=False, file=sys.stderr)
        policies = None if self.batched else [self.policy_for(flat) for flat in population]
        res = np.zeros((len(population), len(items), 3))
        for j, i in enumerate(items):
            shared = self._prepare(i)
            bar.update(1)
            if self.batched:
                for a in range(0, len(population), self.pop_chunk):
                    res[a:a + self.pop_chunk, j] = self._population(population[a:a + self.pop_chunk], shared)
                    bar.update(len(population[a:a + self.pop_chunk]))
                continue
            for k, policy in enumerate(policies):
                t0 = time.perf_counter()
                res[k, j] = self._candidate(policy, shared)
                self.timings["candidates_unbatched"] += time.perf_counter() - t0
                bar.update(1)
        bar.close()
        self.last_details = {"acceptance": res[:, :, 0].mean(1), "token_match": res[:, :, 1].mean(1),
                             "kept_fraction": res[:, :, 2].mean(1)}
        return np.array([self._by_task(res[k, :, 0], items) for k in range(len(population))], np.float32)

    def evaluate_policy(self, policy, items, name: str | None = None) -> dict:
        """A runtime policy (``namm.torch.policies.build_policy``) on the same prompts and measure."""
        items = [int(i) for i in np.asarray(items)]
        t0 = time.perf_counter()
        res = np.array([self._policy_run(policy, i) for i in items])
        return {"fitness": self._by_task(res[:, 0], items), "token_match": float(res[:, 1].mean()),
                "kept_fraction": float(res[:, 2].mean()), "wall_s": time.perf_counter() - t0}
