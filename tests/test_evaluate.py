"""End to end: the evaluation entry point on the tiny random model (and SmolLM2, marked slow)."""

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from experiments.evaluate import headline, policy_runs, run, run_or_exit
from experiments.lib import reporting
from experiments.lib.models import byte_tokenizer
from experiments.tasks import TaskError, generate, write_jsonl

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")
HEADLINE = re.compile(r"^\S+: -?[\d.]+ \(target: .+\)$")


def _cfg(tmp_path, *overrides):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose("evaluate", overrides=["model=tiny_random", f"output_dir={tmp_path}",
                                              "logging.wandb_mode=disabled", "progress=false", *overrides])


def test_policy_runs_grid():
    runs = policy_runs({"name": "full", "budget": None}, ["recency"], [64, 0.5])
    assert [(r["name"], r["budget"]) for r in runs] == [("full", None), ("recency", 64), ("recency", 0.5)]
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        policy_runs({"name": "full"}, ["nope"], None)


def test_compare_mappings_override_and_keep_their_budget():
    runs = policy_runs({"name": "full", "budget": None},
                       ["h2o", {"name": "namm", "path": "untrained", "budget": None}, {"name": "l2", "skip_layers": 1}],
                       [0.5, 0.25])
    labels = [reporting.policy_label(r["name"], r["budget"]) for r in runs]
    assert labels == ["full", "h2o@0.5", "h2o@0.25", "namm", "l2@0.5", "l2@0.25"]
    namm = next(r for r in runs if r["name"] == "namm")
    assert namm["path"] == "untrained" and "chunk_size" in namm and "mode" in namm  # the yaml's other keys stay
    assert all(r["skip_layers"] == 1 for r in runs if r["name"] == "l2")
    with pytest.raises(ValueError, match="has no 'name'"):
        policy_runs({"name": "full"}, [{"path": "x"}], None)


def test_untrained_namm_keeps_everything(tiny_llama):
    import torch

    from namm.torch import build_policy, greedy_generate

    model, _ = tiny_llama
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    namm = greedy_generate(model, ids, None, 6, policy=build_policy({"name": "namm", "path": "untrained",
                                                                    "chunk_size": 32, "update_interval": 64}))
    full = greedy_generate(model, ids, None, 6, policy=build_policy({"name": "full"}))
    assert namm.token_ids == full.token_ids and namm.kv_fraction_prefill == 1.0


