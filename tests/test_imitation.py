"""experiments.studies.imitation: fitting a NAMM scorer to a baseline's keep decisions, on the tiny Llama."""

import json

import numpy as np
import pytest

from namm.config import FeatureConfig, NAMMConfig, SelectionConfig
from namm.scoring import zeros


@pytest.fixture(scope="module")
def init_policy(tmp_path_factory):
    """An all-zero BAM NAMM exported for the tiny Llama, trained cap 0.5, one eviction at the end of the prefill."""
    from experiments.lib.models import model_signature, tiny_random
    from namm.export import save_pretrained

    sig = model_signature(tiny_random("llama", seed=0)[0])
    cfg = NAMMConfig(features=FeatureConfig(update_interval=64, chunk_size=64),
                     selection=SelectionConfig(threshold=-1e30))
    base = {"name": "tiny_random", **{k: sig[k] for k in ("num_layers", "num_kv_heads", "num_q_heads", "head_dim")}}
    return save_pretrained(tmp_path_factory.mktemp("init") / "policy", np.asarray(zeros(cfg)), cfg, None, base,
                           trained_budget=0.5, trained_schedule={"update_interval": 0, "final_update": True})


def _run(init_policy, out, *extra):
    from experiments.studies import imitation

    return imitation.main(["--model", "tiny_random", "--init", str(init_policy), "--tasks", "passkey",
                           "--context-length", "256", "--train", "2", "--heldout", "1", "--steps", "25",
                           "--batch", "2", "--pairs", "64", "--lr", "0.03", "--compare", "h2o",
                           "--max-answer-tokens", "4", "--out-dir", str(out), *extra])


def test_the_fit_moves_the_scorer_towards_the_teacher_and_exports_it(init_policy, tmp_path, one_torch_thread, capsys):
    from namm.torch.policy import NAMMPolicy

    assert _run(init_policy, tmp_path / "a") == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("imitation_overlap_heldout: ")
    r = json.loads((tmp_path / "a" / "imitation.json").read_text())
    p = r["policies"]
    initial, fitted = p[f"NAMM {init_policy} (initial)"], p["NAMM fitted to snapkv"]
    assert p["snapkv"]["overlap_heldout"] == 1.0                      # the teacher against itself
    assert 0.0 < p["h2o"]["overlap_heldout"] < 1.0
    assert fitted["overlap_train"] > initial["overlap_train"]         # the fit learned the teacher's ranking
    assert np.mean(r["loss"][-5:]) < np.mean(r["loss"][:5]) < 0.7     # softplus(0) = 0.693 at the all-zero start
    policy = NAMMPolicy.from_pretrained(r["export_dir"])              # the export loads as a runtime policy
    assert policy.budget == 0.5 and policy.update_interval == 0
    assert (tmp_path / "a" / "imitation_loss.png").stat().st_size > 0
    assert _run(init_policy, tmp_path / "b") == 0                      # seeded: the same numbers twice
    assert json.loads((tmp_path / "b" / "imitation.json").read_text())["policies"] == p


def test_bad_settings_are_refused_in_one_line(init_policy, tmp_path, capsys):
    from experiments.studies import imitation

    assert imitation.main(["--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert _run(init_policy, tmp_path / "c", "--budget", "1.0") == 2  # the teacher keeps every token
    assert "nothing to rank" in capsys.readouterr().err


def test_pool_kernel_widens_the_init_and_exports_a_pooled_policy(init_policy, tmp_path, one_torch_thread, capsys):
    from namm.torch.policy import NAMMPolicy

    assert _run(init_policy, tmp_path / "p", "--pool-kernel", "5") == 0
    r = json.loads((tmp_path / "p" / "imitation.json").read_text())
    fitted = r["policies"]["NAMM fitted to snapkv"]
    assert fitted["overlap_train"] > r["policies"][f"NAMM {init_policy} (initial)"]["overlap_train"]
    assert NAMMPolicy.from_pretrained(r["export_dir"]).cfg.features.pool_kernel == 5
    capsys.readouterr()
    assert _run(init_policy, tmp_path / "q", "--pool-kernel", "4") == 2
    assert "pool_kernel" in capsys.readouterr().err


def test_ema_coeff_recalibrates_the_normalisation_and_exports_it(init_policy, tmp_path, one_torch_thread, capsys):
    from namm.export import load_pretrained

    assert _run(init_policy, tmp_path / "e", "--pool-kernel", "5", "--ema-coeff", "0.9") == 0
    r = json.loads((tmp_path / "e" / "imitation.json").read_text())
    _, cfg, (mean, var), _ = load_pretrained(r["export_dir"])
    assert cfg.features.ema_coeff == 0.9 and cfg.features.pool_kernel == 5
    assert np.all(np.isfinite(mean)) and np.all(var > 0) and np.any(mean != 0)  # calibrated, not the init's none
    capsys.readouterr()
    assert _run(init_policy, tmp_path / "f", "--ema-coeff", "1.0") == 2
    assert "ema_coeff" in capsys.readouterr().err
