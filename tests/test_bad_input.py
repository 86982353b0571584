"""Bad input, one case at a time: each is refused with ONE line that names the problem and the fix, before the
work it would spoil starts, and nothing already written is lost (policy and draft directories, task files and
an output directory's predictions stay byte for byte as they were)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.lib.models import ModelSpecError, load_model_from_cfg, model_signature, tiny_random
from experiments.tasks import TaskError, build_prompts, load_task
from namm.config import FeatureConfig, NAMMConfig
from namm.torch import build_policy, greedy_generate
from namm.torch.cache import CacheConfigError
from namm.torch.generate import ContextLengthError
from namm.torch.policies import PolicyConfigError, check_budget
from namm.torch.policy import PolicyFormatError

ROOT = Path(__file__).resolve().parents[1]
CFG = NAMMConfig(features=FeatureConfig(chunk_size=16, update_interval=32))
BUDGET_FIX = re.escape("is not a valid budget; use a token count (an int >= 1, e.g. 512) or a fraction of the "
                       "tokens seen in (0, 1] (e.g. 0.25)")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line(err) -> str:
    msg = str(err.value) if hasattr(err, "value") else str(err)
    assert msg.strip() and "\n" not in msg, msg
    return msg


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or the file itself) -> its bytes."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): p.read_bytes() for p in files}


def export_policy(path: Path, num_layers: int = 2, num_kv_heads: int = 2, shared: bool = False) -> Path:
    """A NAMM policy directory written by the real exporter, for a model of ``num_layers x num_kv_heads``."""
    from namm.export import save_pretrained
    from namm.scoring import num_params

    base = {**model_signature(tiny_random("llama")[0]), "name": f"llama-{num_layers}x{num_kv_heads}",
            "num_layers": num_layers, "num_kv_heads": num_kv_heads}
    shape = (num_params(CFG),) if shared else (num_layers, num_kv_heads, num_params(CFG))
    flat = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 0.3
    return save_pretrained(path, flat, CFG, None, base, shared_across_layers_heads=shared)


def export_draft_for(target, path: Path) -> Path:
    """A one-layer draft exported (the real exporter) from ``target``'s config and weights."""
    from spec_decode.draft import DraftConfig, params_from_hf
    from spec_decode.export import export_draft

    cfg = DraftConfig.from_target(target.config.to_dict(), num_layers=1)
    params = params_from_hf({k: v.numpy() for k, v in target.state_dict().items()}, cfg)
    return export_draft(path, cfg, params)


# --- 1. a policy exported for another model ----------------------------------------------------------------------

@pytest.mark.parametrize("layers, heads", [(3, 2), (2, 4)])
def test_policy_for_another_model_is_refused_when_attached(tmp_path, tiny_llama, layers, heads):
    model, _ = tiny_llama
    path = export_policy(tmp_path / "p", layers, heads)
    before = snapshot(path)
    policy = build_policy({"name": "namm", "path": str(path)})         # loads: the directory itself is sound
    with pytest.raises(CacheConfigError) as e:
        policy.make_cache(model)
    assert one_line(e) == (
        f"this NAMM has per-layer/per-head parameters for {layers} layers x {heads} KV heads (llama-{layers}x{heads}); "
        "the model has 2 x 2. Use a policy exported with shared_across_layers_heads=True, or the model it was trained on")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with pytest.raises(CacheConfigError, match="per-layer/per-head parameters"):
        greedy_generate(model, ids, None, 3, policy=policy)
    assert snapshot(path) == before
    # a shared policy is model-agnostic and attaches to any layer and head count
    build_policy({"name": "namm", "path": str(export_policy(tmp_path / "s", layers, heads, shared=True))}).make_cache(model)


def test_per_layer_parameters_that_disagree_with_the_recorded_model(tmp_path):
    path = export_policy(tmp_path / "p", 2, 2)
    meta = json.loads((path / "config.json").read_text())
    meta["base_model"]["num_layers"] = 3                                 # edited by hand: the weights hold 2 x 2
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(PolicyFormatError) as e:
        build_policy({"name": "namm", "path": str(path)})
    assert one_line(e).endswith("do not match the recorded base model (3 layers x 2 KV heads); re-export the policy")


