"""Policy directory: JAX-side export, torch-side load, and a clear error for every bad file."""

import json

import numpy as np
import pytest
import torch

from experiments.lib.models import tiny_random
from namm.config import FeatureConfig, NAMMConfig, SelectionConfig
from namm.export import ExportError, load_pretrained, save_pretrained
from namm.scoring import num_params
from namm.torch import build_policy, greedy_generate
from namm.torch.cache import CacheConfigError, model_signature
from namm.torch.policy import NAMMPolicy, PolicyFormatError, calibrate_norm_stats

CFG = NAMMConfig(features=FeatureConfig(chunk_size=16, update_interval=32), selection=SelectionConfig(top_k=500))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_random("llama", seed=0)[0]


def export(path, model, shared=True, flat=None):
    rng = np.random.default_rng(0)
    p = num_params(CFG)
    if flat is None:
        flat = rng.normal(size=p if shared else (2, 2, p)).astype(np.float32) * 0.3
    norm = (rng.random(17).astype(np.float32) * 0.01, rng.random(17).astype(np.float32) * 1e-3 + 1e-5)
    save_pretrained(path, flat, CFG, norm, model_signature(model), shared_across_layers_heads=shared)
    return flat, norm


def test_round_trip(tmp_path, model):
    flat, norm = export(tmp_path / "p", model)
    meta = json.loads((tmp_path / "p" / "config.json").read_text())
    assert meta["format_version"] == 1 and meta["num_params"] == 4172
    assert meta["base_model"]["num_layers"] == 2 and meta["namm"]["selection"]["top_k"] == 500
    assert meta["param_layout"][0] == ["bam.qkv.weight", [25, 96]]
    policy = NAMMPolicy.from_pretrained(tmp_path / "p")
    assert policy.cfg == CFG
    same = NAMMPolicy.from_flat(torch.from_numpy(flat), CFG, (torch.from_numpy(norm[0]), torch.from_numpy(norm[1])))
    for name, value in same.params.items():
        assert torch.equal(policy.params[name], value)
    torch.testing.assert_close(policy.norm[0], same.norm[0], rtol=0, atol=0)   # float32 written and read back: exact
    back, cfg, (mean, var), _ = load_pretrained(tmp_path / "p")
    assert cfg == CFG and np.array_equal(back, flat) and np.array_equal(var, norm[1])
    # the loaded policy runs, and builds from a Hydra-style config
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(0))
    out = greedy_generate(model, ids, None, 4, policy=build_policy({"name": "namm", "path": str(tmp_path / "p")}))
    ref = greedy_generate(model, ids, None, 4, policy=same)
    assert out.token_ids == ref.token_ids and out.stored_tokens == ref.stored_tokens


def test_trained_budget_is_the_default_runtime_cap(tmp_path, model):
    rng = np.random.default_rng(1)
    flat = rng.normal(size=num_params(CFG)).astype(np.float32)
    norm = (np.zeros(17, np.float32), np.ones(17, np.float32))
    save_pretrained(tmp_path / "p", flat, CFG, norm, model_signature(model), trained_budget=0.5)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["trained_budget"] == 0.5
    assert NAMMPolicy.from_pretrained(tmp_path / "p").budget == 0.5
    assert NAMMPolicy.from_pretrained(tmp_path / "p", budget=0.25).budget == 0.25   # an explicit budget wins
    assert build_policy({"name": "namm", "path": str(tmp_path / "p")}).budget == 0.5
    export(tmp_path / "q", model)
    assert NAMMPolicy.from_pretrained(tmp_path / "q").budget is None                 # no cap unless trained with one


def test_trained_schedule_is_the_default_runtime_schedule(tmp_path, model):
    flat = np.zeros(num_params(CFG), np.float32)
    save_pretrained(tmp_path / "p", flat, CFG, None, model_signature(model),
                    trained_schedule={"update_interval": 0, "final_update": True})
    p = NAMMPolicy.from_pretrained(tmp_path / "p")
    assert (p.update_interval, p.final_update, p.chunk_size) == (0, True, CFG.features.chunk_size)
    p = build_policy({"name": "namm", "path": str(tmp_path / "p"), "update_interval": 512, "final_update": False})
    assert (p.update_interval, p.final_update) == (512, False)                      # explicit knobs win
    with pytest.raises(ExportError, match="trained_schedule"):
        save_pretrained(tmp_path / "r", flat, CFG, None, model_signature(model), trained_schedule={"budget": 1})


