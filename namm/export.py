"""Export a trained NAMM to a policy directory (``config.json`` + ``model.safetensors``). No torch import.

``save_pretrained(path, params_flat, cfg, norm_stats, base_model)`` writes

    config.json         {"format_version": 1, "namm": cfg.to_dict(), "norm_stats": {"mean", "var"},
                         "base_model": {name, num_layers, num_kv_heads, num_q_heads, head_dim},
                         "shared_across_layers_heads": bool, "param_layout": [[name, shape], ...],
                         "num_params": P, "weights_sha256": hex, "library": "namm-spec"}
    model.safetensors   the named parameters of ``namm.scoring.param_layout`` as float32; when the
                        parameters are not shared, each tensor has a leading [num_layers, num_kv_heads]

Both files are written atomically (temporary file + rename), the weights first; the config holds
the weights' checksum, so a torn or mixed directory is detected at load time.
``namm.torch.policy.NAMMPolicy.from_pretrained`` reads it without JAX.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load, save

from namm.config import NAMMConfig
from namm.scoring import num_params, param_layout
from namm.shards import atomic_write_bytes, atomic_write_json, kill_point, read_json_object

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
BASE_MODEL_KEYS = ("name", "num_layers", "num_kv_heads", "num_q_heads", "head_dim")


class ExportError(ValueError):
    """Inputs that cannot be exported (wrong parameter count, bad norm stats, incomplete base model)."""


def _norm_arrays(norm_stats, dim: int) -> tuple[np.ndarray, np.ndarray]:
    if norm_stats is None:
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    if hasattr(norm_stats, "finalize"):  # a running NormStats
        norm_stats = norm_stats.finalize()
    mean, var = (np.asarray(x, np.float32).reshape(-1) for x in norm_stats)
    if mean.shape != (dim,) or var.shape != (dim,):
        raise ExportError(f"norm_stats need mean[{dim}] and var[{dim}], got {mean.shape} and {var.shape}")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
        raise ExportError("norm_stats must be finite with var >= 0; recompute them with a calibration pass")
    return mean, var


def named_params(params_flat, cfg: NAMMConfig, lead: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    """Flat ``[*lead, P]`` -> ``{name: [*lead, *shape]}`` in ``param_layout`` order (float32)."""
    flat = np.asarray(params_flat, np.float32)
    p = num_params(cfg)
    if flat.shape != (*lead, p):
        raise ExportError(f"params_flat has shape {flat.shape}, expected {(*lead, p)} for this config")
    out, i = {}, 0
    for name, shape in param_layout(cfg):
        size = int(np.prod(shape))
        out[name] = np.ascontiguousarray(flat[..., i : i + size].reshape(*lead, *shape))
        i += size
    return out


SCHEDULE_KEYS = ("chunk_size", "update_interval", "final_update")


def _sorted_header(blob: bytes) -> bytes:
    """The safetensors file with its JSON header's keys sorted: ``save`` writes ``__metadata__`` in hash order,
    which differs between processes, so the same parameters would give other bytes (and checksum) each run."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)                  # padded to 8 bytes, as safetensors writes it
    return len(header).to_bytes(8, "little") + header + blob[8 + n:]


