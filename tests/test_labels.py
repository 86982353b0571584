"""Every policy run has a unique label that says what it is; two different runs never merge into one column."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments import tables
from experiments.evaluate import EvaluateError, label_runs, policy_runs, run
from experiments.lib import reporting

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
FULL = {"name": "full", "budget": None}
TWO_NAMMS = ["h2o", "snapkv", "streamingllm", {"name": "namm", "path": "smollm2-agree50"},
             {"name": "namm", "path": "smollm2-i1", "threshold": -1.0e+30, "update_interval": 0, "final_update": True}]


def test_two_namms_get_two_columns_named_by_what_differs():
    runs = policy_runs(FULL, TWO_NAMMS, [0.5])
    assert [r["label"] for r in runs] == [
        "full", "h2o@0.5", "snapkv@0.5", "streamingllm@0.5", "namm[smollm2-agree50]@0.5",
        "namm[smollm2-i1,threshold=-1e+30,update_interval=0,final_update=true]@0.5"]
    assert runs[4]["method"] == "namm[smollm2-agree50]" and runs[4]["path"] == "smollm2-agree50"


def test_a_policy_run_once_keeps_its_bare_name_and_a_label_key_wins():
    runs = policy_runs({"name": "h2o", "budget": None}, [{"name": "namm", "path": "untrained", "label": "zero"}],
                       [0.5, 0.25])
    assert [r["label"] for r in runs] == ["h2o@0.5", "h2o@0.25", "zero@0.5", "zero@0.25"]


def test_same_basename_in_two_run_directories_is_told_apart_by_the_parent():
    runs = policy_runs({"name": "namm", "path": "runs/a/namm_policy"}, [{"name": "namm", "path": "runs/b/namm_policy"}],
                       [0.5])
    assert [r["label"] for r in runs] == ["namm[a/namm_policy]@0.5", "namm[b/namm_policy]@0.5"]


def test_the_same_run_twice_runs_once_and_two_different_runs_under_one_label_are_an_error():
    assert [r["label"] for r in policy_runs({"name": "h2o"}, ["h2o"], [0.5])] == ["h2o@0.5"]
    with pytest.raises(EvaluateError, match=r"both be labelled 'mine@0.5'.*\"name\": \"h2o\".*\"name\": \"l2\""):
        policy_runs(FULL, [{"name": "h2o", "label": "mine"}, {"name": "l2", "label": "mine"}], [0.5])
    with pytest.raises(EvaluateError, match="give each a label of its own"):
        label_runs([{"name": "h2o", "budget": 0.5, "label": "x"}, {"name": "h2o", "budget": 0.5, "label": "x",
                                                                   "skip_layers": 2}])


def _cfg(out, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose("evaluate", overrides=["model=tiny_random", f"output_dir={out}", "logging.wandb_mode=disabled",
                                              "progress=false", "task=builtin", "task.tasks=[passkey]", "task.n=1",
                                              "task.context_lengths=[320]", "split=all", *overrides])


def test_evaluate_writes_one_column_per_run_with_its_config_and_refuses_to_resume_another(tmp_path, capsys):
    """Two NAMMs that differ only in their schedule: two columns, each results row traceable to its config; a
    rerun that changes the config behind a label is refused and leaves the predictions file as it was."""
    two = ("compare=[{name:namm,path:untrained,chunk_size:32,update_interval:64},"
           "{name:namm,path:untrained,chunk_size:32,update_interval:128}]")
    run(_cfg(tmp_path, two))
    results = reporting.read_jsonl(tmp_path / "results.jsonl")
    by = {r["label"]: r for r in results}
    assert set(by) == {"full", "namm[update_interval=64]", "namm[update_interval=128]"}
    assert by["namm[update_interval=128]"]["policy_config"]["update_interval"] == 128
    assert by["namm[update_interval=128]"]["policy_config"]["path"] == "untrained"
    assert "| task | n | full | namm[update_interval=128] | namm[update_interval=64] |" in (
        tmp_path / "results.md").read_text()
    before = (tmp_path / "predictions.jsonl").read_bytes()
    changed = two.replace("update_interval:128}", "update_interval:128,label:'namm[update_interval=64]'}")
    with pytest.raises(EvaluateError, match=r"already holds predictions labelled 'namm\[update_interval=64\]'"):
        run(_cfg(tmp_path, changed.replace("update_interval:64}", "update_interval:96}")))
    assert (tmp_path / "predictions.jsonl").read_bytes() == before
    capsys.readouterr()


def test_tables_refuse_to_merge_two_configs_under_one_label(tmp_path, capsys):
    def results(name, update_interval):
        row = {"task": "passkey", "length": 320, "policy": "namm", "budget": None, "label": "namm", "method": "namm",
               "policy_config": {"name": "namm", "path": "untrained", "update_interval": update_interval},
               "score": 50.0, "kv_fraction": 1.0, "n": 1}
        path = tmp_path / name / "results.jsonl"
        path.parent.mkdir()
        path.write_text(json.dumps(row) + "\n")
        return str(path)

    a, b, same = results("a", 64), results("b", 128), results("c", 64)
    assert tables.main([a, same, "--out", str(tmp_path / "ok")]) == 0          # one config: one column
    assert tables.main([a, b, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: column 'namm' would merge two different policy runs: .*a/results.jsonl:1 .*"
                        r"b/results.jsonl:1 .*own label.*", err), err
    assert not (tmp_path / "bad").exists()
