"""Paper-table layout from results files: category means, overall, normalised score, kept cache."""

import json

import pytest

from experiments import tables


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    # full cache: two tasks, one at two lengths (weighted by n)
    {"task": "passkey", "length": 1024, "policy": "full", "budget": None, "score": 50.0, "kv_fraction": 1.0, "n": 10},
    {"task": "passkey", "length": 2048, "policy": "full", "budget": None, "score": 20.0, "kv_fraction": 1.0, "n": 30},
    {"task": "lcc", "length": 1024, "policy": "full", "budget": None, "score": 40.0, "kv_fraction": 1.0, "n": 10},
    {"task": "passkey", "length": 1024, "policy": "h2o", "budget": 0.25, "score": 10.0, "kv_fraction": 0.25, "n": 10},
    {"task": "passkey", "length": 2048, "policy": "h2o", "budget": 0.25, "score": 10.0, "kv_fraction": 0.25, "n": 30},
    {"task": "lcc", "length": 1024, "policy": "h2o", "budget": 0.25, "score": 20.0, "kv_fraction": 0.35, "n": 10},
]


def test_summary_numbers_by_hand(tmp_path):
    by = tables.per_task(ROWS)
    assert by["full"]["passkey"]["score"] == pytest.approx((50 * 10 + 20 * 30) / 40)  # 27.5
    s = tables.summarise(by)
    assert s["full"]["overall"] == pytest.approx((27.5 + 40) / 2)
    assert s["full"]["categories"] == {"Synthetic": 27.5, "Code": 40.0}
    assert s["full"]["normalized"] == pytest.approx(1.0)
    assert s["h2o@0.25"]["normalized"] == pytest.approx((10 / 27.5 + 20 / 40) / 2)
    assert s["h2o@0.25"]["kv_percent"] == pytest.approx(100 * (0.25 + 0.35) / 2)


def test_cli_writes_markdown_latex_and_headline(tmp_path, capsys):
    path = _write(tmp_path / "results.jsonl", ROWS)
    assert tables.main([str(path), "--by-length"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("h2o@0.25_normalized_overall: ")
    md = (tmp_path / "tables.md").read_text()
    assert "| full | 35.00 | 40.00 | 36.67 | 1.00 | 100.0 |" in md  # Synthetic (50+20)/2, Code, overall over 3 tasks
    assert "passkey@2048" in md
    assert r"\begin{tabular}" in (tmp_path / "tables.tex").read_text()
    # --by-length gives experiments.evaluate's normalised score (per task@length); the default merges lengths
    from experiments.lib.reporting import normalised_scores

    by_length = json.loads((tmp_path / "tables.json").read_text())["h2o@0.25"]["normalized"]
    assert by_length == pytest.approx(normalised_scores(ROWS)["h2o@0.25"], abs=5e-5)  # it rounds to 4 decimals
    assert "`experiments.evaluate` reports it" in md
    assert tables.main([str(path)]) == 0
    merged = json.loads((tmp_path / "tables.json").read_text())["h2o@0.25"]["normalized"]
    assert merged == pytest.approx((10 / 27.5 + 20 / 40) / 2) and merged != pytest.approx(by_length)
    assert "context lengths are merged first" in (tmp_path / "tables.md").read_text()


def test_reference_row_and_bad_input(tmp_path, capsys):
    rows = tables.reference_rows("llama3_8b_32k_full_cache")
    s = tables.summarise(tables.per_task(rows), full="full (reference)")
    assert s["full (reference)"]["overall"] == pytest.approx(28.86, abs=0.005)  # the paper's full-cache overall
    assert s["full (reference)"]["categories"]["Code"] == pytest.approx(67.13, abs=0.005)
    assert tables.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "run `python -m experiments.evaluate` first" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "lcc"}\n')
    assert tables.main([str(bad)]) == 2
    assert "lacks ['policy', 'score']" in capsys.readouterr().err
