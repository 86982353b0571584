"""One matrix for every registered baseline: the same invariants, JAX and runtime, with the knobs of its config.

Each name in ``namm.baselines.BASELINES`` (a new ``@register`` is picked up here) is checked on one golden
update (tiny tensors) and on the tiny random Llama: it keeps at most its budget and always the newest token,
a keep-all budget (1.0, or a count >= the tokens seen) is the full cache exactly, and the JAX policy and the
runtime's (``build_policy``) keep the same tokens on the same input.
"""

import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from namm import baselines as jbase  # noqa: E402
from namm.torch import baselines as tbase  # noqa: E402
from namm.torch.generate import greedy_generate, prefill  # noqa: E402
from namm.torch.policies import build_policy  # noqa: E402

from conftest import EPS32, undecided_rank_keep  # noqa: E402

NAMES = sorted(jbase.BASELINES)
POLICY_DIR = Path(__file__).parents[1] / "configs" / "policy"
SMALL = {"chunk_size": 16, "update_interval": 32}   # the tiny model's schedule: updates at 32, 64, 96 and the end
# Baselines whose JAX and runtime policies draw from different generators (a jax.random key; a seeded
# torch.Generator): the same distribution, not the same draws, so their decisions are compared only when keeping all.
DRAWS_DIFFER = {"random"}

# The golden update: 24 retained tokens (gapped positions) in slots 0..23, 16 new ones (positions 200..215) after.
H, S_OLD, N_NEW, D = 2, 24, 16, 8
S, SEEN = S_OLD + N_NEW, 216
BUDGETS = [0.1, 17]            # 0.1 of the 216 tokens seen -> 22 tokens; 17 tokens
KEEP_ALL = [1.0, SEEN]         # every token seen; a count >= the tokens seen


def config(name: str) -> dict:
    """``configs/policy/<name>.yaml`` as a dict."""
    return OmegaConf.to_container(OmegaConf.load(POLICY_DIR / f"{name}.yaml"))


def takes_budget(name: str) -> bool:
    return "budget" in inspect.signature(jbase.BASELINES[name]).parameters


def jax_policy(name: str, budget):
    """The JAX baseline with the knobs of its config that its builder takes, at ``budget``."""
    params = inspect.signature(jbase.BASELINES[name]).parameters
    knobs = {k: v for k, v in config(name).items() if k in params and k != "budget"}
    return jbase.make_baseline(name, **knobs, **({"budget": budget} if "budget" in params else {}))


def torch_policy(name: str, budget, **schedule):
    """The runtime policy ``policy=<name>`` builds, at ``budget``."""
    return build_policy({**config(name), "budget": budget, **schedule})


@pytest.fixture(scope="module")
def golden():
    rng = np.random.default_rng(5)
    positions = np.concatenate([np.sort(rng.choice(200, S_OLD, replace=False)), np.arange(200, SEEN)])
    logits = np.where(np.arange(S)[None, :] <= np.arange(N_NEW)[:, None] + S_OLD, rng.normal(size=(H, N_NEW, S)) * 2,
                      -np.inf)
    rows = np.exp(logits - logits.max(-1, keepdims=True))
    rows = (rows / rows.sum(-1, keepdims=True)).astype(np.float32)                 # [H, n, S] causal softmax rows
    acc = np.abs(rng.normal(size=(H, S))).astype(np.float32)                       # attention accumulated so far
    acc[:, S_OLD:] = 0
    keys = rng.normal(size=(H, S, D)).astype(np.float32)
    return dict(positions=positions.astype(np.int32), rows=rows, acc=acc, keys=keys)


def jax_update(policy, g):
    """``(state, scores [H, S], keep [H, S])`` of one JAX update on the golden input."""
    state = jbase.BaselineState(
        positions=jnp.asarray(np.where(np.arange(S) < S_OLD, g["positions"], 0)[None].repeat(H, 0)),
        valid=jnp.asarray(np.broadcast_to(np.arange(S) < S_OLD, (H, S))),
        acc=jnp.asarray(g["acc"]),
    )
    state, scores, keep = policy.update(None, state, g["rows"], g["positions"], np.ones((H, S), bool),
                                        keys=g["keys"], rng=jax.random.key(0), layer=1)
    return state, np.asarray(scores), np.asarray(keep)


def torch_update(policy, g):
    """``(scores [H, S] | None, keep [H, S])`` of one runtime update on the golden input."""
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))  # noqa: E731
    out = policy.update({"acc": t(g["acc"][:, :S_OLD])[None]}, t(g["rows"])[None], t(g["keys"])[None],
                        t(g["positions"]).long().expand(1, H, S), None, N_NEW, SEEN, 1, False)
    keep = np.ones((H, S), bool)
    if out.keep is not None:
        keep[:] = False
        for h in range(H):
            keep[h, out.keep[0, h].numpy()] = True
    return (None if out.scores is None else out.scores[0].numpy()), keep


