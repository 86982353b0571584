"""The Flax draft equals the torch Llama it was converted from; its KV cache equals a full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from experiments.lib.models import tiny_random
from spec_decode.draft import (DraftConfig, forward, hidden_states, init_cache, init_params, params_from_hf, params_to_hf,
                               sample)

from conftest import EPS32


@pytest.fixture(scope="module")
def tiny():
    model, tok = tiny_random("llama", seed=0)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, state


def test_full_copy_matches_torch_logits(tiny):
    model, state = tiny
    cfg = DraftConfig.from_target(model.config.to_dict(), num_layers=2)
    params = params_from_hf(state, cfg)
    ids = np.random.default_rng(0).integers(0, 256, (2, 24))
    ours, _ = forward(cfg, params, jnp.asarray(ids))
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(ours) - theirs).max() < 1e-4


def test_first_layer_draft_matches_truncated_torch_model(tiny):
    model, state = tiny
    cfg = DraftConfig.from_target(model.config.to_dict(), num_layers=1)
    params = params_from_hf(state, cfg)
    one = tiny_random("llama", seed=0, num_hidden_layers=1)[0]
    one.load_state_dict({k: v for k, v in model.state_dict().items() if "layers.1." not in k})
    ids = np.arange(40)[None] % 250
    with torch.no_grad():
        theirs = one(torch.tensor(ids)).logits.numpy()
    assert np.abs(np.asarray(forward(cfg, params, jnp.asarray(ids))[0]) - theirs).max() < 1e-4


def test_cached_decoding_equals_full_forward_with_right_padding(tiny):
    model, state = tiny
    cfg = DraftConfig.from_target(model.config.to_dict(), num_layers=2)
    params = params_from_hf(state, cfg)
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, 12), rng.integers(0, 256, 7)
    prompts = np.zeros((2, 12), np.int32)
    prompts[0], prompts[1, :7] = a, b
    toks = np.asarray(sample(cfg, params, jnp.asarray(prompts), jnp.array([12, 7]), 6, jax.random.PRNGKey(0), 0.0))
    for row, p in ((0, a), (1, b)):  # greedy continuation == torch greedy
        ref = model.generate(torch.tensor([p.tolist()]), max_new_tokens=6, do_sample=False)[0, len(p):]
        assert toks[row].tolist() == ref.tolist()


def test_params_round_trip_and_reduced_head(tiny):
    model, state = tiny
    cfg = DraftConfig.from_target(model.config.to_dict(), num_layers=2)
    params = params_from_hf(state, cfg)
    back = params_to_hf(params)
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])
    vm = jnp.array([3, 10, 77])
    full, _ = forward(cfg, params, jnp.arange(5)[None])
    reduced, _ = forward(cfg, params, jnp.arange(5)[None], vocab_map=vm)
    # the same hidden states times a column subset of the head: hidden_size products in another matmul's order
    h, _ = hidden_states(cfg, params, jnp.arange(5)[None], jnp.arange(5)[None])
    scale = float((np.abs(np.asarray(h)) @ np.abs(np.asarray(params["head"])[:, [3, 10, 77]])).max())
    np.testing.assert_allclose(np.asarray(reduced), np.asarray(full)[..., [3, 10, 77]], rtol=0,
                               atol=cfg.hidden_size * EPS32 * scale)
    toks = sample(cfg, params, jnp.arange(5)[None], jnp.array([5]), 4, jax.random.PRNGKey(0), 1.0, vm)
    assert set(np.asarray(toks).ravel().tolist()) <= {3, 10, 77}


def test_scratch_init_and_bad_config():
    cfg = DraftConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    params = init_params(cfg, jax.random.PRNGKey(0))
    logits, cache = forward(cfg, params, jnp.zeros((1, 3), jnp.int32), cache=init_cache(cfg, 1, 8))
    assert logits.shape == (1, 3, 50) and cache[0][0].shape == (1, 8, 2, 8)
    with pytest.raises(ValueError, match="num_kv_heads"):
        DraftConfig(vocab_size=50, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling"):
        DraftConfig.from_target({"vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_attention_heads": 2,
                                 "rope_scaling": {"rope_type": "llama3"}}, 1)