# --- 2. truncated weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("checksum", [True, False], ids=["with_checksum", "without_checksum"])
def test_truncated_policy_weights(tmp_path, checksum):
    from namm.export import ExportError, load_pretrained

    path = export_policy(tmp_path / "p", shared=True)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    if not checksum:                       # an export from before checksums: safetensors itself finds the tear
        meta = json.loads((path / "config.json").read_text())
        del meta["weights_sha256"]
        (path / "config.json").write_text(json.dumps(meta))
    before = snapshot(path)
    with pytest.raises(PolicyFormatError) as e:
        build_policy({"name": "namm", "path": str(path)})
    assert one_line(e).startswith(f"{weights} is truncated or corrupted")
    assert str(e.value).endswith("; re-export the policy")
    with pytest.raises(ExportError) as e:                                # the JAX side reads it the same way
        load_pretrained(path)
    assert one_line(e).startswith(f"{weights} is truncated or corrupted")
    assert snapshot(path) == before                                      # nothing deleted or rewritten


def test_truncated_draft_weights(tmp_path, tiny_llama):
    from spec_decode.export import DraftExportError, read_export_meta
    from spec_decode.torch import CorruptDraftError, DraftHandle

    target, _ = tiny_llama
    path = export_draft_for(target, tmp_path / "draft")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(path)
    with pytest.raises(CorruptDraftError) as e:
        DraftHandle.from_pretrained(path, target)
    assert one_line(e) == f"{weights} is missing or corrupt (checksum mismatch); re-export the draft"
    with pytest.raises(DraftExportError) as e:
        read_export_meta(path)
    assert one_line(e) == f"{weights} is corrupt (checksum mismatch with config.json); re-export the draft"
    assert snapshot(path) == before


# --- 3. a policy config.json of an unknown format version, missing or garbled --------------------------------

@pytest.mark.parametrize("case, runtime, jax_side", [
    ("version", r"config.json: unknown format_version 99 \(this runtime reads \[1\]\); upgrade namm or re-export",
     r"config.json: unknown format_version 99 \(this version reads \[1\]\); upgrade namm-spec or re-export"),
    ("missing", r"no config.json; export a policy with namm.export.save_pretrained",
     r"no config.json; pass a directory written by namm.export.save_pretrained"),
    ("garbled", r"config.json is not valid JSON \(.*\); re-export the policy",
     r"config.json is not valid JSON \(.*\); re-export the policy"),
    ("not_an_object", r"config.json must hold a JSON object; re-export the policy",
     r"config.json must hold a JSON object; re-export the policy"),
])
def test_bad_policy_config_json(tmp_path, case, runtime, jax_side):
    from namm.export import ExportError, load_pretrained

    path = export_policy(tmp_path / "p", shared=True)
    config = path / "config.json"
    meta = json.loads(config.read_text())
    if case == "version":
        config.write_text(json.dumps({**meta, "format_version": 99}))
    elif case == "missing":
        config.unlink()
    elif case == "garbled":
        config.write_text(json.dumps(meta)[:50])
    else:
        config.write_text("[1, 2]")
    before = snapshot(path)
    with pytest.raises(PolicyFormatError) as e:
        build_policy({"name": "namm", "path": str(path)})
    assert re.search(runtime, one_line(e)), str(e.value)
    with pytest.raises(ExportError) as e:
        load_pretrained(path)
    assert re.search(jax_side, one_line(e)), str(e.value)
    assert snapshot(path) == before


def test_draft_of_an_unknown_format_version(tmp_path, tiny_llama):
    from spec_decode.torch import CorruptDraftError, DraftHandle

    target, _ = tiny_llama
    path = export_draft_for(target, tmp_path / "draft")
    config = json.loads((path / "config.json").read_text())
    config["namm_spec_draft"]["format_version"] = 2
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptDraftError) as e:
        DraftHandle.from_pretrained(path, target)
    assert one_line(e).endswith("unknown draft format_version 2 (this runtime reads [1]); upgrade namm-spec or "
                                "re-export the draft")


# --- 4. a draft exported for another vocabulary ---------------------------------------------------------------

