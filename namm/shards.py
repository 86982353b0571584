"""A framework-free shard store: named shards of NumPy arrays plus a manifest.

Used for KV statistics (``namm.stats``) and teacher data (``spec_decode``). Every file is written
atomically (temporary file + ``os.replace``), so a killed writer leaves either the old state or the
new one, never half a file (its leftover temporary file is deleted by the next writer to open the
store, once 10 minutes old); a rerun asks ``has(name, verify=True)`` and skips finished shards,
rewriting a truncated or altered one. A manifest records a *fingerprint* (the model and the config
that produced the data); opening a store with another fingerprint is refused with an error naming
the keys that differ.

Layout::

    root/
      manifest.json            {"format", "version", "kind", "fingerprint", "shards": {name: {...}}}
      <name>.safetensors       arrays of one shard (metadata: JSON under key "meta")
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

FORMAT = "namm-shards"
STALE_AFTER_S = 600.0   # a temporary file untouched this long belongs to no live writer
VERSION = 1


class ShardError(RuntimeError):
    """A shard store that cannot be used as asked (wrong data, corrupt file, unknown version)."""


KILL_ENV = "NAMM_KILL_AT"


def kill_point(name: str) -> None:
    """Testing hook: SIGKILL this process at the named point when ``NAMM_KILL_AT`` names it.

    ``NAMM_KILL_AT=export`` kills the first time the point ``export`` is reached, ``NAMM_KILL_AT=shard:2``
    the second time. Points: ``shard`` (a shard file is in place, the manifest not yet updated),
    ``generation`` (a generation is logged, its checkpoint not yet written), ``export`` (the policy's
    weights are written, its config not yet). Unset (the default), this does nothing.
    """
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    point, _, nth = want.partition(":")
    if point != name:
        return
    kill_point.counts[name] = kill_point.counts.get(name, 0) + 1
    if kill_point.counts[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


kill_point.counts = {}


def remove_stale_temporaries(directory: Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporary files (``.*.tmp``) a killed writer left in ``directory``: those last modified more
    than ``older_than_s`` seconds ago (a directory other processes may be writing into needs a margin)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    gone, now = [], time.time()
    for tmp in directory.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                gone.append(tmp)
        except FileNotFoundError:       # finished (renamed) or removed meanwhile
            pass
    return gone


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


REWRITE_FIX = ("rerun the extraction (the same command), which rewrites only the missing, truncated or corrupt "
               "shards (or delete the file first)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def read_json_object(path: Path, error: type[Exception], missing: str, fix: str) -> dict:
    """A JSON object from ``path``, or ``error`` with one line: ``missing`` when the file is absent, else what is
    wrong with it followed by ``fix`` (e.g. "re-export the policy")."""
    path = Path(path)
    if not path.is_file():
        raise error(missing)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{path} must hold a JSON object; {fix}")
    return obj


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _canonical(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int/float keys compare the way they are stored."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _diff_keys(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _diff_keys(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: stored={va!r} requested={vb!r}")
    return out


class ShardStore:
    """Named shards in ``root`` for one ``kind`` of data produced under one ``fingerprint``.

    ``fingerprint`` is a JSON-able dict (model name, layer subset, context lengths, ...). Opening an
    existing store whose manifest has another kind or fingerprint raises ``ShardError``.
    Pass ``fingerprint=None`` to open read-only data of any fingerprint.
    """

    def __init__(self, root: str | os.PathLike, kind: str, fingerprint: Mapping | None = None):
        self.root = Path(root)
        self.kind = kind
        self.manifest_path = self.root / "manifest.json"
        if self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError as e:
                raise ShardError(f"{self.manifest_path} is not valid JSON ({e}); delete the directory and re-extract") from e
            if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
                raise ShardError(
                    f"{self.manifest_path}: format {manifest.get('format')!r} version {manifest.get('version')!r} "
                    f"is not {FORMAT!r} version {VERSION}; re-extract with this version of the code")
            if manifest.get("kind") != kind:
                raise ShardError(f"{self.root} holds {manifest.get('kind')!r} shards, not {kind!r}; "
                                 f"point to the right directory")
            if fingerprint is not None and manifest["fingerprint"] != _canonical(fingerprint):
                diff = "; ".join(_diff_keys(manifest["fingerprint"], _canonical(fingerprint)))
                raise ShardError(f"{self.root} was extracted with another model or config ({diff}); "
                                 f"use another output directory or delete it to re-extract")
            self.manifest = manifest
        else:
            if fingerprint is None:
                raise ShardError(f"no shard store at {self.root} (missing manifest.json); run the extraction first")
            self.manifest = {"format": FORMAT, "version": VERSION, "kind": kind,
                             "fingerprint": _canonical(fingerprint), "shards": {}}
            atomic_write_json(self.manifest_path, self.manifest)
        if fingerprint is not None:   # a writer: what a killed writer left half-written goes (after a margin, as
            remove_stale_temporaries(self.root, STALE_AFTER_S)   # several runs may extract into one store at once)

    @property
    def fingerprint(self) -> dict:
        return self.manifest["fingerprint"]

    def names(self) -> list[str]:
        return sorted(self.manifest["shards"])

    def has(self, name: str, verify: bool = False) -> bool:
        """Whether shard ``name`` is recorded and its file exists; ``verify``: and matches its recorded size and
        checksum (a truncated or altered file counts as absent, so a resumed writer rewrites it)."""
        entry = self.manifest["shards"].get(name)
        if entry is None or not (self.root / entry["file"]).exists():
            return False
        return not verify or self.problem(name) is None

    def problem(self, name: str) -> str | None:
        """None when shard ``name``'s file matches the manifest, else what is wrong with it."""
        entry = self.manifest["shards"].get(name)
        if entry is None:
            return f"no shard {name!r} in {self.root}"
        path = self.root / entry["file"]
        if not path.exists():
            return f"shard file {path} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return (f"shard file {path} is corrupt or truncated ({size} bytes, the manifest records "
                    f"{entry['bytes']})")
        if _sha256(path) != entry["sha256"]:
            return f"shard file {path} is corrupt or truncated (checksum mismatch)"
        return None

    def write(self, name: str, arrays: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
        """Write one shard atomically, then record it in the manifest (also atomically)."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad shard name {name!r}")
        path = self.root / f"{name}.safetensors"
        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(arrays, tmp, metadata={"meta": json.dumps(_canonical(dict(meta or {})))})
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        kill_point("shard")
        self.manifest["shards"][name] = {"file": path.name, "bytes": path.stat().st_size,
                                         "sha256": _sha256(path), "meta": _canonical(dict(meta or {}))}
        atomic_write_json(self.manifest_path, self.manifest)

    def read(self, name: str, verify: bool = True) -> tuple[dict[str, np.ndarray], dict]:
        """Return ``(arrays, meta)`` of one shard; a truncated or altered file raises ``ShardError``."""
        entry = self.manifest["shards"].get(name)
        if entry is None:
            raise ShardError(f"no shard {name!r} in {self.root}; shards: {self.names()[:5]}...")
        path = self.root / entry["file"]
        if not path.exists():
            raise ShardError(f"shard file {path} is missing; {REWRITE_FIX}")
        problem = self.problem(name) if verify else None
        if problem:
            raise ShardError(f"{problem}; {REWRITE_FIX}")
        try:
            arrays = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ShardError(f"shard file {path} cannot be read ({_one_line(e)}); {REWRITE_FIX}") from e
        return arrays, dict(entry["meta"])

    def total_bytes(self) -> int:
        return sum(e["bytes"] for e in self.manifest["shards"].values())
