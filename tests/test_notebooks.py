"""The analysis notebooks (notebooks/*.py, jupytext percent format) run end to end on the tiny random
model, on inputs made here by the real code paths (evaluation, speculative decoding, CMA-ES), and
write non-blank figures plus a JSON summary of what they plotted."""

import json
import os
import re
import runpy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
TINY = {"NB_MODEL": "tiny_random", "NB_LENGTH": "256"}


def run_notebook(name: str, out: Path, monkeypatch, **env) -> dict:
    """Run ``notebooks/<name>.py`` as a script with ``NB_*`` set; returns the JSON it wrote."""
    for k in [k for k in os.environ if k.startswith("NB_")]:
        monkeypatch.delenv(k)
    for k, v in {**TINY, **env, "NB_OUT": str(out)}.items():
        monkeypatch.setenv(k, str(v))
    runpy.run_path(str(ROOT / "notebooks" / f"{name}.py"), run_name="__main__")
    plt.close("all")
    return json.loads((out / f"{name}.json").read_text())


def check_figure(path: Path) -> None:
    """A real PNG over 1 KB whose pixels are not one flat colour."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024, path
    img = plt.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and img[..., :3].std() > 0.05, path


@pytest.fixture(scope="module")
def namm_export(tmp_path_factory):
    """A NAMM with random BAM weights (scores of both signs), exported as training exports it."""
    from namm.config import NAMMConfig
    from namm.export import save_pretrained
    from namm.scoring import num_params

    cfg = NAMMConfig()
    flat = np.random.default_rng(0).normal(0.0, 0.5, num_params(cfg)).astype(np.float32)
    s = cfg.features.spec_dim
    base = {"name": "tiny_random", "num_layers": 2, "num_kv_heads": 2, "num_q_heads": 4, "head_dim": 16}
    return save_pretrained(tmp_path_factory.mktemp("namm") / "policy", flat, cfg,
                           (np.zeros(s, np.float32), np.ones(s, np.float32)), base)


def test_notebooks_are_percent_notebooks_and_document_their_variables():
    import jupytext

    assert {p.stem for p in NOTEBOOKS} == {"attention_spectrograms", "kept_tokens", "score_vs_kv",
                                          "acceptance_by_position", "evolution_curves"}
    readme = (ROOT / "notebooks" / "README.md").read_text()
    for path in NOTEBOOKS:
        nb = jupytext.read(path)
        kinds = [c.cell_type for c in nb.cells]
        assert kinds[0] == "markdown" and kinds.count("code") >= 3, path.name
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        doc = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        used = set(re.findall(r"NB_[A-Z_]+", code))
        assert used and used <= set(re.findall(r"NB_[A-Z_]+", doc)), (path.name, used)
        assert f"notebooks/{path.name}" in readme


@pytest.mark.parametrize("trained", [False, True], ids=["untrained-h2o", "namm"])
def test_attention_spectrograms(tmp_path, monkeypatch, namm_export, trained):
    env = {"NB_BUDGET": "0.5", **({"NB_POLICY": namm_export} if trained else {})}
    s = run_notebook("attention_spectrograms", tmp_path, monkeypatch, **env)
    check_figure(tmp_path / "spectrogram_kept_vs_evicted.png")
    check_figure(tmp_path / "spectrogram_examples.png")
    assert s["keep_by"] == ("namm" if trained else "h2o") and s["bins"] == 17
    assert s["kv_fraction"] <= 0.51 if trained else abs(s["kv_fraction"] - 0.5) < 0.01
    for group in ("kept", "evicted"):
        assert s[group]["count"] > 0 and len(s[group]["mean"]) == 17
        assert all(np.isfinite(s[group]["mean"])) and min(s[group]["mean"]) >= 0
        assert 1 <= len(s["examples"][group]) <= 4
    # pooled over layers and heads: kept / (kept + evicted) is the measured kept cache
    kept, evicted = s["kept"]["count"], s["evicted"]["count"]
    assert kept / (kept + evicted) == pytest.approx(s["kv_fraction"], abs=1e-6)


def test_kept_tokens(tmp_path, monkeypatch, namm_export):
    s = run_notebook("kept_tokens", tmp_path, monkeypatch, NB_POLICY=namm_export, NB_BUDGET="none",
                     NB_UPDATE_INTERVAL=128)
    check_figure(tmp_path / "kept_tokens.png")
    namm_kv = s["policies"]["namm"]["kv_fraction"]
    h2o_label = f"h2o@{round(namm_kv, 3)}"                     # H2O runs at the NAMM's kept cache
    assert list(s["policies"]) == ["namm", h2o_label] and s["layers"] == 2 and 0 < namm_kv < 1
    assert s["policies"][h2o_label]["kv_fraction"] == pytest.approx(namm_kv, abs=0.02)
    for p in s["policies"].values():  # the heat map's rows add up to the cache's stored tokens
        assert len(p["kept_per_layer"]) == 2
        assert np.mean(p["kept_per_layer"]) == pytest.approx(p["kv_fraction"], abs=1e-6)


def test_score_vs_kv(tmp_path, monkeypatch):
    from experiments.lib import reporting
    from experiments.evaluate import evaluate, policy_runs
    from experiments.lib.models import tiny_random
    from experiments.tasks import generate

    model, tok = tiny_random("llama", seed=0)
    rows = generate("passkey", tok, 256, 1, seed=0) + generate("needle_qa", tok, 256, 1, seed=0)
    runs = policy_runs({"name": "full"}, ["h2o"], [0.25, 0.5])
    preds = evaluate(model, tok, rows, runs, tmp_path / "eval", chat=False, max_context=None, progress=False)
    reporting.write_results(reporting.aggregate(preds), tmp_path / "eval")

    s = run_notebook("score_vs_kv", tmp_path / "nb", monkeypatch, NB_RESULTS=tmp_path / "eval" / "results.jsonl")
    check_figure(tmp_path / "nb" / "score_vs_kv.png")
    check_figure(tmp_path / "nb" / "score_vs_kv_summary.png")
    assert s["columns"] == ["full", "h2o@0.25", "h2o@0.5"] and s["tasks"] == ["needle_qa@256", "passkey@256"]
    assert s["kv_fraction"]["full"] == 1.0
    assert s["kv_fraction"]["h2o@0.25"] == pytest.approx(0.25, abs=0.01)
    assert s["kv_fraction"]["h2o@0.5"] == pytest.approx(0.5, abs=0.01)
    assert all(0 <= v <= 100 for v in s["mean_score"].values())


def test_acceptance_by_position(tmp_path, monkeypatch):
    from experiments.lib.models import tiny_random

    draft, tok = tiny_random("llama", seed=1)            # another random model with the same byte vocabulary
    draft.save_pretrained(tmp_path / "draft")
    tok.save_pretrained(tmp_path / "draft")
    s = run_notebook("acceptance_by_position", tmp_path / "nb", monkeypatch, NB_DRAFT=f"self,{tmp_path / 'draft'}",
                     NB_PROMPTS=1, NB_NEW_TOKENS=12, NB_GAMMA=4)
    check_figure(tmp_path / "nb" / "acceptance_by_position.png")
    assert set(s["methods"]) == {"prompt_lookup", "self", "draft"} and s["gamma"] == 4
    assert s["lossless"] == {"prompt_lookup": True, "self": True, "draft": True}
    assert s["methods"]["self"]["per_position"] == [1.0] * 4       # greedy self-drafting accepts everything
    assert s["methods"]["self"]["acceptance_rate"] == 1.0
    for m in s["methods"].values():
        pp = [p for p in m["per_position"] if p is not None]
        assert len(m["per_position"]) <= 4 and all(0 <= p <= 1 for p in pp)

    # the same plot from a specbench.json (rows built by experiments.specbench.summarize)
    import torch

    from experiments.specbench import summarize
    from spec_decode.torch import PromptLookupProposer, autoregressive_generate, speculative_generate

    model, _ = tiny_random("llama", seed=0)
    x = torch.tensor([list(range(40, 60)) * 3])
    _, base = autoregressive_generate(model, x, 8)
    _, st = speculative_generate(model, x, PromptLookupProposer(3), 8, gamma=3)
    per_token = (base.target_time - base.prefill_time) / max(base.rounds, 1)
    bench = {"results": {"suite": {"target": summarize(base, base, per_token),
                                   "prompt_lookup@3": summarize(st, base, per_token)}}}
    (tmp_path / "specbench.json").write_text(json.dumps(bench))
    s = run_notebook("acceptance_by_position", tmp_path / "bench", monkeypatch,
                     NB_SPECBENCH=tmp_path / "specbench.json")
    check_figure(tmp_path / "bench" / "acceptance_by_position.png")
    assert list(s["methods"]) == ["suite/prompt_lookup@3"]      # the target row has no draft positions
    assert s["methods"]["suite/prompt_lookup@3"]["per_position"] == st.per_position


def test_evolution_curves(tmp_path, monkeypatch):
    from experiments.lib.tracking import Tracker
    from namm.evolve import EvolutionConfig, evolve

    class Sphere:
        """Maximise -mean_i ||x - t_i||^2 over sampled targets (a tiny fitness for the real CMA-ES loop)."""

        num_items = 6
        t = np.random.default_rng(0).normal(0, 0.3, (6, 8))

        def evaluate(self, population, items):
            x = np.asarray(population)[:, None, :]
            return -((x - self.t[items][None]) ** 2).sum(-1).mean(-1)

    files = []
    for stage, gens, init in (("i1", 4, None), ("i2", 2, tmp_path / "i1" / "evolution" / "latest.npz")):
        tracker = Tracker(tmp_path / stage, mode="disabled")           # as experiments.train_namm logs
        cfg = EvolutionConfig(population_size=6, generations=gens, items_per_generation=3, eval_every=2, seed=0)
        evolve(Sphere(), 8, cfg, tmp_path / stage / "evolution", eval_fitness=Sphere(), init_from=init,
               callback=lambda m, g, stage=stage: tracker.log({**m, "stage": stage}, step=g), progress=False)
        tracker.close()
        files.append(str(tmp_path / stage / "metrics.jsonl"))

    s = run_notebook("evolution_curves", tmp_path / "nb", monkeypatch, NB_METRICS=",".join(files))
    check_figure(tmp_path / "nb" / "evolution_curves.png")
    assert s["stages"] == ["i1", "i2"] and s["generation"] == [1, 2, 3, 4, 5, 6]   # stage i2 continues i1
    assert s["stage"] == ["i1"] * 4 + ["i2"] * 2 and s["eval"]["generation"] == [2, 4, 6]
    assert len(s["sigma"]) == 6 and all(v > 0 for v in s["sigma"]) and s["details"] == {}
    assert all(b >= m >= w for b, m, w in zip(s["best"], s["mean"], s["worst"]))
