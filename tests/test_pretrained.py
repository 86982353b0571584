"""Bundled policies (namm/pretrained): loadable by name, intact, recorded for SmolLM2, documented."""

import json

import pytest
import torch

from namm import pretrained
from namm.torch.policy import NAMMPolicy, PolicyFormatError

SMOLLM2 = {"name": "smollm2", "num_layers": 30, "num_kv_heads": 3, "num_q_heads": 9, "head_dim": 64}


def test_bundled_policies_are_listed():
    assert {"smollm2-i1", "smollm2-agree50", "smollm2-agree25"} <= set(pretrained.available())


@pytest.mark.parametrize("name", pretrained.available())
def test_bundled_policy_loads_by_name(name):
    path = pretrained.PRETRAINED_DIR / name
    meta = json.loads((path / "config.json").read_text())
    assert meta["base_model"] == SMOLLM2 and meta["weights_sha256"]         # checksum verified on load
    readme = (path / "README.md").read_text()
    assert "python -m experiments.train_namm" in readme                      # says how it was trained
    policy = NAMMPolicy.from_pretrained(name)
    assert policy.base_model == SMOLLM2
    assert policy.budget == meta.get("trained_budget")                       # a capped policy runs at its cap
    flat = torch.cat([p.flatten() for p in policy.params.values()])
    size = {0: 4172, 5: 6943}[policy.cfg.features.pool_kernel]              # the paper's BAM; with pooled features
    assert flat.shape == (size,) and float(flat.abs().max()) > 0             # trained, not the all-zero init


def test_a_path_on_disk_wins_and_unknown_names_fail_clearly(tmp_path):
    (tmp_path / "smollm2-i1").mkdir()
    assert pretrained.resolve(tmp_path / "smollm2-i1") == tmp_path / "smollm2-i1"
    assert pretrained.resolve("smollm2-i1") == pretrained.PRETRAINED_DIR / "smollm2-i1"
    with pytest.raises(PolicyFormatError, match=r"no bundled policy of that name \(bundled: .*smollm2-i1"):
        NAMMPolicy.from_pretrained("smollm2-nope")


@pytest.mark.slow
def test_bundled_policy_runs_on_smollm2_at_its_cap_and_schedule(tmp_path):
    """`policy=namm policy.path=smollm2-agree50` on the real model: one eviction at the end of the prefill, to 50 %."""
    from hydra import compose, initialize_config_dir

    from experiments.lib import reporting
    from experiments.evaluate import run

    configs = str(pretrained.PRETRAINED_DIR.parents[1] / "configs")
    with initialize_config_dir(config_dir=configs, version_base=None):
        cfg = compose("evaluate", overrides=[
            "model=smollm2", "task=passkey", "task.n=1", "task.context_lengths=[512]", "split=all",
            "policy=namm", "policy.path=smollm2-agree50", f"output_dir={tmp_path}",
            "logging.wandb_mode=disabled", "progress=false"])
    run(cfg)
    (pred,) = reporting.read_jsonl(tmp_path / "predictions.jsonl")
    assert pred["policy"] == "namm" and pred["prediction"].strip()
    assert pred["kv_fraction_prefill"] == pytest.approx(0.5, abs=0.01)      # the trained cap, applied once