def test_draft_for_another_vocabulary(tmp_path, tiny_llama):
    from spec_decode.torch import DraftHandle, DraftMismatchError, hf_generate

    target, tok = tiny_llama
    other = tiny_random("llama", seed=1, vocab_size=300)[0]
    path = export_draft_for(other, tmp_path / "draft")
    before = snapshot(path)
    with pytest.raises(DraftMismatchError) as e:
        DraftHandle.from_pretrained(path, target, tok)
    assert one_line(e) == (f"draft {path} has vocab_size=300 != target vocab_size=259; distill the draft from this "
                           "target (same tokenizer) before using it for speculative decoding")
    with pytest.raises(DraftMismatchError, match=r"^draft vocab_size=300 != target vocab_size=259; distill"):
        hf_generate(target, torch.tensor([[1, 2, 3]]), 4, draft=DraftHandle.from_pretrained(path).model)
    assert snapshot(path) == before


# --- 5. a JSONL task file with a bad row ----------------------------------------------------------------------

ROW = {"context": "the passkey is 123", "input": "what is the passkey?", "answers": ["123"], "dataset": "passkey"}


@pytest.mark.parametrize("bad_line, expected", [
    (json.dumps({k: v for k, v in ROW.items() if k != "answers"}),
     r":4: row is missing 'answers'; every row needs context, answers, dataset \(LongBench schema: "),
    ('{"context": "c", "answers": ["a"], "dataset": "passkey"',
     r":4: not valid JSON \(.*\); each line must be one JSON object$"),
    ("[1, 2]", r":4: a row must be a JSON object, got list$"),
])
def test_jsonl_row_is_named_by_its_line(tmp_path, bad_line, expected):
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join([json.dumps(ROW), json.dumps({**ROW, "_id": "b"}), "", bad_line, json.dumps(ROW)]) + "\n")
    before = snapshot(path)
    with pytest.raises(TaskError) as e:
        load_task({"name": "jsonl", "path": str(path)}, split="all")
    msg = one_line(e)
    assert msg.startswith(str(path)) and re.search(expected, msg), msg   # line 4 of the file, the blank line counted
    assert snapshot(path) == before


# --- 6. a key typo in a policy config -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg, expected", [
    ({"name": "namm", "path": "untrained", "thresold": 0.5},
     "policy 'namm': unknown option 'thresold' (did you mean 'threshold'?); it takes budget, chunk_size, final_update, "
     "mode, path, recent_fraction, threshold, top_k, update_interval"),
    ({"name": "h2o", "budget": 0.5, "recent_fracton": 0.5},
     "policy 'h2o': unknown option 'recent_fracton' (did you mean 'recent_fraction'?); it takes budget, chunk_size, "
     "final_update, recent_fraction, update_interval"),
    ({"name": "full", "chunk": 64},
     "policy 'full': unknown option 'chunk' (did you mean 'chunk_size'?); it takes budget, chunk_size, update_interval"),
])
def test_policy_builder_refuses_unknown_keys(cfg, expected):
    with pytest.raises(PolicyConfigError) as e:
        build_policy(cfg)
    assert one_line(e) == expected


@pytest.mark.parametrize("argv, expected", [
    (["policy=namm", "policy.thresold=0.5"],
     "unknown key 'policy.thresold' in policy.thresold=0.5 (did you mean 'threshold'?); policy 'namm' takes: budget, "
     "chunk_size, final_update, mode, name, path, recent_fraction, threshold, update_interval; to add a new key write "
     "+policy.thresold=0.5"),
    (["model=tiny_random", "model.max_contxt=64"],
     "unknown key 'model.max_contxt' in model.max_contxt=64 (did you mean 'max_context'?); model 'tiny_random' takes: "
     "arch, chat, config_overrides, dtype, max_context, name, seed, source; to add a new key write "
     "+model.max_contxt=64"),
    (["policy=h2o2"], "unknown policy 'h2o2' (did you mean 'h2o'?); use one of: full, h2o, l2, namm, random, "
                      "recency, snapkv, streamingllm"),
    (["policy=namm", "+policy.thresold=0.5", "budgets=[1,2]"], None),          # composes: the builder refuses it
])
def test_command_line_override_typos(argv, expected):
    from experiments.lib.cli import check_overrides, override_problem

    assert override_problem("evaluate", argv) == expected
    if expected:
        with pytest.raises(SystemExit) as e:
            check_overrides("evaluate", "evaluate", argv)
        assert str(e.value.code) == f"evaluate: {expected}"