def test_bad_files(tmp_path, model):
    export(tmp_path / "p", model)
    weights = tmp_path / "p" / "model.safetensors"
    config = tmp_path / "p" / "config.json"
    blob = weights.read_bytes()
    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(PolicyFormatError, match="truncated or corrupted"):
        NAMMPolicy.from_pretrained(tmp_path / "p")
    bad = bytearray(blob)
    bad[-5] ^= 0xFF
    weights.write_bytes(bytes(bad))
    with pytest.raises(PolicyFormatError, match="truncated or corrupted"):
        NAMMPolicy.from_pretrained(tmp_path / "p")
    weights.write_bytes(blob)
    meta = json.loads(config.read_text())
    config.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(PolicyFormatError, match="unknown format_version 99"):
        NAMMPolicy.from_pretrained(tmp_path / "p")
    for key in ["norm_stats", "namm", "format_version"]:
        config.write_text(json.dumps({k: v for k, v in meta.items() if k != key}))
        with pytest.raises(PolicyFormatError, match=f"missing key '{key}'"):
            NAMMPolicy.from_pretrained(tmp_path / "p")
    config.write_text(json.dumps(meta)[:40])
    with pytest.raises(PolicyFormatError, match="not valid JSON"):
        NAMMPolicy.from_pretrained(tmp_path / "p")
    with pytest.raises(PolicyFormatError, match="no such directory"):
        NAMMPolicy.from_pretrained(tmp_path / "missing")
    with pytest.raises(ExportError, match="params_flat has shape"):
        save_pretrained(tmp_path / "q", np.zeros(10), CFG, None, model_signature(model))


def test_per_layer_params_need_the_same_model(tmp_path, model):
    export(tmp_path / "own", model, shared=False)
    policy = NAMMPolicy.from_pretrained(tmp_path / "own")
    assert policy.params["bam.qkv.weight"].shape == (2, 2, 25, 96)
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    assert len(greedy_generate(model, ids, None, 3, policy=policy).token_ids) == 3
    other = tiny_random("llama", seed=0, num_hidden_layers=3)[0]
    with pytest.raises(CacheConfigError, match="per-layer/per-head parameters for 2 layers"):
        policy.make_cache(other)
    export(tmp_path / "shared", model, shared=True)
    NAMMPolicy.from_pretrained(tmp_path / "shared").make_cache(other)  # shared parameters transfer


def test_untrained_and_calibration(model):
    ids = [torch.randint(0, 256, (1, 80), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    mean, var = calibrate_norm_stats(model, ids, CFG, progress=False)
    assert mean.shape == var.shape == (17,) and torch.all(var > 0) and torch.all(mean > 0)
    policy = NAMMPolicy.untrained(CFG, (mean, var))
    full = greedy_generate(model, ids[0], None, 6, policy=None)
    out = greedy_generate(model, ids[0], None, 6, policy=policy)
    assert out.token_ids == full.token_ids and out.kv_fraction_decode == 1.0
    with pytest.raises(ValueError, match="no policy update"):
        calibrate_norm_stats(model, [ids[0][:, :10]], CFG, progress=False)


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
            if node.module == "namm":
                names |= {f"namm.{a.name}" for a in node.names}
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("namm."):
            names.add(node.module)
    return names


def test_framework_separation():
    """The runtime never imports JAX (also not through the namm modules it uses); the export never imports torch."""
    from pathlib import Path

    root = Path(__file__).parents[1]
    framework_free = {"namm.config": "namm/config.py", "namm.shards": "namm/shards.py", "namm.registry": "namm/registry.py",
                      "namm.pretrained": "namm/pretrained/__init__.py", "experiments.lib.cli": "experiments/lib/cli.py"}
    for module in framework_free.values():
        assert not _imports(root / module) & {"jax", "flax", "torch"}, module
    runtime = sorted((root / "namm" / "torch").rglob("*.py")) + sorted((root / "spec_decode" / "torch").rglob("*.py"))
    assert any(p.parent.name == "baselines" for p in runtime)           # the subpackages are searched too
    for path in runtime:
        names = _imports(path)
        assert not names & {"jax", "flax", "optax", "evosax"}, path
        other = {n for n in names if n.startswith("namm.") and not n.startswith("namm.torch")}
        assert other <= set(framework_free), (path, other)
    jax_side = [root / "namm" / "export.py", *sorted((root / "namm" / "baselines").rglob("*.py"))]
    for path in jax_side:
        assert "torch" not in {n.split(".")[0] for n in _imports(path)}, path
