"""KV-statistics shard format: round trip, validation, fingerprint refusal, storage cost."""

import numpy as np
import pytest

from namm import stats
from namm.shards import ShardError


def _prompt(t=40, task="passkey", _id="a/1", layers=(0, 2)):
    rng = np.random.default_rng(0)
    return stats.PromptStats(q=rng.normal(size=(len(layers), 4, t, 8)), k=rng.normal(size=(len(layers), 2, t, 8)),
                             v=rng.normal(size=(len(layers), 2, t, 8)), layers=np.asarray(layers), task=task,
                             id=_id, context_len=t - 10, question_len=6, answer_len=4, score=0.5, answer="42")


def test_round_trip_fp16_and_resume(tmp_path):
    fp = stats.fingerprint({"name": "m", "num_layers": 3}, [0, 2], chat=False)
    store = stats.open_store(tmp_path, fp)
    p = _prompt()
    name = stats.write_prompt(store, p)
    assert name == "passkey-a_1" and store.has(name)
    back = stats.read_prompt(stats.open_store(tmp_path), name)
    assert back.q.dtype == np.float16 and back.q.shape == (2, 4, 40, 8)
    np.testing.assert_array_equal(back.k, p.k.astype(np.float16))           # stored as float16: read back bit for bit
    assert (back.context_len, back.question_len, back.answer_len, back.score) == (30, 6, 4, 0.5)
    assert back.prompt_len == 36 and back.num_tokens == 40
    # 2 layers x (4 + 2 + 2 heads) x 8 dims x 2 bytes per token, plus a small header
    per_1k = stats.bytes_per_prompt_per_1k(store)
    assert 2 * 8 * 8 * 2 * 1000 < per_1k < 1.2 * 2 * 8 * 8 * 2 * 1000 + 30000
    s = stats.summary(tmp_path)
    assert s["prompts"] == 1 and s["tasks"] == ["passkey"] and s["mean_full_cache_score"] == 0.5


def test_other_model_refused_and_bad_prompt_rejected(tmp_path):
    stats.open_store(tmp_path, stats.fingerprint({"name": "m"}, [0, 2]))
    with pytest.raises(ShardError, match="another model or config"):
        stats.open_store(tmp_path, stats.fingerprint({"name": "other"}, [0, 2]))
    bad = _prompt()
    bad.answer_len = 5
    with pytest.raises(ShardError, match="spans"):
        bad.validate()
    with pytest.raises(ShardError, match="run python -m experiments.extract"):
        stats.load_prompts(tmp_path)