# --- 7. budgets out of range ----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [0, 1.5, -1, 2.0, True, "0.5"])
@pytest.mark.parametrize("name", ["h2o", "namm"])
def test_budget_out_of_range(name, budget):
    cfg = {"name": name, "budget": budget, **({"path": "untrained"} if name == "namm" else {})}
    with pytest.raises(PolicyConfigError) as e:
        build_policy(cfg)
    assert re.fullmatch(rf"policy '{name}' budget: {re.escape(repr(budget))} {BUDGET_FIX}(; for 2 tokens write 2)?",
                        one_line(e)), str(e.value)
    with pytest.raises(PolicyConfigError, match=rf"^budgets=\[0, 0.5\]: {re.escape(repr(budget))} {BUDGET_FIX}"):
        check_budget(budget, "budgets=[0, 0.5]")


@pytest.mark.parametrize("budget", [1, 512, 0.25, 1.0])
def test_budget_in_range(budget):
    assert check_budget(budget) == budget
    assert build_policy({"name": "h2o", "budget": budget}).budget == budget
    assert build_policy({"name": "namm", "path": "untrained", "budget": budget}).budget == budget


def test_budgets_list_is_checked_even_where_a_policy_ignores_it():
    """``budgets=[...]`` is refused as a whole, also with ``policy=full`` (which ignores budgets).

    Needs the ``policy_runs`` budget check in experiments/evaluate.py."""
    from experiments.evaluate import policy_runs

    with pytest.raises(PolicyConfigError) as e:
        policy_runs({"name": "full", "budget": None}, [], [0, 0.5])
    assert re.fullmatch(rf"budgets=\[0, 0.5\]: 0 {BUDGET_FIX}", one_line(e))


# --- 8. a prompt or max_new_tokens over the model's context ---------------------------------------------------

@pytest.fixture(scope="module")
def short_llama():
    """The tiny Llama with a 64-token context."""
    return tiny_random("llama", seed=0, max_position_embeddings=64)


@pytest.mark.parametrize("prompt, new, expected", [
    (60, 10, "a prompt of 60 tokens + max_new_tokens=10 = 70 tokens exceeds the model's context of 64 tokens "
             "(max_position_embeddings); truncate the prompt to 54 tokens, lower max_new_tokens to 4, or set "
             "model.max_context (evaluation truncates each prompt to max_context - max_new_tokens)"),
    (10, 100, "a prompt of 10 tokens + max_new_tokens=100 = 110 tokens exceeds the model's context of 64 tokens "
              "(max_position_embeddings); lower max_new_tokens to 54, or set model.max_context (evaluation "
              "truncates each prompt to max_context - max_new_tokens)"),
])
def test_generation_over_the_context(short_llama, prompt, new, expected):
    from spec_decode.torch.prompt_lookup import PromptLookupProposer
    from spec_decode.torch.speculative import autoregressive_generate, speculative_generate

    model, _ = short_llama
    ids = torch.randint(0, 256, (1, prompt), generator=torch.Generator().manual_seed(0))
    for generate in (lambda: greedy_generate(model, ids, None, new),
                     lambda: greedy_generate(model, ids[:, :-3], ids[:, -3:], new, policy=build_policy(
                         {"name": "h2o", "budget": 0.5})),
                     lambda: speculative_generate(model, ids, PromptLookupProposer(), new),
                     lambda: autoregressive_generate(model, ids, new)):
        with pytest.raises(ContextLengthError) as e:
            generate()
        assert one_line(e) == expected
    assert len(greedy_generate(model, ids[:, : 64 - 4], None, 4).token_ids) == 4     # exactly the context: fine


def test_max_context_over_the_model(tmp_path):
    with pytest.raises(ModelSpecError) as e:
        load_model_from_cfg({"name": "tiny_random", "source": "tiny_random", "max_context": 100000})
    assert one_line(e) == ("model.max_context=100000 exceeds the context of model 'tiny_random' (8192 tokens, "
                           "max_position_embeddings); set model.max_context=8192 or less, or extend the model with "
                           "model.config_overrides.max_position_embeddings (and a matching rope_theta)")
    with pytest.raises(ModelSpecError, match=r"^model.max_context=0; use a token count >= 2"):
        load_model_from_cfg({"name": "tiny_random", "source": "tiny_random", "max_context": 0})
    row = {**ROW, "_id": "a", "all_classes": None, "length": 4}
    with pytest.raises(TaskError) as e:
        build_prompts([row], tiny_random("llama")[1], False, max_context=10)
    assert one_line(e) == ("passkey: model.max_context=10 leaves -6 tokens for the prompt after max_new_tokens=16; "
                           "raise model.max_context above 17")