def save_pretrained(
    path,
    params_flat,
    cfg: NAMMConfig,
    norm_stats,
    base_model: Mapping[str, Any],
    shared_across_layers_heads: bool = True,
    trained_budget: float | int | None = None,
    trained_schedule: Mapping[str, Any] | None = None,
) -> Path:
    """Write the policy directory; returns its path.

    params_flat: ``[P]`` (shared, the paper's setting) or ``[num_layers, num_kv_heads, P]``.
    norm_stats: ``(mean [S], var [S])``, a ``NormParams``/``NormStats``, or None (identity).
    base_model: the model's signature ``{name, num_layers, num_kv_heads, num_q_heads, head_dim}``.
    trained_budget: the runtime cap the policy was evolved under (``fitness.policy_budget``); the
    runtime applies it when no ``budget`` is given.
    trained_schedule: the runtime schedule the policy was evolved under (``update_interval``,
    ``final_update``, ``chunk_size``); the runtime applies each key that is not given explicitly.
    """
    missing = [k for k in BASE_MODEL_KEYS if k not in base_model]
    if missing:
        raise ExportError(f"base_model lacks {missing}; pass the model's name, layer and head counts")
    base = {k: base_model[k] for k in BASE_MODEL_KEYS}
    for k in BASE_MODEL_KEYS[1:]:
        base[k] = int(base[k])
    lead = () if shared_across_layers_heads else (base["num_layers"], base["num_kv_heads"])
    tensors = named_params(params_flat, cfg, lead)
    mean, var = _norm_arrays(norm_stats, cfg.features.spec_dim)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    blob = _sorted_header(save(tensors, metadata={"format": "namm-policy", "format_version": str(FORMAT_VERSION)}))
    atomic_write_bytes(out / WEIGHTS_NAME, blob)
    kill_point("export")                  # testing hook (NAMM_KILL_AT=export): weights written, config not yet
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "namm-spec",
        "namm": cfg.to_dict(),
        "norm_stats": {"mean": mean.tolist(), "var": var.tolist()},
        "base_model": base,
        "shared_across_layers_heads": bool(shared_across_layers_heads),
        "param_layout": [[name, list(shape)] for name, shape in param_layout(cfg)],
        "num_params": num_params(cfg),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    if trained_budget is not None:
        meta["trained_budget"] = trained_budget
    if trained_schedule:
        unknown = set(trained_schedule) - set(SCHEDULE_KEYS)
        if unknown:
            raise ExportError(f"trained_schedule takes {list(SCHEDULE_KEYS)}, got {sorted(unknown)}")
        meta["trained_schedule"] = dict(trained_schedule)
    atomic_write_json(out / CONFIG_NAME, meta)
    return out


def load_pretrained(path) -> tuple[np.ndarray, NAMMConfig, tuple[np.ndarray, np.ndarray], dict]:
    """Read a policy directory back on the JAX side: (params_flat, cfg, (mean, var), config dict)."""
    path = Path(path)
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    meta = read_json_object(cfg_path, ExportError, f"{path}: no {CONFIG_NAME}; pass a directory written by "
                            "namm.export.save_pretrained", "re-export the policy")
    if meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version")
        raise ExportError(f"{cfg_path}: unknown format_version {version!r} (this version reads "
                          f"[{FORMAT_VERSION}]); upgrade namm-spec or re-export the policy")
    missing = [k for k in ("namm", "norm_stats", "shared_across_layers_heads") if k not in meta]
    if missing:
        raise ExportError(f"{cfg_path}: missing key {missing[0]!r}; re-export the policy")
    cfg = NAMMConfig.from_dict(meta["namm"])
    if not w_path.is_file():
        raise ExportError(f"{path}: no {WEIGHTS_NAME}; the export is incomplete, re-export the policy")
    blob = w_path.read_bytes()
    if meta.get("weights_sha256") not in (None, hashlib.sha256(blob).hexdigest()):
        raise ExportError(f"{w_path} is truncated or corrupted (checksum mismatch with {CONFIG_NAME}); "
                          f"re-export the policy")
    try:
        tensors = load(blob)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type on torn files
        raise ExportError(f"{w_path} is truncated or corrupted ({e}); re-export the policy") from None
    lead = () if meta["shared_across_layers_heads"] else tuple(tensors[param_layout(cfg)[0][0]].shape[:2])
    flat = np.concatenate([tensors[n].reshape(*lead, -1) for n, _ in param_layout(cfg)], axis=-1)
    ns = meta["norm_stats"]
    return flat, cfg, (np.asarray(ns["mean"], np.float32), np.asarray(ns["var"], np.float32)), meta


__all__ = ["ExportError", "FORMAT_VERSION", "load_pretrained", "named_params", "save_pretrained"]
