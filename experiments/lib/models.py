"""One loader for target models: ``smollm2``, a tiny random model, a local directory, a GGUF file, a hub id.

    model, tok = load_model("smollm2")                       # converted once from the PyPI GGUF
    model, tok = tiny_random("llama", seed=0)                # unit-test model, no download
    model, tok = load_model("path/to/dir")                   # any saved HF causal LM
    model, tok = load_model("meta-llama/Meta-Llama-3-8B", dtype="bfloat16", device="cuda",
                            config_overrides={"rope_theta": 3.6e6, "max_position_embeddings": 32768})

Every model comes back in eval mode with ``attn_implementation="sdpa"`` unless told otherwise.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

log = logging.getLogger(__name__)

TINY_ARCHS = ("llama", "qwen3", "mistral")
# Byte-level vocabulary of the tiny tokenizer: ids 0..255 are the bytes, then the specials.
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
TINY_VOCAB = 256 + 3
# Raw-completion models and the tiny tokenizer share this minimal chat layout.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SPEC_FORMS = ("'smollm2'", "'tiny_random' (with arch=llama|qwen3|mistral, seed=N)", "a local model directory",
              "a path to a .gguf file", "a hub id such as 'meta-llama/Meta-Llama-3-8B'")


class ModelSpecError(ValueError):
    """A model spec or option that cannot be loaded; the message says what to pass instead."""


# ----------------------------------------------------------------------------------------------
# tiny random models (unit tests)


def byte_tokenizer():
    """A byte-level ``PreTrainedTokenizerFast`` built in memory: id b = byte b, then <s>, </s>, <pad>.

    ``tokenizer(text)`` prepends <s>; ``decode`` round-trips any UTF-8 text; a small chat template is set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()  # 256 printable stand-ins for the bytes
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab.update({BOS: 256, EOS: 257, PAD: 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 256)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   model_max_length=8192, clean_up_tokenization_spaces=False)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the one ``ByteLevel`` uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_config(arch: str = "llama", **overrides):
    """The unit-test config: hidden 64, 2 layers, 4 query / 2 KV heads of dim 16, 8K positions.

    ``initializer_range`` 0.2 (not HF's 0.02) so logits are peaked and greedy decoding varies.
    """
    from transformers import LlamaConfig, MistralConfig, Qwen3Config

    classes = {"llama": LlamaConfig, "qwen3": Qwen3Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ModelSpecError(f"tiny_random arch={arch!r} is unknown; use one of {', '.join(TINY_ARCHS)}")
    kw: dict[str, Any] = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
        initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=256, eos_token_id=257, pad_token_id=258, dtype="float32",
    )
    if arch in ("mistral", "qwen3"):
        kw["sliding_window"] = None
    kw.update(overrides)
    return classes[arch](**kw)


def tiny_random(arch: str = "llama", seed: int = 0, **config_overrides):
    """A tiny random causal LM and its byte-level tokenizer; the same seed gives identical weights.

    Returns ``(model, tokenizer)``; the model is fp32, eval mode, sdpa attention.
    """
    from transformers import AutoModelForCausalLM

    attn = config_overrides.pop("attn_implementation", "sdpa")
    config = tiny_config(arch, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.config.name_or_path = f"tiny_random-{arch}-seed{seed}"
    model.name_or_path = model.config.name_or_path
    model.eval()
    return model, byte_tokenizer()


# ----------------------------------------------------------------------------------------------
# the loader


def load_model(spec: str | Mapping[str, Any], dtype: str | torch.dtype = "float32", device: str = "cpu",
               *, arch: str = "llama", seed: int = 0, config_overrides: Mapping[str, Any] | None = None,
               attn_implementation: str = "sdpa", cache: str | os.PathLike | None = None):
    """Load ``(model, tokenizer)`` from one of: ``"smollm2"``, ``"tiny_random"`` (``arch``, ``seed``),
    a local directory, a ``.gguf`` file, a hub id; a mapping is a ``model`` config node.

    ``config_overrides`` are set on the model config before the weights load (e.g. ``rope_theta``,
    ``max_position_embeddings``). The model is in eval mode on ``device``.
    """
    if isinstance(spec, Mapping) or _is_dictconfig(spec):
        return load_model_from_cfg(spec, device=device, cache=cache)
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ModelSpecError(f"model spec {spec!r} is not a string; pass one of: {'; '.join(SPEC_FORMS)}")
    torch_dtype = _dtype(dtype)
    overrides = dict(config_overrides or {})
    text = str(spec).strip()

    if text == "tiny_random":
        model, tok = tiny_random(arch, seed, attn_implementation=attn_implementation, **overrides)
        return model.to(device=device, dtype=torch_dtype).eval(), tok
    if text == "smollm2":
        from experiments.lib.assets import SMOLLM2_NAME, smollm2_dir

        model, tok = _load_pretrained(str(smollm2_dir(cache)), torch_dtype, device, overrides, attn_implementation)
        model.config.name_or_path = SMOLLM2_NAME
        model.name_or_path = SMOLLM2_NAME
        return model, tok

    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file {path} does not exist; pass the path to an existing .gguf file")
        model, tok = _load_pretrained(str(path.parent), torch_dtype, device, overrides, attn_implementation,
                                      gguf_file=path.name)
        model.config.name_or_path = model.name_or_path = str(path)
        return model, tok
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model directory {path} has no config.json; pass a directory written by "
                                 f"save_pretrained (config.json + *.safetensors + tokenizer files)")
        return _load_pretrained(str(path), torch_dtype, device, overrides, attn_implementation)
    if _looks_like_hub_id(text) and not path.exists():
        return _load_hub(text, torch_dtype, device, overrides, attn_implementation)
    raise ModelSpecError(f"model spec {text!r} is not a known name, an existing directory or .gguf file, or a "
                         f"hub id; pass one of: {'; '.join(SPEC_FORMS)}")


