"""Extraction on the tiny random model: recorded q/k/v are the model's post-RoPE tensors; rerun skips;
another model is refused."""

import numpy as np
import pytest
import torch

from experiments.extract import ExtractError, extract, record_qkv, resolve_layers
from experiments.lib.models import tiny_random
from experiments.tasks import load_task
from namm import stats
from namm.shards import ShardError

from conftest import EPS32, U16


@pytest.fixture(scope="module")
def tiny():
    return tiny_random("llama", seed=0)


def test_recorded_qkv_are_post_rope_and_match_eager_attention(tiny):
    model, tok = tiny
    ids = tok("The pass key is 12345. Remember it.")["input_ids"]
    q, k, v = record_qkv(model, ids, [0, 1])
    assert q.shape == (2, 4, len(ids), 16) and k.shape == (2, 2, len(ids), 16) and q.dtype == np.float16
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=True)
    # float16 storage of the float32 tensors: relative 2^-11 (+ a few float32 ulps of the recording pass, and
    # half the float16 subnormal spacing near 0)
    tol = dict(rtol=U16 + 8 * EPS32, atol=2.0 ** -25)
    for l in (0, 1):                                   # keys and values as cached (post-RoPE)
        np.testing.assert_allclose(k[l], out.past_key_values.layers[l].keys[0].numpy(), **tol)
        np.testing.assert_allclose(v[l], out.past_key_values.layers[l].values[0].numpy(), **tol)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    t = len(ids)
    for l in (0, 1):                                   # softmax(q k^T / sqrt d) from the recorded queries
        qq, kk = q[l].astype(np.float32), np.repeat(k[l].astype(np.float32), 2, axis=0)
        logits = qq @ kk.transpose(0, 2, 1) / 4.0
        logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        # q and k stored as float16 (relative 2^-11 each) move a logit by <= 2^-10 sum|q_i k_i| / 4, and a softmax
        # probability by <= 2 p max|d logit| of its row; plus float32 rounding of the 16-term logits
        dl = 2 * U16 * (np.abs(qq) @ np.abs(kk).transpose(0, 2, 1) / 4.0)
        dl = np.where(np.tril(np.ones((t, t), bool)), dl, 0).max(-1, keepdims=True)
        bound = 2 * p * dl + 64 * EPS32
        assert (np.abs(p - att[l][0].numpy()) <= bound).all(), np.abs(p - att[l][0].numpy()).max()


def test_extract_writes_resumes_and_refuses_other_model(tiny, tmp_path):
    model, tok = tiny
    rows = load_task({"name": "passkey", "n": 2, "context_lengths": [256], "seed": 0}, tok, split="train")
    s = extract(model, tok, rows, tmp_path, layers=[1], chat=False, max_context=4096, progress=False)
    assert s["prompts"] == 2 and s["extracted_now"] == 2 and s["layers"] == [1]
    assert s["bytes_per_prompt_per_1k_tokens"] > 0
    p = stats.load_prompts(tmp_path)[0]
    assert p.q.shape[0] == 1 and p.answer_len >= 1 and 0.0 <= p.score <= 1.0
    assert p.context_len + p.question_len > 200
    again = extract(model, tok, rows, tmp_path, layers=[1], chat=False, max_context=4096, progress=False)
    assert again["extracted_now"] == 0                   # finished shards are skipped
    with pytest.raises(ShardError, match="another model or config"):
        extract(model, tok, rows, tmp_path, layers=[0, 1], chat=False, max_context=4096, progress=False)


def test_layer_selection():
    assert resolve_layers(None, 4) == [0, 1, 2, 3]
    assert resolve_layers(6, 30) == [0, 6, 12, 17, 23, 29]
    with pytest.raises(ExtractError, match="layers"):
        resolve_layers([0, 40], 30)
