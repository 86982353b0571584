"""Metrics always reach the local JSONL file; wandb runs offline or not at all."""

import numpy as np
import pytest

from experiments.lib.tracking import Tracker, read_metrics


def test_jsonl_is_written_and_appended_on_resume(tmp_path):
    t = Tracker(tmp_path, {"seed": 0}, mode="disabled")
    t.log({"fitness/mean": np.float32(0.5), "n": np.int64(3)}, step=0)
    t.close()
    t = Tracker(tmp_path, {"seed": 0}, mode="disabled")
    t.log({"fitness/mean": 0.75}, step=1)
    t.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "fitn')  # a run killed mid-line
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["fitness/mean"] == 0.5 and rows[0]["n"] == 3 and rows[1]["fitness/mean"] == 0.75


def test_bad_mode_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="wandb_mode='offlne'"):
        Tracker(tmp_path, mode="offlne")
