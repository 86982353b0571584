"""Export: Flax draft -> HF LlamaForCausalLM directory; round trip, assisted generation, refusals."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from experiments.lib.models import tiny_random
from spec_decode.draft import DraftConfig, forward, params_from_hf
from spec_decode.export import DraftExportError, export_draft, load_draft, read_export_meta
from spec_decode.torch import CorruptDraftError, DraftHandle, DraftMismatchError, hf_generate


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    target, tok = tiny_random("llama", seed=0)
    tok_dir = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(tok_dir)
    cfg = DraftConfig.from_target(target.config.to_dict(), num_layers=1)
    params = params_from_hf({k: v.numpy() for k, v in target.state_dict().items()}, cfg)
    out = export_draft(tmp_path_factory.mktemp("x") / "draft", cfg, params, tokenizer_dir=tok_dir, draft_length=3,
                       vocab_map=np.arange(0, 258), info={"divergence": "tvd"})
    return target, tok, cfg, params, out


def test_round_trip_logits_within_1e4(exported):
    _, _, cfg, params, out = exported
    ids = np.random.default_rng(0).integers(0, 256, (1, 30))
    model = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    ours, _ = forward(cfg, params, jnp.asarray(ids))
    assert np.abs(np.asarray(ours) - theirs).max() < 1e-4
    cfg2, params2, vm = load_draft(out)             # and back to JAX
    assert cfg2 == cfg and vm.tolist() == list(range(258))
    np.testing.assert_array_equal(np.asarray(params2["head"]), np.asarray(params["head"]))


def test_assisted_generation_with_the_export_equals_greedy(exported):
    target, tok, _, _, out = exported
    draft = DraftHandle.from_pretrained(out, target, tok)
    assert draft.model.generation_config.num_assistant_tokens == 3
    assert AutoTokenizer.from_pretrained(out).get_vocab() == tok.get_vocab()
    ids = torch.tensor([list(b"def add(a, b):")])
    ref = target.generate(ids, max_new_tokens=12, do_sample=False)
    got, stats = hf_generate(target, ids, 12, draft=draft.model, draft_length=3)
    assert got.tolist() == ref.tolist()
    assert stats.rounds == len(stats.gammas) >= 1 and stats.proposed[0] == sum(g > 0 for g in stats.gammas)


def test_corrupt_export_fails_loudly(exported, tmp_path):
    import shutil

    *_, out = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(CorruptDraftError, match="checksum"):
        DraftHandle.from_pretrained(bad)
    with pytest.raises(DraftExportError, match="corrupt"):
        read_export_meta(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(CorruptDraftError, match="not valid JSON"):
        DraftHandle.from_pretrained(bad)


def test_draft_with_other_vocabulary_is_refused(exported, tmp_path):
    target, tok, cfg, params, _ = exported
    other = tiny_random("llama", seed=1, vocab_size=300)[0]
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(DraftMismatchError, match="vocab_size=300"):
        DraftHandle.from_pretrained(tmp_path / "other", target)
    with pytest.raises(DraftMismatchError, match="vocab_size"):
        hf_generate(target, torch.tensor([[1, 2, 3]]), 4, draft=other)
    meta = json.loads((exported[4] / "config.json").read_text())["namm_spec_draft"]
    assert meta["reduced_vocab"] and meta["info"]["divergence"] == "tvd"
