"""The speculative loops are lossless: greedy == target greedy token for token; sampling matches p."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from experiments.lib.models import tiny_random
from spec_decode.draft import DraftConfig, params_from_hf
from spec_decode.export import export_draft
from spec_decode.torch import (DraftHandle, DraftMismatchError, DraftProposer, PromptLookupProposer, Sampling,
                               autoregressive_generate, hf_generate, speculative_generate)

PROMPTS = [b"def add(a, b):\n    return a + b\n\ndef add(", b"hello hello hello", b"x"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    target, tok = tiny_random("llama", seed=0)
    state = {k: v.numpy() for k, v in target.state_dict().items()}
    root = tmp_path_factory.mktemp("drafts")
    drafts = {}
    for name, layers, vm in (("one_layer", 1, None), ("reduced", 1, np.arange(0, 259, 2)), ("full_copy", 2, None)):
        cfg = DraftConfig.from_target(target.config.to_dict(), num_layers=layers)
        drafts[name] = DraftHandle.from_pretrained(export_draft(root / name, cfg, params_from_hf(state, cfg),
                                                                vocab_map=vm), target)
    return target, drafts


@pytest.mark.parametrize("draft_name", ["one_layer", "reduced", "full_copy", "prompt_lookup"])
def test_greedy_equals_target_greedy(models, draft_name):
    target, drafts = models
    for prompt in PROMPTS:
        ids = torch.tensor([list(prompt)])
        ref, _ = autoregressive_generate(target, ids, 24)
        assert ref.tolist() == target.generate(ids, max_new_tokens=24, do_sample=False).tolist()
        for gamma, adaptive in ((1, False), (4, False), (3, True)):
            proposer = PromptLookupProposer() if draft_name == "prompt_lookup" else DraftProposer(drafts[draft_name])
            out, stats = speculative_generate(target, ids, proposer, 24, gamma=gamma, adaptive=adaptive)
            assert out.tolist() == ref.tolist(), (draft_name, prompt, gamma)
            assert stats.new_tokens == 24 and stats.rounds <= 24
            assert all(a <= p for a, p in zip(stats.accepted, stats.proposed))
    if draft_name == "full_copy":    # the target drafting for itself: everything is accepted
        assert stats.acceptance_rate == 1.0 and stats.tokens_per_call > 3


def test_confidence_gate_is_lossless(models):
    """``min_confidence`` shortens rounds (to nothing when the draft is never that sure), output unchanged."""
    target, drafts = models
    ids = torch.tensor([list(PROMPTS[0])])
    ref, _ = autoregressive_generate(target, ids, 24)
    runs = {}
    for gate in (None, 0.0, 0.2, 1.0):
        out, stats = speculative_generate(target, ids, DraftProposer(drafts["full_copy"], min_confidence=gate), 24,
                                          gamma=4)
        assert out.tolist() == ref.tolist(), gate
        runs[gate] = stats
    assert runs[0.0].proposed == runs[None].proposed                # a gate of 0 is no gate
    assert sum(runs[0.2].proposed) < sum(runs[None].proposed)       # the gate stopped some rounds early
    assert sum(runs[1.0].proposed) == 0 and runs[1.0].rounds == 24  # never sure: plain decoding
    with pytest.raises(ValueError, match="min_confidence=1.5"):
        DraftProposer(drafts["full_copy"], min_confidence=1.5)


def test_eos_stops_and_transformers_paths_agree(models):
    target, drafts = models
    ids = torch.tensor([list(PROMPTS[0])])
    ref, _ = autoregressive_generate(target, ids, 16)
    eos = ref[0, ids.shape[1] + 5].item()           # pretend the 6th new token is EOS
    out, stats = speculative_generate(target, ids, DraftProposer(drafts["full_copy"]), 16, gamma=4, eos_token_id=eos)
    first = ref[0, ids.shape[1]:].tolist().index(eos)
    assert out.tolist()[0] == ref.tolist()[0][: ids.shape[1] + first + 1] and stats.new_tokens == first + 1
    hf, st = hf_generate(target, ids, 16, draft=drafts["one_layer"].model, draft_length=3)
    assert hf.tolist() == ref.tolist() and len(st.gammas) == st.rounds
    pl, _ = hf_generate(target, ids, 16, prompt_lookup=3)
    assert pl.tolist() == ref.tolist()


def _exact_marginals(target, prompt, temperature):
    """p(x1 | prompt) and p(x2 | prompt) = sum_x1 p(x1) p(x2 | prompt, x1), exactly."""
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        v = p1.shape[0]
        batch = torch.tensor([prompt + [x] for x in range(v)])
        p2_given = torch.softmax(target(batch).logits[:, -1] / temperature, -1)                 # [V, V]
    return p1.numpy(), (p1[:, None] * p2_given).sum(0).numpy()


def _chi2_pvalue(counts, probs, min_expected=5.0):
    """Chi-square p-value after pooling categories (most likely first) into bins of expected count >= 5."""
    n = counts.sum()
    order = np.argsort(-probs)
    obs, exp, o, e = [], [], 0.0, 0.0
    for i in order:
        o, e = o + counts[i], e + probs[i] * n
        if e >= min_expected:
            obs.append(o), exp.append(e)
            o, e = 0.0, 0.0
    obs[-1] += o
    exp[-1] += e
    assert len(obs) >= 3, "too few bins for a chi-square test"
    return chisquare(np.array(obs), np.array(exp) * sum(obs) / sum(exp)).pvalue


@pytest.mark.parametrize("gate", [None, 0.1])
def test_sampling_matches_target_distribution_chi_square(models, gate):
    """Rejection sampling with the residual max(0, p - q) and the bonus token reproduces p exactly (also when
    a confidence gate cuts rounds short)."""
    target, drafts = models
    prompt = list(b"the cat")
    temperature, n = 1.5, 400
    p1, p2 = _exact_marginals(target, prompt, temperature)
    c1, c2 = np.zeros_like(p1), np.zeros_like(p2)
    total, firsts = None, []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        out, stats = speculative_generate(target, torch.tensor([prompt]), DraftProposer(drafts["one_layer"], gate),
                                          3, gamma=2, sampling=Sampling(True, temperature), generator=g)
        c1[out[0, len(prompt)]] += 1
        c2[out[0, len(prompt) + 1]] += 1
        total = stats if total is None else total.merge(stats)
        firsts.append(stats.gammas[0])                    # drafts proposed in the first round (room for 2)
    assert 0 < total.accepted[0] < total.proposed[0]      # both the accept and the residual paths ran
    assert (min(firsts) < 2) == bool(gate)                # the gate cut first rounds short
    assert _chi2_pvalue(c1, p1) > 1e-3 and _chi2_pvalue(c2, p2) > 1e-3


def test_bad_input_is_refused(models, tmp_path):
    target, drafts = models
    other = tiny_random("llama", seed=1, vocab_size=300)[0]
    with pytest.raises(DraftMismatchError, match="vocab_size"):
        DraftHandle.from_pretrained(_save(other, tmp_path), target)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(target, torch.zeros((2, 3), dtype=torch.long), PromptLookupProposer(), 4)
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookupProposer(max_ngram=1, min_ngram=2)


def _save(model, path):
    model.save_pretrained(path / "other")
    return path / "other"


def test_humaneval_headline_reports_the_best_distilled_draft_against_prompt_lookup():
    from experiments.specbench import humaneval_headline

    row = lambda speedup, alpha=0.0, c=0.0: {"speedup": speedup, "alpha": alpha, "c": c}  # noqa: E731
    report = {"drafts": {"undistilled": "d0", "fkl": "d1", "tvd": "d2"}, "results": {"humaneval": {
        "target": row(1.0), "hf_target": row(1.02), "prompt_lookup@4": row(1.6), "hf_prompt_lookup@4": row(1.5),
        "fkl@2": row(0.8, 0.2, 0.1), "fkl@4": row(0.9, 0.15, 0.1), "tvd@4": row(0.7), "undistilled@4": row(0.95),
        "hf_assisted_fkl@4": row(0.4)}}}
    lines = humaneval_headline(report)
    assert lines[0] == "humaneval_fastest_method: prompt_lookup@4 (1.600x)"
    assert lines[1] == "humaneval_prompt_lookup_speedup: 1.600 (prompt_lookup@4)"
    # the undistilled draft (faster here) is not a distilled draft; the target names prompt lookup's figure
    assert lines[-1] == ("humaneval_draft_speedup: 0.900 (fkl@4; acceptance 0.150, c 0.100) "
                         "(target: >= 1.5 and above prompt lookup's 1.600)")
    assert humaneval_headline({"drafts": {}, "results": {"selfspec": {}}}) == []


def test_specbench_draft_suite_end_to_end(tmp_path, capsys):
    """``python -m experiments.specbench only=[humaneval]`` on the tiny model: every method's row, lossless,
    the confidence-gated row, the table, the plot and the headline last."""
    import json
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from experiments import specbench

    target, tok = tiny_random("llama", seed=0)
    tok.save_pretrained(tmp_path / "tok")
    cfg = DraftConfig.from_target(target.config.to_dict(), num_layers=1)
    state = {k: v.numpy() for k, v in target.state_dict().items()}
    draft = export_draft(tmp_path / "draft", cfg, params_from_hf(state, cfg), tokenizer_dir=tmp_path / "tok")
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "configs"), version_base=None):
        cfg = compose("specbench", overrides=[
            "target=tiny_random", f"output_dir={tmp_path / 'out'}", "only=[humaneval]", "threads=1",
            "suites.humaneval.task.n=1", "suites.humaneval.max_new_tokens=8", f"drafts.undistilled={draft}",
            f"drafts.tvd={draft}", "draft_lengths=[2,3]", "gamma=2", "draft_confidence=[0.01]"])
    specbench.main(cfg)
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads((tmp_path / "out" / "specbench.json").read_text())
    rows = report["results"]["humaneval"]
    assert set(rows) == {"target", "undistilled@2", "tvd@2", "tvd@3", "tvd_p0.01@2", "prompt_lookup@2",
                         "prompt_lookup@3", "hf_target", "hf_prompt_lookup@2", "hf_assisted_tvd@2"}
    assert all(report["lossless"]["humaneval"].values()) and "lossless_greedy: True (target: True)" in lines
    assert rows["tvd_p0.01@2"]["tokens_per_call"] >= 1 and rows["tvd@2"]["speedup"] > 0
    assert (tmp_path / "out" / "speedup_vs_draft_length.png").stat().st_size > 0
    assert "| tvd_p0.01@2 |" in (tmp_path / "out" / "specbench.md").read_text()
    assert lines[-1].startswith("humaneval_draft_speedup: ")
    assert specbench._draft_of("tvd_p0.4@4", {"tvd": "d"}) == "tvd" and specbench._draft_of("hf_target", {}) is None
