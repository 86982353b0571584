"""The 95 % bootstrap interval of the normalised score: paired over prompts, seeded, around the point estimate."""

import numpy as np

from experiments.lib import reporting


def _preds(scores_by_label: dict[str, list[float]], task="passkey", length=1024):
    return [{"task": task, "length": length, "_id": f"{task}-{i}", "label": label, "policy": label.split("@")[0],
             "budget": None, "score": s, "kv_fraction_prefill": 1.0, "kv_fraction_decode": 1.0, "prompt_tokens": 9,
             "wall_s": 0.0} for label, scores in scores_by_label.items() for i, s in enumerate(scores)]


def test_interval_is_seeded_paired_and_holds_the_point_estimate():
    rng = np.random.default_rng(0)
    full = rng.integers(0, 2, 40).astype(float)
    half = full * (rng.random(40) < 0.5)                      # loses about half of the full cache's hits
    preds = _preds({"full": list(full), "h2o@0.5": list(half), "same@0.5": list(full)}) + _preds(
        {"full": [1.0] * 10, "h2o@0.5": [1.0] * 5 + [0.0] * 5, "same@0.5": [1.0] * 10}, task="lcc")
    ci = reporting.bootstrap_normalised(preds, seed=3)
    assert ci == reporting.bootstrap_normalised(preds, seed=3)                      # seeded
    assert ci["same@0.5"] == (1.0, 1.0)               # paired: scored on the same draw as the full cache
    point = reporting.normalised_scores(reporting.aggregate(preds))["h2o@0.5"]
    lo, hi = ci["h2o@0.5"]
    assert lo < point < hi and hi - lo < 0.6 and "full" not in ci
    table = reporting.markdown_table(reporting.aggregate(preds), ci)
    assert f"| normalised 95 % interval (bootstrap over prompts) | | - | {lo:.3f}-{hi:.3f} | 1.000-1.000 |" in table


def test_task_rows_whose_full_cache_scores_zero_are_left_out_as_in_the_point_estimate():
    preds = _preds({"full": [0.0, 0.0], "h2o@0.5": [1.0, 1.0]}) + _preds({"full": [1.0, 1.0], "h2o@0.5": [1.0, 0.0]},
                                                                       task="lcc")
    lo, hi = reporting.bootstrap_normalised(preds, seed=0)["h2o@0.5"]
    assert reporting.normalised_scores(reporting.aggregate(preds))["h2o@0.5"] == 0.5
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0