def test_every_baseline_has_a_runtime_policy_and_a_config():
    assert set(tbase.BASELINES) | {"full"} == set(NAMES)       # "full" is the cache's FullPolicy in the runtime
    for name in NAMES:
        assert config(name)["name"] == name
        assert torch_policy(name, 0.25 if takes_budget(name) else None).name == name


# --- JAX, one update ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", NAMES)
def test_jax_keeps_its_budget_and_the_newest(golden, name, budget):
    state, _, keep = jax_update(jax_policy(name, budget), golden)
    n_keep = int(jbase.resolve_budget(budget, jnp.asarray(SEEN))) if takes_budget(name) else S
    assert (keep.sum(-1) <= n_keep).all()
    assert keep[:, -1].all()                                   # slot S-1 holds the newest token (position 215)
    np.testing.assert_array_equal(np.asarray(state.valid), keep)


@pytest.mark.parametrize("budget", KEEP_ALL)
@pytest.mark.parametrize("name", NAMES)
def test_jax_keep_all_is_the_full_cache(golden, name, budget):
    state, _, keep = jax_update(jax_policy(name, budget), golden)
    full_state, _, full_keep = jax_update(jbase.full(), golden)
    assert full_keep.all()
    np.testing.assert_array_equal(keep, full_keep)
    np.testing.assert_array_equal(np.asarray(state.positions), np.asarray(full_state.positions))
    np.testing.assert_array_equal(np.asarray(state.valid), np.asarray(full_state.valid))


# --- JAX == runtime, one update -----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", BUDGETS + KEEP_ALL)
@pytest.mark.parametrize("name", NAMES)
def test_jax_and_runtime_keep_the_same_tokens(golden, name, budget):
    if name in DRAWS_DIFFER and budget in BUDGETS:
        pytest.skip(f"{name}: JAX and the runtime draw from different generators")
    _, jscores, jkeep = jax_update(jax_policy(name, budget), golden)
    tscores, tkeep = torch_update(torch_policy(name, budget), golden)
    # the longest float32 sum in a score: the new rows plus the accumulated attention (H2O), or a key's squares (L2)
    finite = np.abs(jscores[np.isfinite(jscores)])
    tol = (max(N_NEW, D) + 1) * EPS32 * (finite.max() if finite.size else 0.0)
    near_tie = undecided_rank_keep(jscores, jkeep, tol, tscores)
    assert near_tie.sum() <= 2                                  # the exact comparison covers (almost) every token
    assert (tkeep == jkeep)[~near_tie].all()
    if takes_budget(name) and budget in BUDGETS:
        assert 0 < jkeep.sum() < jkeep.size                     # the golden case really evicts


# --- the runtime on the tiny random Llama -------------------------------------------------------------------------

def ids_of(n, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def prefilled(model, policy, ids, end: bool = True):
    cache = policy.make_cache(model)
    with torch.no_grad():
        logits = prefill(model, cache, ids)
        if end:
            cache.end_prefill()
    return cache, logits


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", NAMES)
def test_runtime_keeps_its_budget_and_the_newest(tiny_llama, name):
    model = tiny_llama[0]
    ids = ids_of(100, seed=1)
    for n, end in ((64, False), (100, True)):                  # right after the update at 64; after the final one
        cache, _ = prefilled(model, torch_policy(name, 0.25, **SMALL), ids[:, :n], end)
        want = tbase.resolve_budget(0.25, n) if takes_budget(name) else n
        for layer in cache.layers:
            assert layer.seen == n and layer.stored <= want
            assert (layer.positions == n - 1).any(-1).all()     # every head keeps the newest token


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("budget", [1.0, 100])
@pytest.mark.parametrize("name", NAMES)
def test_runtime_keep_all_is_the_full_cache(tiny_llama, name, budget):
    model = tiny_llama[0]
    ids = ids_of(100, seed=2)
    cache, logits = prefilled(model, torch_policy(name, budget, **SMALL), ids)
    ref, ref_logits = prefilled(model, build_policy({"name": "full", **SMALL}), ids)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    for layer, full in zip(cache.layers, ref.layers, strict=True):   # the same K/V in the same order, bit for bit
        assert torch.equal(layer.keys, full.keys) and torch.equal(layer.values, full.values)
        assert torch.equal(layer.positions, full.positions)
    out = greedy_generate(model, ids, None, 6, policy=torch_policy(name, budget, **SMALL))
    assert out.token_ids == greedy_generate(model, ids, None, 6, policy=None).token_ids
    assert out.kv_fraction_prefill == out.kv_fraction_decode == 1.0
