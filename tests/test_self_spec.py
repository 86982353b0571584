"""NAMM self-speculation: the target with a compressed KV cache drafts, the target with its full cache verifies.

Prompts of ~300 tokens with chunk 32 and an update every 64 tokens, so the draft cache evicts during the
prefill and during decoding, and rejected drafts are rolled back around the evictions.
"""

import json
import math
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from transformers import DynamicCache

from experiments import specbench
from namm.torch.cache import CacheConfigError
from namm.torch.generate import prefill
from spec_decode.torch import Sampling, SelfSpecProposer, autoregressive_generate, speculative_generate

from conftest import EPS32

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
SCHEDULE = {"chunk_size": 32, "update_interval": 64}
POLICIES = {
    "h2o": {"name": "h2o", "budget": 0.5, **SCHEDULE},
    "streamingllm": {"name": "streamingllm", "budget": 0.5, "sinks": 4, **SCHEDULE},
    "namm_keep_all": {"name": "namm", "path": "untrained", **SCHEDULE},
    "namm_top_k": {"name": "namm", "path": "untrained", "budget": 0.5, **SCHEDULE},
}
PROMPT = torch.tensor([list(" ".join(f"k{i}={i * 7 % 13};" for i in range(42)).encode())])   # [1, 290]
N_NEW = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Target-only greedy ``[1, P + N_NEW]`` with the full cache (sdpa: the "namm" backend on a DynamicCache)."""
    model, _ = tiny_llama
    model.set_attn_implementation("sdpa")        # the session's model may have been left on another backend
    ref, _ = autoregressive_generate(model, PROMPT, N_NEW)
    return ref


def _full_kv_bytes(model, ids: torch.Tensor) -> int:
    cache = DynamicCache(config=model.config)
    model(ids, past_key_values=cache, use_cache=True)
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


@pytest.mark.parametrize("name", list(POLICIES))
def test_greedy_equals_target_greedy(tiny_llama, reference, name):
    model, _ = tiny_llama
    for gamma, adaptive in ((4, False), (2, True)):
        proposer = SelfSpecProposer(model, POLICIES[name])
        out, stats = speculative_generate(model, PROMPT, proposer, N_NEW, gamma=gamma, adaptive=adaptive)
        assert out.tolist() == reference.tolist(), (name, gamma)
        assert stats.new_tokens == N_NEW and stats.rounds < N_NEW
        cache = proposer.cache
        if name == "namm_keep_all":       # nothing evicted: the draft is the target, every draft is accepted
            assert stats.acceptance_rate == 1.0 and proposer.mean_kv_fraction == 1.0
        else:                             # the draft really holds less than the full cache
            assert 0.45 < proposer.mean_kv_fraction < 0.7
            assert max(cache.stored_tokens()) < 0.7 * cache.seen_tokens
            assert cache.kv_bytes() < 0.7 * _full_kv_bytes(model, out[:, :cache.seen_tokens])
            assert all(layer.num_updates >= 5 for layer in cache.layers)   # prefill + decoding evictions


@pytest.mark.parametrize("name", ["h2o", "namm_top_k"])
def test_rollback_leaves_no_trace(tiny_llama, name):
    """After self-speculation the draft cache equals the policy's own cache fed the committed tokens one by one."""
    model, _ = tiny_llama
    proposer = SelfSpecProposer(model, POLICIES[name])
    out, stats = speculative_generate(model, PROMPT, proposer, N_NEW, gamma=4)
    assert sum(stats.accepted) < sum(stats.proposed)           # there were rejections to roll back
    ref = proposer.policy.make_cache(model)
    prefill(model, ref, PROMPT[:, :-1])
    ref.end_prefill()
    for tok in out[0, PROMPT.shape[1] - 1:proposer.cache.seen_tokens].tolist():
        prefill(model, ref, torch.tensor([[tok]]))
    assert ref.seen_tokens == proposer.cache.seen_tokens
    for a, b in zip(ref.layers, proposer.cache.layers):
        assert torch.equal(a.positions, b.positions) and a.last_update_seen == b.last_update_seen
        torch.testing.assert_close(a.keys, b.keys, rtol=0, atol=0)   # rolled back to the same tokens' keys: bit for bit