def test_evaluate_end_to_end(tmp_path, capsys):
    cfg = _cfg(tmp_path, "task=builtin", "task.tasks=[passkey,needle_qa]", "task.n=1",
               "task.context_lengths=[320]", "split=all", "compare=[recency]", "budgets=[128]")
    summary = run(cfg)
    out = capsys.readouterr().out.strip().splitlines()
    assert HEADLINE.match(out[-1]), out[-1]
    preds = reporting.read_jsonl(tmp_path / "predictions.jsonl")
    assert len(preds) == 2 * 2  # 2 prompts x (full, recency@128)
    for p in preds:
        assert {"task", "_id", "length", "policy", "budget", "prediction", "answers", "score", "kv_fraction_prefill",
                "kv_fraction_decode", "prompt_tokens", "wall_s"} <= set(p)
        assert 0.0 <= p["score"] <= 1.0 and p["length"] == 320
    full = [p for p in preds if p["policy"] == "full"]
    assert all(p["kv_fraction_prefill"] == 1.0 and p["budget"] is None for p in full)
    rec = [p for p in preds if p["policy"] == "recency"]
    assert all(p["kv_fraction_prefill"] < 1.0 and p["budget"] == 128 for p in rec)
    results = reporting.read_jsonl(tmp_path / "results.jsonl")
    assert {(r["task"], r["length"], r["policy"], r["budget"]) for r in results} == {
        ("passkey", 320, "full", None), ("needle_qa", 320, "full", None),
        ("passkey", 320, "recency", 128), ("needle_qa", 320, "recency", 128)}
    for r in results:
        assert r["n"] == 1 and 0 <= r["score"] <= 100 and 0 < r["kv_fraction"] <= 1 and r["wall_s"] >= 0
    table = (tmp_path / "results.md").read_text()
    assert "| task | n | full | recency@128 |" in table and "| passkey@320 | 1 |" in table
    assert (tmp_path / "score_vs_kv.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["headline"]["name"] == summary["headline"]["name"]
    # a rerun into the same directory resumes: every prediction is reused as it was
    run(cfg)
    assert reporting.read_jsonl(tmp_path / "predictions.jsonl") == preds
    # headline=LABEL picks the figure printed last (default: the last non-full run)
    overrides = ("task=builtin", "task.tasks=[passkey,needle_qa]", "task.n=1", "task.context_lengths=[320]",
                 "split=all", "compare=[recency]", "budgets=[128]")
    assert run(_cfg(tmp_path, *overrides, "headline=recency@128"))["headline"]["name"].startswith("recency@128_")
    assert run(_cfg(tmp_path, *overrides, "headline=full"))["headline"]["name"] == "full_cache_mean_score"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("full_cache_mean_score: ")
    # another policy added later into the same directory: its results files keep the earlier runs
    added = run(_cfg(tmp_path, *overrides[:-2], "compare=[h2o]", "budgets=[128]"))
    assert set(added["mean_score"]) == {"full", "h2o@128", "recency@128"}
    results = reporting.read_jsonl(tmp_path / "results.jsonl")
    assert {reporting.row_label(r) for r in results} == {"full", "h2o@128", "recency@128"}
    assert "| task | n | full | h2o@128 | recency@128 |" in (tmp_path / "results.md").read_text()
    assert len(reporting.read_jsonl(tmp_path / "predictions.jsonl")) == 2 * 3


def test_default_headline_is_among_this_commands_runs():
    rows = [{"task": "passkey", "length": 320, "policy": p, "budget": b, "label": lab, "score": sc, "kv_fraction": 1.0}
            for p, b, lab, sc in [("full", None, "full", 80.0), ("h2o", 128, "h2o@128", 40.0),
                                  ("recency", 128, "recency@128", 20.0)]]
    assert headline(rows) == ("recency@128_normalised_score", 0.25, ">= 1.0 (full cache = 1.0)")
    # an earlier command's recency@128 in the same directory does not take the headline of a command that ran h2o
    assert headline(rows, among=["full", "h2o@128"])[:2] == ("h2o@128_normalised_score", 0.5)
    assert headline(rows, "recency@128", among=["full", "h2o@128"])[0] == "recency@128_normalised_score"


def test_evaluate_jsonl_task(tmp_path, capsys):
    tok = byte_tokenizer()
    rows = generate("passkey", tok, 300, 2, seed=5) + generate("lcc", tok, 300, 1, seed=5)
    path = write_jsonl(rows, tmp_path / "tiny.jsonl")
    out_dir = tmp_path / "out"
    run(_cfg(out_dir, "task=jsonl", f"task.path={path}", "split=all", "model.max_context=200"))
    results = reporting.read_jsonl(out_dir / "results.jsonl")
    assert sorted((r["task"], r["n"]) for r in results) == [("lcc", 1), ("passkey", 2)]
    preds = reporting.read_jsonl(out_dir / "predictions.jsonl")
    assert all(p["truncated"] and p["prompt_tokens"] <= 200 for p in preds)  # over-long prompts: truncated
    assert HEADLINE.match(capsys.readouterr().out.strip().splitlines()[-1])


def test_bad_input_is_one_line(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "q", "answers": ["a"], "dataset": "passkey"}) + "\n")
    with pytest.raises(TaskError, match=r"bad.jsonl:1: row is missing 'context'"):
        run(_cfg(tmp_path, "task=jsonl", f"task.path={bad}", "split=all"))
    # as the command line reports it: one line and exit status 1, no traceback
    with pytest.raises(SystemExit) as e:
        run_or_exit(_cfg(tmp_path, "task=jsonl", f"task.path={tmp_path / 'missing.jsonl'}"))
    msg = str(e.value.code)
    assert msg.startswith("evaluate: task file") and "does not exist" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="evaluate: .*unknown dataset 'mystery'"):
        bad.write_text(json.dumps({"context": "c", "answers": ["a"], "dataset": "mystery"}) + "\n")
        run_or_exit(_cfg(tmp_path, "task=jsonl", f"task.path={bad}", "split=all"))
    passkey = ("task=passkey", "task.n=1", "task.context_lengths=[256]", "split=all")

    def no_model(*a, **k):
        raise AssertionError("a bad policy must fail before the model loads")

    monkeypatch.setattr("experiments.lib.models.load_model_from_cfg", no_model)
    with pytest.raises(SystemExit, match=r"^evaluate: policy 'smollm2-nope': no such directory, and no bundled"):
        run_or_exit(_cfg(tmp_path, *passkey, "policy=namm", "policy.path=smollm2-nope"))
    with pytest.raises(SystemExit, match=r"^evaluate: headline='h2o@0.5' is not a run of this evaluation \(its labels: full"):
        run_or_exit(_cfg(tmp_path, *passkey, "headline=h2o@0.5"))
    with pytest.raises(SystemExit, match=r"^evaluate: policy 'h2o' would never evict"):
        run_or_exit(_cfg(tmp_path, *passkey, "policy=h2o", "policy.budget=0.5", "policy.update_interval=0",
                         "policy.final_update=false"))


@pytest.mark.slow
def test_smollm2_passkey(tmp_path, capsys):
    cfg = _cfg(tmp_path, "model=smollm2", "task=passkey", "task.n=2", "task.context_lengths=[1024]", "split=all")
    summary = run(cfg)
    preds = reporting.read_jsonl(tmp_path / "predictions.jsonl")
    assert len(preds) == 2 and all(p["prediction"].strip() for p in preds)
    assert all(1000 <= p["prompt_tokens"] <= 1150 for p in preds)
    assert 0 <= summary["mean_score"]["full"] <= 100
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("full_cache_mean_score: ")


def test_unknown_config_names_are_one_line():
    from experiments.evaluate import check_group_choices

    check_group_choices(["task=passkey", "model=tiny_random", "policy=full", "task.n=3"])
    with pytest.raises(SystemExit, match=r"^evaluate: unknown task 'nope'; use one of: builtin, humaneval, jsonl"):
        check_group_choices(["task=nope"])
    with pytest.raises(SystemExit, match=r"^evaluate: unknown model 'gpt9'"):
        check_group_choices(["model=gpt9"])


def test_pipeline_errors_are_one_line(capsys):
    """``python -m experiments.main`` / ``train_namm``: a stage's error is one line on stderr, exit status 2."""
    from experiments.lib.cli import run_reporting_errors
    from namm.shards import ShardError

    def stage(cfg):
        assert cfg == {"seed": 0}
        raise ShardError("shard-00000 was written for another model; delete the store or set stats_dir")

    with pytest.raises(SystemExit) as e:
        run_reporting_errors(stage, {"seed": 0})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: shard-00000 was written for another model; delete the store or set stats_dir"
    with pytest.raises(ZeroDivisionError):                # a bug is still a traceback
        run_reporting_errors(lambda cfg: 1 / 0, {})
