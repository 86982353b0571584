"""NAMM policies evolved with this codebase and shipped with it.

Each subdirectory is a policy directory written by ``namm.export.save_pretrained`` (``config.json`` +
``model.safetensors``, about 20 KB); its ``README.md`` gives the command that trained it and what it
measured. A bare name loads it wherever a policy path is accepted::

    NAMMPolicy.from_pretrained("smollm2-i1")           # or policy=namm policy.path=smollm2-i1

A path that exists on disk always wins over a bundled name. Pure Python: no torch or JAX import.
"""

from __future__ import annotations

import os
from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the bundled policies (subdirectories holding a ``config.json``)."""
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())


def resolve(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists, else the bundled policy of that name; else an error naming both."""
    p = Path(path)
    if p.exists():
        return p
    name = str(path)
    if name in available():
        return PRETRAINED_DIR / name
    raise FileNotFoundError(
        f"policy {name!r}: no such directory, and no bundled policy of that name (bundled: "
        f"{', '.join(available()) or 'none'}); export one with python -m experiments.train_namm")