def test_evaluate_over_the_context_keeps_the_predictions(tmp_path):
    """``evaluate`` with prompts longer than the model's context and no ``max_context``: one line, exit status 1,
    and the predictions already in the output directory stay."""
    from hydra import compose, initialize_config_dir

    from experiments.evaluate import run_or_exit

    task = tmp_path / "long.jsonl"
    task.write_text(json.dumps({**ROW, "context": "filler text " * 40}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps(OLD_PREDICTION) + "\n")
    before = snapshot(out)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("evaluate", overrides=[
            "model=tiny_random", "model.max_context=null", "+model.config_overrides.max_position_embeddings=256",
            "task=jsonl", f"task.path={task}", "split=all", f"output_dir={out}", "progress=false",
            "logging.wandb_mode=disabled"])
    with pytest.raises(SystemExit) as e:
        run_or_exit(cfg)
    msg = str(e.value.code)
    assert "\n" not in msg and re.fullmatch(
        r"evaluate: (passkey \S+: )?a prompt of 622 tokens \+ max_new_tokens=16 = 638 tokens exceeds the model's "
        r"context of 256 tokens \(max_position_embeddings\); truncate the prompt to 240 tokens, or set "
        r"model.max_context \(evaluation truncates each prompt to max_context - max_new_tokens\)", msg), msg
    after = snapshot(out)
    assert after[str(out / "predictions.jsonl")].startswith(before[str(out / "predictions.jsonl")])


# --- the command line: one line on stderr, exit status 1, the output directory as it was -----------------------

OLD_PREDICTION = {"task": "passkey", "_id": "kept-0", "length": None, "policy": "recency", "budget": 64,
                  "label": "recency@64", "prediction": "123", "answers": ["123"], "score": 1.0}


@pytest.mark.parametrize("case", ["policy_key_typo", "compare_key_typo", "budgets", "policy_for_another_model"])
def test_evaluate_command_line(tmp_path, case):
    """``python -m experiments.evaluate ...`` with one bad input each. ``policy_key_typo`` needs
    ``check_overrides`` in experiments/evaluate.py's ``__main__``."""
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps(ROW) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.jsonl").write_text(json.dumps(OLD_PREDICTION) + "\n")
    argv, expected = {
        "policy_key_typo": (["policy=namm", "policy.path=untrained", "policy.thresold=0.5"],
                            r"evaluate: unknown key 'policy.thresold' in policy.thresold=0.5 \(did you mean "
                            r"'threshold'\?\); policy 'namm' takes: budget, .*; to add a new key write "
                            r"\+policy.thresold=0.5"),
        "compare_key_typo": (["compare=[{name:namm,path:untrained,thresold:0.5}]"],
                             r"evaluate: policy 'namm': unknown option 'thresold' \(did you mean 'threshold'\?\); "
                             r"it takes budget, chunk_size, final_update, mode, path, recent_fraction, threshold, "
                             r"top_k, update_interval"),
        "budgets": (["policy=h2o", "budgets=[0,0.5]"],
                    rf"evaluate: (policy 'h2o' budget|budgets=\[0, 0.5\]): 0 {BUDGET_FIX}"),
        "policy_for_another_model": (["policy=namm", f"policy.path={export_policy(tmp_path / 'p', 3, 2)}"],
                                     r"evaluate: this NAMM has per-layer/per-head parameters for 3 layers x 2 KV heads "
                                     r"\(llama-3x2\); the model has 2 x 2\. Use a policy exported with "
                                     r"shared_across_layers_heads=True, or the model it was trained on"),
    }[case]
    before = snapshot(tmp_path)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", "model=tiny_random", "task=jsonl", f"task.path={task}",
         "split=all", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}", "progress=false",
         "logging.wandb_mode=disabled", *argv],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert re.fullmatch(expected, proc.stderr.strip()), proc.stderr           # the whole of stderr: one line
    after = snapshot(tmp_path)
    for name, blob in before.items():                                         # every file there stays as it was
        assert after[name] == blob, name
