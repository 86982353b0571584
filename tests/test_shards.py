"""The shard store: atomic writes, resume, fingerprint refusal, corruption detection."""

import json

import numpy as np
import pytest

from namm.shards import ShardError, ShardStore, atomic_write_json


def _arrays(seed):
    rng = np.random.default_rng(seed)
    return {"keys": rng.standard_normal((2, 3, 4)).astype(np.float16), "pos": np.arange(4, dtype=np.int32)}


def test_round_trip_and_resume(tmp_path):
    fp = {"model": "tiny", "layers": [0, 1]}
    store = ShardStore(tmp_path, "kv_stats", fp)
    store.write("p000", _arrays(0), {"prompt": 0})
    # a new process opening the same directory sees the finished shard and can skip it
    again = ShardStore(tmp_path, "kv_stats", {"layers": [0, 1], "model": "tiny"})
    assert again.has("p000") and not again.has("p001")
    arrays, meta = again.read("p000")
    np.testing.assert_array_equal(arrays["keys"], _arrays(0)["keys"])
    assert arrays["keys"].dtype == np.float16 and meta == {"prompt": 0}
    assert again.total_bytes() == (tmp_path / "p000.safetensors").stat().st_size
    # no temporary files are left behind
    assert not list(tmp_path.glob(".*tmp"))


def test_other_fingerprint_is_refused_with_the_differing_key(tmp_path):
    ShardStore(tmp_path, "kv_stats", {"model": "tiny", "layers": [0, 1]})
    with pytest.raises(ShardError, match=r"model: stored='tiny' requested='smollm2'"):
        ShardStore(tmp_path, "kv_stats", {"model": "smollm2", "layers": [0, 1]})
    with pytest.raises(ShardError, match="holds 'kv_stats' shards, not 'teacher'"):
        ShardStore(tmp_path, "teacher", {"model": "tiny", "layers": [0, 1]})


def test_truncated_shard_is_detected(tmp_path):
    store = ShardStore(tmp_path, "teacher", {"model": "tiny"})
    store.write("s0", _arrays(1))
    path = tmp_path / "s0.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ShardError, match="corrupt or truncated"):
        store.read("s0")
    with pytest.raises(ShardError, match="cannot be read"):
        store.read("s0", verify=False)


def test_unknown_version_and_missing_store(tmp_path):
    atomic_write_json(tmp_path / "manifest.json", {"format": "namm-shards", "version": 99, "kind": "kv_stats",
                                                   "fingerprint": {}, "shards": {}})
    with pytest.raises(ShardError, match="version 99"):
        ShardStore(tmp_path, "kv_stats", {})
    with pytest.raises(ShardError, match="run the extraction first"):
        ShardStore(tmp_path / "nothing", "kv_stats", None)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        ShardStore(tmp_path, "kv_stats", {})


def test_manifest_is_plain_json(tmp_path):
    store = ShardStore(tmp_path, "kv_stats", {"model": "tiny"})
    store.write("a", _arrays(2), {"n_tokens": 4})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"]["a"]["meta"] == {"n_tokens": 4}
    assert len(manifest["shards"]["a"]["sha256"]) == 64
