"""Task loaders: local JSONL in LongBench's schema, and LongBench itself from the Hugging Face hub.

Both go through ``read_jsonl``, which validates every row and names the file and line of a problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

from experiments.tasks.registry import LONGBENCH_TASKS, TaskError, get_spec

SCHEMA = ("input", "context", "answers", "all_classes", "length", "dataset", "_id")
REQUIRED = ("context", "answers", "dataset")
SPLITS = ("all", "train", "test")
LONGBENCH_REPO = "THUDM/LongBench"


def validate_row(row, where: str) -> dict:
    """A row in LongBench's schema with defaults filled in; a one-line ``TaskError`` otherwise."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise TaskError(f"{where}: row is missing {', '.join(repr(k) for k in missing)}; every row needs "
                        f"{', '.join(REQUIRED)} (LongBench schema: {', '.join(SCHEMA)})")
    if not isinstance(row["context"], str):
        raise TaskError(f"{where}: 'context' must be a string")
    answers = row["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise TaskError(f"{where}: 'answers' must be a list of strings")
    get_spec(row["dataset"])  # unknown dataset names fail here, with the known ones listed
    out = dict(row)
    out["answers"] = answers
    out["input"] = row.get("input") or ""
    out.setdefault("all_classes", None)
    out.setdefault("length", len(row["context"].split()))
    out.setdefault("_id", where)
    return out


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a LongBench-schema JSONL file (blank lines skipped)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskError(f"task file {path} does not exist; pass task.path=FILE with a LongBench-schema JSONL") from None
    except IsADirectoryError:
        raise TaskError(f"task file {path} is a directory; pass task.path=FILE with a LongBench-schema JSONL") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"cannot read task file {path}: {getattr(e, 'strerror', None) or e}") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
        row = validate_row(obj, f"{path}:{i}")
        if row["_id"] == f"{path}:{i}":
            row["_id"] = f"{path.stem}-{i}"
        rows.append(row)
    if not rows:
        raise TaskError(f"task file {path} holds no rows")
    return rows


def write_jsonl(rows: Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Write rows atomically as JSONL (one object per line, UTF-8)."""
    from namm.shards import atomic_write_bytes

    path = Path(path)
    text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def in_split(_id: str, split: str, train_fraction: float = 0.5) -> bool:
    """Deterministic train/test split by a hash of ``_id``: train if sha256(_id) / 2^64 < fraction."""
    if split not in SPLITS:
        raise TaskError(f"split={split!r}; use one of {', '.join(SPLITS)}")
    if split == "all":
        return True
    u = int.from_bytes(hashlib.sha256(str(_id).encode()).digest()[:8], "big") / 2 ** 64
    return (u < train_fraction) == (split == "train")


def split_rows(rows: Iterable[dict], split: str, train_fraction: float = 0.5) -> list[dict]:
    return [r for r in rows if in_split(r["_id"], split, train_fraction)]


def load_longbench(subset: str, cache_dir: str | os.PathLike) -> list[dict]:
    """One LongBench subset from the hub (``data.zip`` of ``THUDM/LongBench``), cached as JSONL."""
    if subset not in LONGBENCH_TASKS:
        raise TaskError(f"{subset!r} is not a LongBench subset; use one of {', '.join(LONGBENCH_TASKS)}")
    local = Path(cache_dir).expanduser() / "longbench" / f"{subset}.jsonl"
    if not local.exists():
        fix = f"get data/{subset}.jsonl of {LONGBENCH_REPO} elsewhere and run task=jsonl task.path=FILE"
        hub_cache = str(Path(cache_dir).expanduser() / "hub")
        try:
            from huggingface_hub import hf_hub_download

            # without a route to the hub only the local cache can answer (no retry loop)
            offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or not _hub_reachable()
            archive = hf_hub_download(LONGBENCH_REPO, "data.zip", repo_type="dataset", cache_dir=hub_cache,
                                      local_files_only=offline)
        except Exception as e:  # hub unreachable, offline mode, auth: all one line
            msg = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:100]
            raise TaskError(f"LongBench needs the Hugging Face hub, which is unreachable or refused "
                            f"({type(e).__name__}: {msg}); {fix}") from None
        with zipfile.ZipFile(archive) as z:
            member = next((m for m in z.namelist() if m.endswith(f"/{subset}.jsonl") or m == f"{subset}.jsonl"), None)
            if member is None:
                raise TaskError(f"{archive} has no {subset}.jsonl; delete it to download again")
            rows = [json.loads(x) for x in z.read(member).decode("utf-8").splitlines() if x.strip()]
        write_jsonl(rows, local)
    return read_jsonl(local)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connection to the hub endpoint succeeds (a configured proxy is trusted)."""
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
