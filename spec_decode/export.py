"""Draft params -> a Hugging Face ``LlamaForCausalLM`` directory (and back, for the JAX side).

Layout (loadable with ``LlamaForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``)::

    config.json             HF Llama config + "namm_spec_draft": {format_version, draft_config, sha256, ...}
    model.safetensors       fp32 weights in HF names, untied full-vocabulary lm_head
    generation_config.json  num_assistant_tokens (draft length), constant schedule, confidence threshold 0
    vocab_map.safetensors   only for a reduced-head draft: "vocab_map" [V'] int64, the kept token ids
    tokenizer files         copied from the target's directory

Reduced head: Llama has no lm_head bias, so "-inf outside the kept set" cannot be expressed in the
HF weights. The export therefore keeps the full head (trained rows for kept tokens, the initial rows
elsewhere): transformers' assisted generation uses that full head (still lossless, verification is
exact; only acceptance may differ), and our own loop reads ``vocab_map.safetensors`` and evaluates
exactly the distribution that was trained (softmax over the kept tokens, 0 elsewhere).

The directory is written to a temporary sibling and renamed into place, so a reader sees a complete
export or none; the SHA-256 of ``model.safetensors`` in ``config.json`` makes a corrupt copy fail loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from spec_decode.draft import DraftConfig, Params, params_from_hf, params_to_hf

FORMAT_KEY = "namm_spec_draft"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


class DraftExportError(RuntimeError):
    """An export directory that is missing, corrupt, or from another format version."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hf_config(cfg: DraftConfig) -> dict:
    """The HF ``LlamaConfig`` dict of a draft."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "dtype": "float32",
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "use_cache": True,
    }


def export_draft(out_dir: str | os.PathLike, cfg: DraftConfig, params: Params, *,
                 tokenizer_dir: str | os.PathLike | None = None, vocab_map: np.ndarray | None = None,
                 draft_length: int = 4, info: Mapping[str, Any] | None = None) -> Path:
    """Write the HF directory atomically; ``info`` (target name, divergence, steps...) goes into config.json."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        save_file(params_to_hf(params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "draft_config": cfg.to_dict(),
                "sha256": sha256_file(tmp / "model.safetensors"), "reduced_vocab": vocab_map is not None,
                "info": json.loads(json.dumps(dict(info or {}), default=str))}
        if vocab_map is not None:
            vm = np.asarray(vocab_map, np.int64)
            if vm.ndim != 1 or vm.min() < 0 or vm.max() >= cfg.vocab_size or len(np.unique(vm)) != len(vm):
                raise ValueError(f"vocab_map must be unique token ids in [0, {cfg.vocab_size}); got shape {vm.shape}")
            save_file({"vocab_map": vm}, str(tmp / "vocab_map.safetensors"))
            meta["vocab_map_sha256"] = sha256_file(tmp / "vocab_map.safetensors")
        (tmp / "config.json").write_text(json.dumps({**hf_config(cfg), FORMAT_KEY: meta}, indent=2) + "\n")
        gen = {"num_assistant_tokens": int(draft_length), "num_assistant_tokens_schedule": "constant",
               "assistant_confidence_threshold": 0.0, "bos_token_id": cfg.bos_token_id,
               "eos_token_id": cfg.eos_token_id, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer_dir is not None:
            copied = 0
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copy2(src, tmp / name)
                    copied += 1
            if not copied:
                raise ValueError(f"no tokenizer files in {tokenizer_dir}; pass the target model's directory")
        if out.exists():
            old = out.parent / f".{out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_export_meta(path: str | os.PathLike, verify: bool = True) -> tuple[dict, dict]:
    """``(hf_config, draft_meta)`` of an export; raises ``DraftExportError`` if anything is off."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise DraftExportError(f"{path} has no config.json; export the draft with spec_decode.export.export_draft")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DraftExportError(f"{cfg_path} is not valid JSON ({e}); re-export the draft") from e
    meta = config.get(FORMAT_KEY)
    if meta is None or meta.get("format_version") != FORMAT_VERSION:
        raise DraftExportError(f"{path} is not a draft export of format version {FORMAT_VERSION}; re-export it")
    weights = path / "model.safetensors"
    if not weights.exists():
        raise DraftExportError(f"{weights} is missing; re-export the draft")
    if verify and sha256_file(weights) != meta["sha256"]:
        raise DraftExportError(f"{weights} is corrupt (checksum mismatch with config.json); re-export the draft")
    if meta.get("reduced_vocab"):
        vm = path / "vocab_map.safetensors"
        if not vm.exists() or (verify and sha256_file(vm) != meta.get("vocab_map_sha256")):
            raise DraftExportError(f"{vm} is missing or corrupt; re-export the draft")
    return config, meta


def load_draft(path: str | os.PathLike) -> tuple[DraftConfig, Params, np.ndarray | None]:
    """JAX side: ``(cfg, params, vocab_map)`` of an export (checksum verified)."""
    path = Path(path)
    _, meta = read_export_meta(path)
    cfg = DraftConfig.from_dict(meta["draft_config"])
    params = params_from_hf(load_file(str(path / "model.safetensors")), cfg)
    vocab_map = load_file(str(path / "vocab_map.safetensors"))["vocab_map"] if meta.get("reduced_vocab") else None
    return cfg, params, vocab_map