def test_room_stops_drafts_before_an_update(tiny_llama):
    """No policy update ever sees a draft token: drafts stop at the next multiple of update_interval."""
    model, _ = tiny_llama
    proposer = SelfSpecProposer(model, POLICIES["h2o"])
    p = PROMPT.shape[1]
    proposer.start(PROMPT[0].tolist())                        # seen = p - 1, then the final (end of prefill) update
    assert proposer.cache.seen_tokens == p - 1 and proposer.room() == 64 - (p - 1) % 64
    toks, q = proposer.propose(PROMPT[0].tolist(), 60, Sampling())
    assert len(toks) == 64 - p % 64 and q is None             # the newest token is fed, then len - 1 drafts
    nxt = (p // 64 + 1) * 64                                  # the next update point
    assert proposer.cache.seen_tokens == nxt - 1 and proposer.cache.layers[0].n_pending == nxt - p


def test_sampling_runs_and_is_reproducible(tiny_llama):
    model, _ = tiny_llama
    sampling = Sampling(do_sample=True, temperature=1.0, top_k=50)
    outs = []
    for name in ("h2o", "namm_top_k", "namm_keep_all", "h2o"):
        g = torch.Generator().manual_seed(0)
        out, stats = speculative_generate(model, PROMPT, SelfSpecProposer(model, POLICIES[name]), 24, gamma=4,
                                          sampling=sampling, generator=g)
        assert out.shape == (1, PROMPT.shape[1] + 24) and stats.new_tokens == 24
        assert out[0, :PROMPT.shape[1]].tolist() == PROMPT[0].tolist()
        if name == "namm_keep_all":                            # q == p up to rounding: (nearly) all accepted
            assert stats.acceptance_rate > 0.95
        outs.append(out)
    assert outs[0].tolist() == outs[3].tolist()                # a fixed seed gives the same sample


REFRESHED = {**POLICIES, "snapkv": {"name": "snapkv", "budget": 0.5, "window": 16, **SCHEDULE},
             "h2o_once": {"name": "h2o", "budget": 0.5, "chunk_size": 32, "update_interval": 0, "final_update": True},
             "namm_recent": {"name": "namm", "path": "untrained", "budget": 0.5, "recent_fraction": 0.5, **SCHEDULE}}


@pytest.mark.parametrize("name", ["h2o", "h2o_once", "streamingllm", "snapkv", "namm_top_k", "namm_recent"])
def test_refresh_is_lossless_and_reselects_from_the_full_cache(tiny_llama, reference, name):
    """Refreshed drafts: output equals target greedy, and each refresh rebuilds the draft cache from the verifier's."""
    model, _ = tiny_llama
    proposer = SelfSpecProposer(model, REFRESHED[name], refresh_every=8, refresh_window=16)
    out, stats = speculative_generate(model, PROMPT, proposer, N_NEW, gamma=4)
    assert out.tolist() == reference.tolist()
    assert 3 <= proposer.refreshes <= N_NEW // 8
    # one more refresh, from a verifier cache built independently over the committed tokens
    ids = out[0].tolist()
    target_cache = proposer.make_target_cache(model)
    model(out[:, :-1], past_key_values=target_cache, use_cache=True)
    assert [q.shape[2] for q in target_cache.layers[0].queries] == [16 + 8]      # the window and the slack
    proposer.refreshed_at = -N_NEW
    proposer.sync(ids, target_cache)
    cache, full = proposer.cache, target_cache
    assert cache.seen_tokens == len(ids) - 1 and proposer.fed == ids[:-1]
    assert 0.45 < cache.kv_fraction() <= 0.5 + 1 / cache.seen_tokens
    for a, b in zip(cache.layers, full.layers):
        assert b.stored == len(ids) - 1 and a.n_pending == 0 and a.queries == []
        pos = a.positions[..., None].expand(*a.positions.shape, a.keys.shape[-1])     # kept K/V are the full ones
        torch.testing.assert_close(a.keys, torch.gather(b.keys, 2, pos), rtol=0, atol=0)
        torch.testing.assert_close(a.values, torch.gather(b.values, 2, pos), rtol=0, atol=0)
    if name == "streamingllm":                        # positions only: sinks and the newest tokens
        newest = set(range(len(ids) - 1 - (cache.layers[0].stored - 4), len(ids) - 1))
        assert set(cache.layers[0].positions[0, 0].tolist()) == set(range(4)) | newest
    if name.startswith("namm"):                       # all-zero scores: the oldest tokens win ties, unless protected
        cap = cache.layers[0].stored
        newest = set(range(len(ids) - 1 - cap // 4, len(ids) - 1))
        kept = set(cache.layers[0].positions[0, 0].tolist())
        assert (newest <= kept) == (name == "namm_recent")
    # the fork shares nothing the verifier can change: its cache is untouched by the draft's next round
    before = [layer.keys.clone() for layer in full.layers]
    proposer.propose(ids, 4, Sampling())
    proposer.commit(ids)
    assert all(torch.equal(x, layer.keys) for x, layer in zip(before, full.layers))


def _random_namm(seed: int, **kw):
    """A NAMM with random weights (distinct scores, so what it keeps is a real choice), no normalisation."""
    from namm.config import NAMMConfig
    from namm.torch import scoring
    from namm.torch.policy import NAMMPolicy

    cfg = NAMMConfig()
    n = sum(math.prod(shape) for _, shape in scoring.param_layout(cfg))
    flat = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return NAMMPolicy.from_flat(flat, cfg, None, threshold=-1e30, **{"chunk_size": 32, **kw})


def test_carried_refresh_continues_the_policy_over_the_full_cache(tiny_llama):
    """carry_state: every refresh is the update the NAMM would make on the full cache at that point (its EMA
    state equals a keep-all NAMM's updated every hop over the same tokens), keeps the top of its scores, and
    stays lossless."""
    from namm.torch import selection

    model, _ = tiny_llama
    prompt = PROMPT[:, :273]                               # 272 prefilled tokens: a whole number of hops
    ref, _ = autoregressive_generate(model, prompt, N_NEW)
    proposer = SelfSpecProposer(model, _random_namm(3, budget=0.5, update_interval=0, final_update=True),
                                refresh_every=8, refresh_window=16, carry_state=True)
    out, _ = speculative_generate(model, prompt, proposer, N_NEW, gamma=4)
    assert out.tolist() == ref.tolist() and proposer.refreshes >= 2
    n = proposer.carried[0][1]
    hop = proposer.policy.row_multiple
    assert n > 272 and (n - 272) % hop == 0
    # the reference: the same NAMM keeping everything, updated every hop from the start, fed the same n tokens
    keep_all = _random_namm(3, chunk_size=hop, update_interval=hop)
    full = keep_all.make_cache(model)
    prefill(model, full, out[:, :n])
    for (state, m), layer in zip(proposer.carried, full.layers):
        assert m == n and layer.last_update_seen == n and layer.stored == n
        # attention rows of the same tokens from drafts/refresh windows vs a plain prefill (SDPA shapes differ, rows
        # <= 1), through a 32-term DFT per hop and the EMA: n_fft eps of the largest spectral sum (measured <= 7 eps)
        for key in ("ema", "left_context"):
            torch.testing.assert_close(state[key], layer.state[key], rtol=0,
                                       atol=32 * EPS32 * max(1.0, layer.state[key].abs().max().item()))
    # the draft holds the budget of the top-scored of those n tokens (the newest forced, as always) and every
    # token after them (fed again since the refresh, not yet scored)
    ids = out[0].tolist()
    for d, f in zip(proposer.cache.layers, full.layers):
        scores = f.last_scores
        valid = torch.ones_like(scores, dtype=torch.bool)
        sel = selection.SelectionConfig(mode="ragged_max", threshold=-1e30, top_k=selection.budget_tokens(0.5, n))
        want = selection.select(scores, valid, selection.newest_mask(f.positions, valid), sel)
        for h in range(d.positions.shape[1]):
            got = set(d.positions[0, h].tolist())
            assert {p for p in got if p < n} == set(f.positions[0, h][want[0, h]].tolist())
            assert set(range(n, len(proposer.fed))) <= got
    assert len(proposer.fed) <= len(ids)


def test_carried_refresh_needs_a_refresh_and_the_queries_since_the_carried_state(tiny_llama):
    model, _ = tiny_llama
    with pytest.raises(ValueError, match="carry_state .* set refresh_every"):
        SelfSpecProposer(model, POLICIES["h2o"], carry_state=True)
    proposer = SelfSpecProposer(model, _random_namm(1, budget=0.5, update_interval=0, final_update=True),
                                refresh_every=8, carry_state=True)
    ids = PROMPT[0, :200].tolist()
    proposer.start(ids)
    assert proposer.carried is not None and proposer.carried[0][1] == len(ids) - 1
    for layer in proposer.cache.layers:                               # pretend the state is 64 tokens older
        state, m = layer.full_state
        layer.full_state = ({k: v[:, :, :m - 64] for k, v in state.items()}, m - 64)
    target_cache = proposer.make_target_cache(model)
    model(PROMPT[:, :199], past_key_values=target_cache, use_cache=True)
    proposer.refreshed_at = 0
    with pytest.raises(CacheConfigError, match="needs the queries of the 64 after them; the source buffered 56"):
        proposer.sync(ids, target_cache)


@pytest.mark.parametrize("refresh_every", [None, 8])
def test_fork_prefill_computes_the_prompt_once(tiny_llama, reference, refresh_every):
    """fork_prefill: the draft cache starts as the verifier's prefill, re-selected; no second prefill, lossless."""
    model, _ = tiny_llama
    proposer = SelfSpecProposer(model, REFRESHED["h2o_once"], refresh_every=refresh_every, fork_prefill=True)
    ids = PROMPT[0].tolist()
    target_cache = proposer.make_target_cache(model)
    model(PROMPT[:, :-1], past_key_values=target_cache, use_cache=True)
    proposer.start(ids)
    assert proposer.cache.seen_tokens == 0                   # nothing prefilled by the draft itself
    proposer.sync(ids, target_cache)
    assert proposer.cache.seen_tokens == len(ids) - 1 and proposer.refreshes == 0
    assert 0.45 < proposer.kv_fraction <= 0.51
    long_calls = []                                          # forwards over more tokens than a verification
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: long_calls.append(1) if kw.get("input_ids", args[0] if args else None).shape[1] > 5
        else None, with_kwargs=True)
    try:
        out, stats = speculative_generate(model, PROMPT, proposer, N_NEW, gamma=4)
    finally:
        hook.remove()
    assert out.tolist() == reference.tolist()
    assert (proposer.refreshes >= 3) if refresh_every else (proposer.refreshes == 0)
    assert len(long_calls) == 1                                # the verifier's prefill, and no draft prefill


def test_refresh_sampling_and_bad_settings(tiny_llama):
    model, _ = tiny_llama
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(1)
        out, stats = speculative_generate(model, PROMPT, SelfSpecProposer(model, POLICIES["h2o"], refresh_every=4),
                                          16, gamma=3, sampling=Sampling(do_sample=True, top_k=20), generator=g)
        assert stats.new_tokens == 16
        outs.append(out.tolist())
    assert outs[0] == outs[1]
    for kw, msg in (({"refresh_every": 0}, "refresh_every=0"), ({"refresh_window": 0}, "refresh_window=0")):
        with pytest.raises(ValueError, match=msg):
            SelfSpecProposer(model, POLICIES["h2o"], **kw)
    one = PROMPT[:, :1]                               # a one-token prompt: nothing to fork until tokens are committed
    proposer = SelfSpecProposer(model, POLICIES["h2o"], refresh_every=4, fork_prefill=True)
    assert speculative_generate(model, one, proposer, 12, gamma=3)[0].tolist() == \
        autoregressive_generate(model, one, 12)[0].tolist()
    assert proposer.refreshes >= 1
    assert SelfSpecProposer(model, POLICIES["h2o"]).make_target_cache(model) is None       # no refresh: sdpa cache
    from namm.torch import FullPolicy
    from namm.torch.cache import CacheConfigError
    full = FullPolicy().make_cache(model)             # a full cache that buffered no queries cannot drive H2O
    model(PROMPT[:, :64], past_key_values=full, use_cache=True)
    fork = full.fork(model, SelfSpecProposer(model, POLICIES["h2o"]).policy)
    with pytest.raises(CacheConfigError, match="buffered no queries"):
        fork.reselect()


def test_specbench_selfspec_end_to_end(tmp_path, capsys):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose("specbench", overrides=[
            "target=tiny_random", f"output_dir={tmp_path}", "only=[selfspec]", "threads=1",
            "suites.selfspec.task.tasks=[kv_retrieval]", "suites.selfspec.task.context_lengths=[300,400]",
            "suites.selfspec.max_prompt_tokens=null", "suites.selfspec.max_new_tokens=12",
            "suites.selfspec.budgets=[0.5]"])
    with open_dict(cfg):                                       # the config's schedule, scaled down
        cfg.suites.selfspec.policies = {
            "namm": POLICIES["namm_top_k"], "namm_trained": {"name": "namm", "path": str(tmp_path / "missing")},
            "h2o": {**POLICIES["h2o"], "final_update": False},
            "streamingllm": {**POLICIES["streamingllm"], "final_update": False},
            "h2o_refreshed": {**POLICIES["h2o"], "final_update": False, "refresh_every": 4,
                              "fork_prefill": True, "carry_state": True}}
    specbench.main(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads((tmp_path / "specbench.json").read_text())
    rows = report["results"]["selfspec"]
    assert set(report["results"]) == {"selfspec"} and report["drafts"] == {}
    assert set(rows) == {"target", "namm_0.5@4", "h2o_0.5@4", "streamingllm_0.5@4", "h2o_refreshed_0.5@4"}
    assert rows["h2o_refreshed_0.5@4"]["refresh_every"] == 4 and rows["h2o_0.5@4"]["refresh_every"] is None
    assert rows["h2o_refreshed_0.5@4"]["carry_state"] is True and rows["h2o_0.5@4"]["carry_state"] is False
    assert all(report["lossless"]["selfspec"].values()) and "lossless_greedy: True (target: True)" in lines
    assert "namm_trained" in report["selfspec"]["selfspec"]["skipped"]
    assert "c = budget" in report["selfspec"]["selfspec"]["predicted_speedup_kv"]
    for key in ("namm_0.5@4", "h2o_0.5@4", "streamingllm_0.5@4"):
        r = rows[key]
        assert 0 <= r["alpha"] <= 1 and r["tokens_per_call"] >= 1 and r["c"] > 0 and r["speedup"] > 0
        assert 0.4 < r["kv_fraction"] < 0.8 and r["budget"] == 0.5 and r["decode_speedup"] > 0
        assert r["predicted_speedup_kv"] == pytest.approx(specbench.expected_speedup(r["alpha"], 4, 0.5))  # float64
    assert specbench.expected_speedup(0.8, 5, 0.0) == pytest.approx(3.69, abs=0.005)  # the reference figure, 2 decimals
    by_ctx = report["selfspec"]["selfspec"]["by_context"]            # the same rows per context length
    assert set(by_ctx) == {"300", "400"} and all(set(r) == set(rows) for r in by_ctx.values())
    for key in ("target", "h2o_0.5@4"):                          # all prompts = both groups merged
        assert rows[key]["new_tokens"] == sum(by_ctx[g][key]["new_tokens"] for g in by_ctx)
    assert set(report["selfspec"]["selfspec"]["by_task"]) == {"kv_retrieval"}
    per_prompt = report["selfspec"]["selfspec"]["per_prompt"]
    assert sum(p["refreshes"] for p in per_prompt if p["key"] == "h2o_refreshed_0.5@4") >= 2
    assert len(per_prompt) == 2 * 4 and {p["context"] for p in per_prompt} == {300, 400}
    h2o = [p for p in per_prompt if p["key"] == "h2o_0.5@4"]
    assert sum(p["accepted"] for p in h2o) / sum(p["proposed"] for p in h2o) == pytest.approx(rows["h2o_0.5@4"]["alpha"],
                                                                                            rel=0, abs=1e-12)  # counts
    md = (tmp_path / "specbench.md").read_text()
    assert "| kv_retrieval | h2o_0.5@4 |" in md and "| all | h2o_refreshed_0.5@4 (refresh every 4, window 32, state carried, forked prefill) |" in md
    assert "c = budget" in md and "| all | namm_0.5@4 | 0.5 |" in md and "| 300 | namm_0.5@4 | 0.5 |" in md
    assert any(re.fullmatch(r"selfspec_namm_acceptance_400@0.5: [\d.]+ \(target: .*\)", x) for x in lines)
    assert any(x.startswith("selfspec_namm_trained_acceptance@0.5: n/a (skipped") for x in lines)
    assert re.fullmatch(r"selfspec_namm_acceptance@0.5: [\d.]+ \(target: >= 0.9 and above h2o [\d.]+, "
                        r"streamingllm [\d.]+\)", lines[-1])


@pytest.mark.parametrize("overrides, message", [
    (["only=[nope]"], "names unknown suites ['nope']"),
    (["only=[humaneval]", "drafts.undistilled=null", "drafts.tvd=/nonexistent/draft"], "drafts.tvd=/nonexistent/draft does not exist"),
    (["only=[humaneval]", "~drafts.tvd", "~drafts.undistilled"], "sweep_drafts lists ['tvd'], not in drafts"),
])
def test_specbench_bad_input_is_one_line(tmp_path, overrides, message):
    """A config typo or a missing draft ends the run before any model loads, as one line and exit status 1."""
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose("specbench", overrides=["target=tiny_random", f"output_dir={tmp_path}", *overrides])
    with pytest.raises(SystemExit) as e:
        specbench.main(cfg)
    assert str(e.value).startswith("specbench: ") and message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_refreshed_namm_self_speculation_on_smollm2():
    """The bundled NAMM at a 25 % cap drafts for SmolLM2 on a key-value lookup, refreshed every 8 tokens: lossless."""
    from experiments.lib.models import load_model
    from experiments.tasks import build_prompt, load_task

    model, tok = load_model("smollm2")
    (row,) = load_task({"name": "builtin", "tasks": ["kv_retrieval"], "context_lengths": [1024], "n": 1}, tok,
                       split="test")
    p = build_prompt(row, tok, chat=False)
    x = torch.tensor([list(p.context_ids) + list(p.question_ids)])
    ref, _ = autoregressive_generate(model, x, 24)
    policy = {"name": "namm", "path": "smollm2-i1", "threshold": -1e30, "budget": 0.25, "update_interval": 0,
              "final_update": True}
    proposer = SelfSpecProposer(model, policy, refresh_every=8)
    out, stats = speculative_generate(model, x, proposer, 24, gamma=4)
    assert out.tolist() == ref.tolist() and proposer.refreshes >= 2
    assert 0.24 < proposer.mean_kv_fraction < 0.27 and stats.acceptance_rate > 0
