"""Metrics logging: a local JSONL file that is always written, plus wandb (offline by default).

    tracker = Tracker(out_dir, config=cfg_dict, mode="offline", project="namm-spec")
    tracker.log({"fitness/mean": 0.93}, step=gen)
    tracker.close()

The JSONL file is appended to, so a resumed run continues the same file; each line is
``{"step": int | null, "time": float, **metrics}``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


class Tracker:
    def __init__(self, out_dir: str | os.PathLike, config: Mapping[str, Any] | None = None,
                 mode: str = "offline", project: str = "namm-spec", name: str | None = None,
                 metrics_file: str = "metrics.jsonl", resume_id: str | None = None):
        if mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb_mode={mode!r}; use one of {WANDB_MODES}")
        mode = os.environ.get("WANDB_MODE", mode)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / metrics_file
        self._run = None
        if mode != "disabled":
            try:
                import wandb

                self._run = wandb.init(project=project, name=name, config=dict(config or {}), mode=mode,
                                       dir=str(self.out_dir), id=resume_id, resume="allow" if resume_id else None,
                                       reinit="finish_previous")
            except Exception as e:  # logging must never kill a training run
                log.warning("wandb disabled for this run (%s); metrics still go to %s", e, self.metrics_path)
                self._run = None

    def log(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        row = {"step": step, "time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._run is not None:
            self._run.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=step)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _plain(v: Any) -> Any:
    """NumPy/JAX/torch scalars -> Python numbers so that JSON accepts them."""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(v, "tolist"):
        return v.tolist()
    return v


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics JSONL file (a torn last line from a killed run is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
