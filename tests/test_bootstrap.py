"""The 95 % bootstrap interval of the normalised score: paired over prompts, seeded, around the point estimate."""

import numpy as np
import pytest

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


def _pred(task, i, label, score, length=1024):
    return {"task": task, "length": length, "_id": f"{task}-{i}", "label": label, "policy": label.split("@")[0],
            "score": score}


def test_paired_bootstrap_and_tables_intervals(tmp_path):
    """Every column is resampled on the same prompts: a policy equal to the full cache has the interval [1, 1], a
    policy ahead of another on every prompt has a paired difference interval above 0 although their own
    intervals overlap, and ``python -m experiments.tables --intervals`` writes both."""
    import json

    import numpy as np

    from experiments import tables
    from experiments.lib.reporting import normalised_scores, paired_bootstrap

    rng = np.random.default_rng(0)
    preds = []
    for task in ("passkey", "lcc"):
        full = rng.uniform(20, 100, 12)
        for i, (f, b) in enumerate(zip(full, rng.uniform(0, 40, 12))):
            preds += [_pred(task, i, "full", f), _pred(task, i, "copy@0.5", f),
                      _pred(task, i, "a@0.5", b + 1), _pred(task, i, "b@0.5", b)]
    point, draws, prompts, means = paired_bootstrap(preds, n_boot=500, seed=1)
    assert means["copy@0.5"] == means["full"] and set(means["a@0.5"]) == {"passkey@1024", "lcc@1024"}
    assert point["copy@0.5"] == 1.0 and prompts["a@0.5"] == 24
    assert set(draws) == {"copy@0.5", "a@0.5", "b@0.5"}
    np.testing.assert_array_equal(draws["copy@0.5"], 1.0)
    assert (draws["a@0.5"] > draws["b@0.5"]).all()
    iv = tables.intervals(preds, versus="b@0.5", n_boot=500, seed=1)
    assert iv["copy@0.5"]["ci95"] == [1.0, 1.0] and iv["a@0.5"]["p_ahead"] == 1.0
    assert iv["a@0.5"]["diff_ci95"][0] > 0 and iv["a@0.5"]["ci95"][0] < iv["b@0.5"]["ci95"][1]  # paired vs overlap
    rows = [{"task": t, "length": 1024, "policy": lab.split("@")[0], "label": lab, "budget": 0.5, "n": 12,
             "score": float(np.mean([p["score"] for p in preds if p["task"] == t and p["label"] == lab]))}
            for t in ("passkey", "lcc") for lab in ("full", "copy@0.5", "a@0.5", "b@0.5")]
    assert iv["a@0.5"]["normalised"] == pytest.approx(normalised_scores(rows)["a@0.5"], abs=1e-4)
    assert iv["a@0.5"]["ci95"][0] < iv["a@0.5"]["normalised"] < iv["a@0.5"]["ci95"][1]
    # a method that ran only some prompts of a row: every method is compared on those prompts only
    part = [p for p in preds if not (p["label"] == "b@0.5" and p["task"] == "lcc" and int(p["_id"].split("-")[1]) >= 6)]
    assert tables.intervals(part, n_boot=50)["a@0.5"]["prompts"] == 12 + 6
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert tables.main([str(run), "--intervals", "--versus", "b@0.5"]) == 0
    assert "minus b@0.5" in (run / "intervals.md").read_text()
    assert json.loads((run / "intervals.json").read_text())["a@0.5"]["p_ahead"] == 1.0
    # the same prompt under one label scored differently by two runs: an error, not a silent merge
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.jsonl").write_text((run / "results.jsonl").read_text())
    bad = [dict(p, score=p["score"] + 1) if p["label"] == "a@0.5" else p for p in preds]
    (other / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in bad))
    with pytest.raises(tables.TablesError, match="two different runs under one label"):
        tables.read_predictions([run, other])
    assert tables.main([str(run), "--intervals", "--versus", "nope"]) == 2
    with pytest.raises(tables.TablesError, match=r"no run directory or results file at .*missing"):
        tables.read_predictions([tmp_path / "missing"])
