"""experiments.lib.models: tiny random models, the byte tokenizer, the one loader, model configs."""

import math
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.lib.models import (TINY_ARCHS, TINY_VOCAB, ModelSpecError, load_model, load_model_from_cfg,
                                model_signature, tiny_random)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_random_is_seeded(arch):
    m0, _ = tiny_random(arch, seed=0)
    m0b, _ = tiny_random(arch, seed=0)
    m1, _ = tiny_random(arch, seed=1)
    assert _same_weights(m0, m0b)
    assert not _same_weights(m0, m1)
    assert m0.config.model_type == arch
    assert not m0.training and m0.dtype == torch.float32
    assert m0.config._attn_implementation == "sdpa"
    assert model_signature(m0) == {"name_or_path": f"tiny_random-{arch}-seed0", "model_type": arch, "num_layers": 2,
                                   "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 16, "vocab_size": TINY_VOCAB}
    assert m0.config.max_position_embeddings == 8192 and m0.config.hidden_size == 64


def test_tiny_random_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_random("llama", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_random_greedy_output_varies(tiny_llama):
    model, tok = tiny_llama
    enc = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    assert len(new) == 24 and len(set(new)) >= 8, new
    with torch.no_grad():
        probs = model(**enc).logits.softmax(-1)
    assert probs.max(-1).values.mean() > 5 / TINY_VOCAB  # peaked, not near-uniform


def test_byte_tokenizer_round_trip_and_chat_template(tiny_llama):
    model, tok = tiny_llama
    text = "Héllo, wörld! 你好 \n\ttabs & <tags>"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id == 256
    assert ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.eos_token_id, tok.pad_token_id) == (257, 258)
    assert len(tok) == model.config.vocab_size == TINY_VOCAB
    messages = [{"role": "user", "content": "What is 2+2?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>\nWhat is 2+2?</s>\n<|assistant|>\n"
    chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert chat_ids[0] == 256 and chat_ids.count(257) == 1
    assert tok.decode(chat_ids) == prompt


def test_local_directory_round_trip(tmp_path, tiny_llama):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_model(str(tmp_path))
    enc = tok("round trip", return_tensors="pt")
    assert ltok("round trip").input_ids == enc.input_ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(**enc).logits, model(**enc).logits)
    sig, lsig = model_signature(loaded), model_signature(model)
    assert {k: v for k, v in sig.items() if k != "name_or_path"} == {k: v for k, v in lsig.items() if k != "name_or_path"}
    assert sig["name_or_path"] == str(tmp_path)


def test_config_overrides_reach_the_model(tmp_path, tiny_llama):
    model, tok = load_model("tiny_random", arch="mistral", seed=3,
                            config_overrides={"rope_theta": 1234.5, "max_position_embeddings": 4096})
    assert model.config.rope_parameters["rope_theta"] == 1234.5
    assert model.config.max_position_embeddings == 4096
    tiny_llama[0].save_pretrained(tmp_path)
    tiny_llama[1].save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, dtype="bfloat16", config_overrides={"rope_theta": 777.0})
    assert loaded.config.rope_parameters["rope_theta"] == 777.0 and loaded.dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["tiny_random", "tiny_qwen3", "tiny_mistral"])
def test_load_model_from_cfg_tiny(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    model, tok = load_model_from_cfg(cfg)
    ref, _ = tiny_random(cfg.arch, seed=cfg.seed)
    assert _same_weights(model, ref)
    assert cfg.max_context <= model.config.max_position_embeddings and tok.chat_template


def test_model_configs_have_the_contract():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert {"name", "source", "chat", "dtype", "max_context"} <= set(cfg), path.name
        assert cfg.name == path.stem
    smol = OmegaConf.load(CONFIGS / "smollm2.yaml")
    assert smol.chat is True and smol.max_context == 8192 and smol.source == "smollm2"
    llama = OmegaConf.load(CONFIGS / "llama3_8b.yaml")
    assert llama.chat is False and llama.dtype == "bfloat16" and llama.max_context == 32768
    factor, alpha, d = 4, 2, 128  # NTK: base' = base * (alpha*factor - (alpha-1)) ** (d/(d-2))
    assert math.isclose(llama.config_overrides.rope_theta, 500000 * (alpha * factor - (alpha - 1)) ** (d / (d - 2)))
    assert llama.config_overrides.max_position_embeddings == 32768


@pytest.mark.parametrize("spec, match", [
    ("no such model", "not a known name.*'smollm2'.*'tiny_random'.*local model directory.*gguf.*hub id"),
    ("/nonexistent/model.gguf", "GGUF file .* does not exist"),
    ("", "pass one of"),
])
def test_bad_specs_give_one_line_errors(spec, match):
    with pytest.raises(ModelSpecError, match=match) as e:
        load_model(spec)
    assert "\n" not in str(e.value)


def test_bad_options_give_one_line_errors(tmp_path):
    with pytest.raises(ModelSpecError, match="arch='gpt2' is unknown; use one of llama, qwen3, mistral"):
        load_model("tiny_random", arch="gpt2")
    with pytest.raises(ModelSpecError, match="dtype 'float8' is unknown"):
        load_model("tiny_random", dtype="float8")
    with pytest.raises(ModelSpecError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelSpecError, match="has no 'source'"):
        load_model_from_cfg({"name": "x"})


def test_hub_id_without_hub_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelSpecError, match="cannot load hub id 'meta-llama/Meta-Llama-3-8B'.*local directory") as e:
        load_model("meta-llama/Meta-Llama-3-8B")
    assert "\n" not in str(e.value) and time.perf_counter() - t0 < 30


@pytest.mark.slow
def test_smollm2_loads_fast_and_answers():
    model, tok = load_model("smollm2")  # converts on first use on a fresh machine
    assert model_signature(model) == {"name_or_path": "SmolLM2-135M-Instruct", "model_type": "llama",
                                      "num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64,
                                      "vocab_size": 49152}
    t0 = time.perf_counter()
    model, tok = load_model("smollm2")
    assert time.perf_counter() - t0 < 10
    assert "<|im_start|>" in tok.chat_template and tok.model_max_length == 8192
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