def load_model_from_cfg(model_cfg: Any, device: str = "cpu", cache: str | os.PathLike | None = None):
    """``(model, tokenizer)`` from the Hydra ``model`` group node (``source``, ``dtype``, ``arch``,
    ``seed``, ``config_overrides``, ``attn_implementation``)."""
    cfg = _to_dict(model_cfg)
    if "source" not in cfg:
        raise ModelSpecError(f"model config {cfg.get('name', '?')!r} has no 'source'; set model.source to one of: "
                             f"{'; '.join(SPEC_FORMS)}")
    max_context = cfg.get("max_context")
    if max_context is not None and (isinstance(max_context, bool) or not isinstance(max_context, int)
                                    or max_context < 2):
        raise ModelSpecError(f"model.max_context={max_context!r}; use a token count >= 2 (the prompt plus "
                             f"max_new_tokens must fit in it) or null for no truncation")
    model, tok = load_model(cfg["source"], dtype=cfg.get("dtype", "float32"), device=device,
                            arch=cfg.get("arch", "llama"), seed=int(cfg.get("seed", 0)),
                            config_overrides=cfg.get("config_overrides") or {},
                            attn_implementation=cfg.get("attn_implementation", "sdpa"), cache=cache)
    n_pos = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    if max_context is not None and n_pos and max_context > int(n_pos):
        raise ModelSpecError(
            f"model.max_context={max_context} exceeds the context of model {cfg.get('name', cfg['source'])!r} "
            f"({n_pos} tokens, max_position_embeddings); set model.max_context={n_pos} or less, or extend the "
            f"model with model.config_overrides.max_position_embeddings (and a matching rope_theta)")
    return model, tok


def model_signature(model) -> dict:
    """What an exported policy or draft records about its base model, and checks on load."""
    c = model.config
    n_q = c.num_attention_heads
    return {
        "name_or_path": str(getattr(c, "name_or_path", "") or getattr(model, "name_or_path", "")),
        "model_type": c.model_type,
        "num_layers": int(c.num_hidden_layers),
        "num_q_heads": int(n_q),
        "num_kv_heads": int(getattr(c, "num_key_value_heads", None) or n_q),
        "head_dim": int(getattr(c, "head_dim", None) or c.hidden_size // n_q),
        "vocab_size": int(c.vocab_size),
    }


def apply_config_overrides(config, overrides: Mapping[str, Any]):
    """Set ``overrides`` on a transformers config; ``rope_theta`` goes into ``rope_parameters`` (v5)."""
    for key, value in overrides.items():
        if key == "rope_theta":
            rope = dict(getattr(config, "rope_parameters", None) or {"rope_type": "default"})
            rope["rope_theta"] = float(value)
            config.rope_parameters = rope
        elif key == "rope_parameters":
            rope = dict(getattr(config, "rope_parameters", None) or {})
            rope.update(dict(value))
            config.rope_parameters = rope
        else:
            setattr(config, key, value)
    return config


def _load_pretrained(src: str, dtype: torch.dtype, device: str, overrides: Mapping[str, Any], attn: str,
                     gguf_file: str | None = None, **hub_kw):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    config = apply_config_overrides(AutoConfig.from_pretrained(src, **extra, **hub_kw), overrides)
    placement = {} if str(device) == "cpu" else {"device_map": str(device)}
    model = AutoModelForCausalLM.from_pretrained(src, config=config, dtype=dtype, attn_implementation=attn,
                                                 **placement, **extra, **hub_kw)
    tok = AutoTokenizer.from_pretrained(src, **extra, **hub_kw)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    n_pos = getattr(model.config, "max_position_embeddings", None)
    if n_pos and (tok.model_max_length is None or tok.model_max_length > 10**7):
        tok.model_max_length = int(n_pos)
    return model.eval(), tok


def _load_hub(repo_id: str, dtype, device, overrides, attn):
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    reachable = offline or _hub_reachable()
    try:  # without a route to the hub, only the local HF cache can answer (fails fast instead of retrying)
        return _load_pretrained(repo_id, dtype, device, overrides, attn,
                                **({} if reachable else {"local_files_only": True}))
    except OSError as e:  # transformers turns connection, 404 and offline-cache misses into OSError
        why = ("HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is unreachable" if not reachable
               else "the repo is gated or missing on the hub")
        raise ModelSpecError(
            f"cannot load hub id {repo_id!r}: {why} and it is not in the local Hugging Face cache "
            f"({_first_line(e)}); download it where the hub is reachable and pass its local directory "
            f"instead (model.source=/path/to/dir)") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint succeeds (proxies are trusted to know better)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_hub_id(text: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+", text) is not None and ".." not in text


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ModelSpecError(f"dtype {dtype!r} is unknown; use one of float32, float16, bfloat16")
    return DTYPES[str(dtype)]


def _is_dictconfig(x: Any) -> bool:
    try:
        from omegaconf import DictConfig
    except ImportError:
        return False
    return isinstance(x, DictConfig)


def _to_dict(node: Any) -> dict:
    if _is_dictconfig(node):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(node, resolve=True)
    if isinstance(node, Mapping):
        return dict(node)
    raise ModelSpecError(f"model config must be a mapping (the Hydra 'model' node), got {type(node).__name__}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0][:200] if lines else type(e).__name__)
