"""Runtime invariants on tiny random Llama / Qwen3 / Mistral models (the runtime is model-agnostic)."""

import pytest
import torch
from transformers import DynamicCache

from experiments.lib.models import tiny_random
from namm.config import FeatureConfig, NAMMConfig
from namm.torch import NAMMCache, PolicyUpdate, TorchPolicy, build_policy, greedy_generate
from namm.torch.baselines import resolve_budget
from namm.torch.cache import CacheConfigError
from namm.torch.features import gqa_average
from namm.torch.generate import prefill
from namm.torch.policies import PolicyConfigError
from namm.torch.policy import NAMMPolicy

from conftest import EPS32

ARCHS = ["llama", "qwen3", "mistral"]
SMALL = {"chunk_size": 16, "update_interval": 32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models():
    return {arch: tiny_random(arch, seed=0)[0] for arch in ARCHS}


def ids_of(n, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def small_namm(**kw):
    return NAMMPolicy.untrained(NAMMConfig(features=FeatureConfig(chunk_size=16, update_interval=32)), **kw)


class Probe(TorchPolicy):
    """Buffers attention rows, never evicts."""

    name = "probe"
    needs_attention = True
    chunk_size = 16

    def update(self, state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
        return PolicyUpdate(state=state)


class EvictOdd(TorchPolicy):
    """Layer l drops every second old token of head h when (l + h) is odd: per-layer lengths differ."""

    name = "evict_odd"
    chunk_size = 16
    update_interval = 32

    def update(self, state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
        b, h, s = positions.shape
        if layer_idx % 2 == 0:
            return PolicyUpdate(state=state)
        keep = torch.arange(s)
        keep = keep[(keep % 2 == 0) | (keep >= s - n_new)]
        return PolicyUpdate(state=state, keep=keep.expand(b, h, -1).clone())


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_all_equals_dynamic_cache(models, arch):
    model = models[arch]
    ids = ids_of(100)
    chunks = [ids[:, i : i + 16] for i in range(0, 100, 16)]
    with torch.no_grad():
        ref_cache = DynamicCache(config=model.config)
        ref = [model(input_ids=c, past_key_values=ref_cache, use_cache=True).logits for c in chunks]
        cache = small_namm().make_cache(model)  # all-zero NAMM: updates run, nothing is evicted
        out = [model(input_ids=c, past_key_values=cache, use_cache=True).logits for c in chunks]
    assert cache.layers[0].num_updates == 3
    assert cache.stored_tokens() == [100, 100]
    for a, b in zip(ref, out):   # nothing evicted, the same K/V in the same order: the same kernels, bit for bit
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_full_forward(models, arch):
    model = models[arch]
    ids = ids_of(77, seed=1)
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        cache = build_policy({"name": "full", "chunk_size": 16}).make_cache(model)
        last = prefill(model, cache, ids)
    # SDPA over 16-token chunks vs one 77-token call: the same sums blocked differently (measured <= 1.6 eps max|logit|)
    torch.testing.assert_close(last, full, rtol=0, atol=16 * EPS32 * full.abs().max().item())


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_rows_equal_eager(models, arch):
    model = models[arch]
    eager = tiny_random(arch, seed=0, attn_implementation="eager")[0]
    ids = ids_of(48, seed=2)
    with torch.no_grad():
        att = eager(input_ids=ids, output_attentions=True).attentions
        cache = Probe().make_cache(model)
        prefill(model, cache, ids)
    n_kv = model.config.num_key_value_heads
    for layer, a in zip(cache.layers, att):
        # rows recomputed from the cached q/k (softmax over <= 48 keys, head_dim-term logits) vs eager's: float32
        # order; probabilities <= 1 (measured <= 6 eps)
        torch.testing.assert_close(layer.pending_rows(), gqa_average(a, n_kv), rtol=0, atol=64 * EPS32)


def test_unequal_layer_lengths_prefill_and_decode(models):
    model = models["llama"]
    ids = ids_of(70, seed=3)
    with torch.no_grad():
        cache = EvictOdd().make_cache(model)
        prefill(model, cache, ids)
        lens = cache.stored_tokens()
        assert lens[0] == 70 and lens[1] < 70
        # a multi-token chunk equals the same tokens fed one by one (no eviction in between)
        extra = ids_of(3, seed=4)
        ref = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            ref.update(layer.keys.clone(), layer.values.clone(), i)
        pos = torch.arange(70, 73)[None]
        chunk = model(input_ids=extra, position_ids=pos, past_key_values=cache, use_cache=True).logits
        steps = [
            model(input_ids=extra[:, i : i + 1], position_ids=pos[:, i : i + 1], past_key_values=ref).logits
            for i in range(3)
        ]
    # a 3-query SDPA vs three 1-query calls over unequal per-layer caches: float32 order (measured <= 4.4 eps max|logit|)
    want = torch.cat(steps, dim=1)
    torch.testing.assert_close(chunk, want, rtol=0, atol=16 * EPS32 * want.abs().max().item())
    out = greedy_generate(model, ids, None, 40, policy=EvictOdd())
    assert len(out.token_ids) == 40 and out.seen_tokens == 70 + 39
    assert out.stored_tokens[0] == out.seen_tokens > out.stored_tokens[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_greedy_loop(models, arch):
    model = models[arch]
    ids = ids_of(90, seed=5)
    policy = build_policy({"name": "h2o", "budget": 0.5, **SMALL})
    ours = greedy_generate(model, ids, None, 30, policy=policy, eos_token_ids=[257])
    cache = policy.make_cache(model)
    with torch.no_grad():
        gen = model.generate(
            ids, past_key_values=cache, prefill_chunk_size=cache.chunk_size, max_new_tokens=30, do_sample=False
        )
    assert gen[0, 90:].tolist() == ours.token_ids
    assert cache.stored_tokens() == ours.stored_tokens
    assert ours.stored_tokens[0] < ours.seen_tokens


def test_generate_one_shot_prefill_stays_bounded(models):
    """Without prefill_chunk_size, generate prefills in one forward: one update at its end, then every interval."""
    model = models["llama"]
    ids = ids_of(100, seed=6)
    policy = build_policy({"name": "recency", "budget": 40, **SMALL})
    cache = policy.make_cache(model)
    with torch.no_grad():
        gen = model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False, eos_token_id=[])
    assert gen.shape[1] == 140
    assert max(cache.stored_tokens()) <= 40 + 32


def test_end_of_prefill_update_follows_a_last_chunk_of_one_token(models):
    """A prompt of k * chunk + 1 tokens: the 1-token last chunk is still prefill (not model.generate's first decode
    step), so the end-of-prefill update sees every prompt token and keeps exactly the budget."""
    model = models["llama"]
    chunk = SMALL["chunk_size"]
    ids = ids_of(3 * chunk + 1, seed=9)
    out = greedy_generate(model, ids, None, 1, policy=build_policy({"name": "h2o", "budget": 0.5, **SMALL}))
    want = resolve_budget(0.5, ids.shape[1])
    assert out.stored_tokens == [want, want] and out.seen_tokens == ids.shape[1]


def test_fork_shares_the_tokens_and_evolves_independently(models):
    from namm.torch.cache import FullPolicy
    from namm.torch.generate import prefill

    model = models["llama"]
    cache = FullPolicy().make_cache(model)
    with torch.no_grad():
        prefill(model, cache, ids_of(50, seed=10))
        fork = cache.fork(model, FullPolicy())
        fork.layers[0].gather(torch.arange(10)[None, None].expand(1, fork.layers[0].keys.shape[1], 10))
        prefill(model, fork, ids_of(3, seed=11))
    assert fork.policy is not cache.policy and all(layer.policy is fork.policy for layer in fork.layers)
    assert cache.stored_tokens() == [50, 50] and cache.seen_tokens == 50
    assert fork.stored_tokens() == [13, 53] and fork.seen_tokens == 53


def test_full_policy_equals_plain_greedy(models):
    model = models["llama"]
    model.set_attn_implementation("sdpa")
    ids = ids_of(60, seed=7)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False)[0, 60:].tolist()
    out = greedy_generate(model, ids[:, :40], ids[:, 40:], 12, policy=None, eos_token_ids=[257])
    assert out.token_ids == ref
    assert out.kv_fraction_prefill == out.kv_fraction_decode == 1.0
    assert out.stored_tokens == [71, 71] and out.seen_tokens == 71


@pytest.mark.parametrize("name", ["recency", "streamingllm", "h2o", "l2", "snapkv", "random"])
def test_baselines_keep_their_budget(models, name):
    model = models["llama"]
    ids = ids_of(100, seed=8)
    out = greedy_generate(model, ids, None, 5, policy=build_policy({"name": name, "budget": 0.25, **SMALL}))
    want = resolve_budget(0.25, 100)  # end-of-prefill update: exactly the budget
    assert out.kv_fraction_prefill == pytest.approx(want / 100, rel=0, abs=1e-12)   # a ratio of counts (float64)
    assert out.stored_tokens == [want + 4, want + 4]  # 4 decode tokens since, no interval crossed
    out = greedy_generate(model, ids, None, 5, policy=build_policy({"name": name, "budget": 20, **SMALL}))
    assert out.kv_fraction_prefill == pytest.approx(20 / 100, rel=0, abs=1e-12)


def test_question_outside_compression_is_never_evicted(models):
    model = models["llama"]
    ctx, q = ids_of(80, seed=9), ids_of(20, seed=10)
    policy = build_policy({"name": "h2o", "budget": 16, **SMALL})
    out = greedy_generate(model, ctx, q, 30, policy=policy, compress_question=False)
    assert out.stored_tokens == [16 + 20 + 29] * 2
    cache = policy.make_cache(model)
    with torch.no_grad():
        prefill(model, cache, ctx)
        cache.end_prefill()
        cache.freeze()
        prefill(model, cache, q)
    for layer in cache.layers:
        assert layer.positions[0, 0, -20:].tolist() == list(range(80, 100))
        assert layer.stored == 36
    inside = greedy_generate(model, ctx, q, 30, policy=policy, compress_question=True)
    assert inside.kv_fraction_prefill == pytest.approx(16 / 100, rel=0, abs=1e-12)


def test_masked_mode_and_random_namm(models):
    model = models["llama"]
    torch.manual_seed(0)
    cfg = NAMMConfig(features=FeatureConfig(chunk_size=16, update_interval=32))
    flat = torch.randn(4172) * 0.3
    ids = ids_of(100, seed=11)
    for mode in ["ragged_max", "masked"]:
        out = greedy_generate(model, ids, None, 20, policy=NAMMPolicy.from_flat(flat, cfg, mode=mode))
        assert len(out.token_ids) == 20 and out.kv_fraction_prefill < 1.0
    capped = greedy_generate(model, ids, None, 5, policy=NAMMPolicy.untrained(cfg, budget=0.25))
    # top-k cap at a quarter of the tokens seen: 24 kept at the update at 96, then 4 prompt + 4 decoded tokens
    assert capped.stored_tokens == [resolve_budget(0.25, 96) + 8] * 2


def test_namm_recent_fraction_keeps_the_newest_tokens(models):
    """recent_fraction: the newest floor(fraction * cap) tokens of every head survive a capped update whatever
    their score; the rest of the cap goes by score, so the cache still holds exactly the cap."""
    model = models["llama"]
    cfg = NAMMConfig(features=FeatureConfig(chunk_size=16, update_interval=0))
    flat = torch.randn(4172, generator=torch.Generator().manual_seed(5)) * 0.3
    ids = ids_of(100, seed=4)

    def kept(**kw):
        cache = NAMMPolicy.from_flat(flat, cfg, threshold=-1e30, budget=0.25, final_update=True, **kw).make_cache(model)
        prefill(model, cache, ids)
        cache.end_prefill()
        return [layer.positions[0] for layer in cache.layers]

    cap = resolve_budget(0.25, 100)
    plain, recent = kept(), kept(recent_fraction=0.5)
    newest = set(range(100 - int(0.5 * cap), 100))
    for pos in recent:
        assert pos.shape[-1] == cap
        assert all(newest <= set(head.tolist()) for head in pos)
    assert any(not newest <= set(head.tolist()) for pos in plain for head in pos)  # not so by score alone
    with pytest.raises(ValueError, match="recent_fraction"):
        NAMMPolicy.untrained(cfg, recent_fraction=0.5)          # no budget to protect a part of
    with pytest.raises(ValueError, match="recent_fraction"):
        NAMMPolicy.untrained(cfg, budget=0.25, recent_fraction=1.5)
    with pytest.raises(ValueError, match="recent_fraction='half' must be a number"):
        build_policy({"name": "namm", "path": "untrained", "budget": 0.25, "recent_fraction": "half"})
    assert build_policy({"name": "namm", "path": "untrained", "budget": 0.25, "recent_fraction": 0.25}).recent_fraction == 0.25


@pytest.mark.parametrize("extra", [5, 16, 21])
def test_namm_final_update_on_a_short_tail(models, extra):
    """The end-of-prefill update with fewer than hop (16) new queries has no frame: it must still run."""
    model = models["llama"]
    flat = torch.randn(4172, generator=torch.Generator().manual_seed(1)) * 0.3
    cfg = NAMMConfig(features=FeatureConfig(chunk_size=16, update_interval=32))
    ids = ids_of(64 + extra, seed=3)
    out = greedy_generate(model, ids, None, 4, policy=NAMMPolicy.from_flat(flat, cfg, final_update=True))
    assert len(out.token_ids) == 4 and 0.0 < out.kv_fraction_prefill <= 1.0
    keep_all = greedy_generate(model, ids, None, 4, policy=NAMMPolicy.untrained(cfg, final_update=True))
    assert keep_all.token_ids == greedy_generate(model, ids, None, 4, policy=build_policy({"name": "full"})).token_ids


def test_rollback_crop(models):
    model = models["llama"]
    ids = ids_of(40, seed=12)
    cache = build_policy({"name": "recency", "budget": 24, **SMALL}).make_cache(model)
    with torch.no_grad():
        prefill(model, cache, ids)
    cache.crop(-3)
    assert cache.get_seq_length() == 37 and cache.layers[0].stored == 24 + 8 - 3
    with pytest.raises(ValueError, match="roll back"):
        cache.crop(-20)


def test_policy_config_errors(models):
    with pytest.raises(PolicyConfigError, match="unknown policy"):
        build_policy({"name": "nope"})
    with pytest.raises(PolicyConfigError, match="path"):
        build_policy({"name": "namm"})
    with pytest.raises(PolicyConfigError, match="name"):
        build_policy({"budget": 0.5})
    with pytest.raises(ValueError, match="fraction"):
        build_policy({"name": "h2o", "budget": 1.5})
    with pytest.raises(ValueError, match="budget"):
        build_policy({"name": "h2o"})
    with pytest.raises(ValueError, match="unknown option"):
        build_policy({"name": "h2o", "budget": 4, "bogus": 1})
    assert build_policy({"name": "full", "budget": None}).name == "full"
    model = next(iter(models.values()))
    for cfg in ({"name": "h2o", "budget": 0.5, "update_interval": 0, "final_update": False},
                {"name": "namm", "path": "untrained", "update_interval": 0, "final_update": False}):
        with pytest.raises(CacheConfigError, match=r"would never evict: update_interval=(None|0) and final_update=False"):
            build_policy(cfg).make_cache(model)


def test_sliding_window_models_rejected():
    model = tiny_random("mistral", seed=0, sliding_window=8, layer_types=["sliding_attention"] * 2)[0]
    with pytest.raises(CacheConfigError, match="full-attention"):
        NAMMCache(model, build_policy({"name": "full"}))


def test_attention_backend_required(models):
    model = models["llama"]
    cache = build_policy({"name": "full"}).make_cache(model)
    model.set_attn_implementation("sdpa")
    with pytest.raises(CacheConfigError, match="make_cache"), torch.no_grad():
        model(input_ids=ids_of(4), past_key_values=cache)


def test_policy_yaml_configs_build():
    from pathlib import Path

    from omegaconf import OmegaConf

    paths = sorted((Path(__file__).parents[1] / "configs" / "policy").glob("*.yaml"))
    names = {p.stem for p in paths}
    assert names >= {"full", "namm", "h2o", "l2", "streamingllm", "snapkv", "random", "recency"}
    for path in paths:
        cfg = OmegaConf.load(path)
        assert cfg.name == path.stem
        if cfg.name == "namm":
            with pytest.raises(PolicyConfigError, match="policy.path"):
                build_policy(cfg)
            continue
        policy = build_policy(cfg)
        assert policy.name == cfg.name and policy.chunk_size == 128
        if cfg.name != "full":
            assert policy.update_interval == 512 and policy.budget == 0.25


def test_eos_and_stop_strings(models):
    model = models["llama"]
    tok = tiny_random("llama", seed=0)[1]
    ids = ids_of(30, seed=13)
    free = greedy_generate(model, ids, None, 8, policy=None)
    assert len(free.token_ids) == 8
    eos = greedy_generate(model, ids, None, 8, policy=None, eos_token_ids=free.token_ids[2])
    assert eos.token_ids == free.token_ids[: free.token_ids.index(free.token_ids[2]) + 1]
    text = tok.decode(free.token_ids[:3])
    stop = greedy_generate(model, ids, None, 8, policy=None, stop_strings=[text], tokenizer=tok)
    assert len(stop.token_ids) <= 3 and stop.token_ids == free.token_ids[: len(stop.token_ids)]
    with pytest.raises(ValueError, match="tokenizer"):
        greedy_generate(model, ids, None, 8, stop_strings=["x"])
    with pytest.raises(ValueError, match=r"shape \[1, T\]"):
        greedy_generate(model, ids[0], None, 8)


def test_batches_rejected(models):
    model = models["llama"]
    cache = build_policy({"name": "full"}).make_cache(model)
    with pytest.raises(CacheConfigError, match="one unpadded sequence"), torch.no_grad():
        model(input_ids=torch.zeros(2, 4, dtype=torch.long), past_key_values=cache)


def test_a_dropped_cache_is_freed_at_once(models):
    """A cache and its layers go when the last reference does, not at the cycle collector's next run: the layers
    refer back to their cache weakly, so a loop of prefills (a prompt store fill, a training epoch) does not pile
    up dead caches and their tensors."""
    import gc
    import weakref

    model = models["llama"]
    gc.collect()
    gc.disable()
    try:
        for policy in (Probe(), small_namm(budget=0.5)):
            cache = policy.make_cache(model)
            prefill(model, cache, ids_of(70))
            cache.end_prefill()
            assert cache.layers[0].owner is cache
            refs = [weakref.ref(cache), weakref.ref(cache.layers[0]), weakref.ref(cache.layers[0].keys)]
            del cache
            assert [r() is None for r in refs] == [True, True, True], policy.name
    finally:
        gc.enable()
