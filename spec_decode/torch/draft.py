"""Loading an exported draft for the torch runtime, with the checks that keep it lossless and honest.

``DraftHandle.from_pretrained(dir, target)`` verifies the export's checksum (a corrupt export fails
loudly) and refuses a draft whose vocabulary or tokenizer differs from the target's. With a reduced
head (``vocab_map.safetensors``) the draft's logits are computed on the kept rows only and are -inf
elsewhere: proposal probability 0 outside the kept set, as trained.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, DynamicCache, LlamaForCausalLM

from namm.shards import read_json_object

FORMAT_KEY = "namm_spec_draft"   # written by spec_decode.export (JAX side); the format is the bridge
SUPPORTED_FORMATS = (1,)


class DraftMismatchError(ValueError):
    """A draft that cannot serve this target (other vocabulary or tokenizer)."""


class CorruptDraftError(RuntimeError):
    """A draft directory whose files are missing or do not match their recorded checksums."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_compatible(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """Raise ``DraftMismatchError`` unless draft and target share vocabulary size and tokenizer."""
    tv = target.config.get_text_config().vocab_size
    dv = draft.config.get_text_config().vocab_size
    if tv != dv:
        raise DraftMismatchError(f"draft vocab_size={dv} != target vocab_size={tv}; distill the draft from this "
                                 f"target (same tokenizer) before using it for speculative decoding")
    if target_tokenizer is not None and draft_tokenizer is not None:
        if target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise DraftMismatchError("draft tokenizer differs from the target tokenizer (token -> id maps differ); "
                                     "export the draft with the target's tokenizer files")


class DraftHandle:
    """A draft ``LlamaForCausalLM`` plus an optional reduced head over ``vocab_map`` [V'] token ids."""

    def __init__(self, model, vocab_map: torch.Tensor | None = None):
        self.model = model.eval()
        self.vocab_map = vocab_map
        self.vocab_size = model.config.vocab_size
        if vocab_map is not None:
            self.head = model.lm_head.weight[vocab_map].detach().contiguous()          # [V', D]

    @classmethod
    def from_pretrained(cls, path, target=None, target_tokenizer=None, reduced_head: bool = True,
                        dtype=torch.float32) -> "DraftHandle":
        path = Path(path)
        cfg_path = path / "config.json"
        config = read_json_object(cfg_path, CorruptDraftError, f"{path} has no config.json; point to a directory "
                                  "written by spec_decode.export", "re-export the draft (a Llama config)")
        meta = config.get(FORMAT_KEY)
        if meta is not None and (not isinstance(meta, dict) or meta.get("format_version") not in SUPPORTED_FORMATS):
            version = meta.get("format_version") if isinstance(meta, dict) else None
            raise CorruptDraftError(f"{cfg_path}: unknown draft format_version {version!r} (this runtime reads "
                                    f"{list(SUPPORTED_FORMATS)}); upgrade namm-spec or re-export the draft")
        if target is not None and config.get("vocab_size") is not None:   # refused before the weights load
            tv = target.config.get_text_config().vocab_size
            if int(config["vocab_size"]) != tv:
                raise DraftMismatchError(f"draft {path} has vocab_size={config['vocab_size']} != target vocab_size="
                                         f"{tv}; distill the draft from this target (same tokenizer) before using it "
                                         f"for speculative decoding")
        if meta is not None:  # our exports carry checksums; a plain HF Llama directory loads unchecked
            weights = path / "model.safetensors"
            if not weights.exists() or _sha256(weights) != meta.get("sha256"):
                raise CorruptDraftError(f"{weights} is missing or corrupt (checksum mismatch); re-export the draft")
        try:
            model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
        except Exception as e:
            raise CorruptDraftError(f"cannot load the draft from {path} ({type(e).__name__}: {e}); re-export it") from e
        vocab_map = None
        if reduced_head and meta is not None and meta.get("reduced_vocab"):
            vm = path / "vocab_map.safetensors"
            if not vm.exists() or _sha256(vm) != meta.get("vocab_map_sha256"):
                raise CorruptDraftError(f"{vm} is missing or corrupt; re-export the draft")
            vocab_map = load_file(str(vm))["vocab_map"].long()
        if target is not None:
            draft_tok = None
            if target_tokenizer is not None:
                try:
                    draft_tok = AutoTokenizer.from_pretrained(path)
                except Exception as e:
                    raise DraftMismatchError(f"{path} has no loadable tokenizer ({e}); export the draft with "
                                             f"tokenizer_dir=<target model directory>") from e
            check_compatible(target, model, target_tokenizer, draft_tok)
        return cls(model, vocab_map)

    @torch.no_grad()
    def next_logits(self, input_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Next-token logits ``[V]`` after ``input_ids [1, T]`` appended to ``cache`` (-inf off the kept set)."""
        if self.vocab_map is None:
            return self.model(input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        h = self.model.model(input_ids, past_key_values=cache, use_cache=True).last_hidden_state[0, -1]   # [D]
        out = torch.full((self.vocab_size,), float("-inf"), dtype=h.dtype)
        out[self.vocab_map] = self.head @ h
        return out
