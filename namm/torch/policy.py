"""The NAMM policy in the PyTorch runtime: load an exported policy directory, run one update per layer.

Policy directory (written by ``namm.export.save_pretrained``; no JAX needed here)::

    config.json         format_version, namm (features/scorer/selection), norm_stats {mean, var},
                        base_model {name, num_layers, num_kv_heads, num_q_heads, head_dim},
                        shared_across_layers_heads, param_layout, num_params, weights_sha256
    model.safetensors   the named parameters (float32); with shared_across_layers_heads=False every
                        tensor has a leading [num_layers, num_kv_heads] axis pair

One update (per layer, every ``update_interval`` tokens): GQA-averaged attention rows of the new
queries -> spectrogram with the carried left context -> EMA -> frozen normalisation -> [age | EMA]
features -> BAM (or MLP) scores -> threshold selection (``ragged_max`` or ``masked``, optional top-k
cap) -> keep indices; the cache gathers keys, values and this policy's state (EMA, left context).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from namm.config import ConfigError, NAMMConfig
from namm.shards import read_json_object
from namm.torch import features as F
from namm.torch import scoring, selection
from namm.torch.cache import CacheConfigError, PolicyUpdate, TorchPolicy, model_signature

FORMAT_VERSION = 1
SUPPORTED_FORMATS = (1,)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
REQUIRED_KEYS = (
    "format_version",
    "namm",
    "norm_stats",
    "base_model",
    "shared_across_layers_heads",
    "param_layout",
)


class PolicyFormatError(ValueError):
    """A policy directory that cannot be loaded (missing file or key, corrupt weights, unknown version)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class NAMMPolicy(TorchPolicy):
    """A trained (or untrained, keep-all) NAMM as a runtime policy.

    params: named tensors of ``namm.scoring.param_layout`` (shared), or with a leading
    ``[num_layers, num_kv_heads]`` (not shared). norm_stats: ``(mean [S], var [S])`` or None (no
    normalisation). ``budget``: optional top-k cap as a token count or a fraction of the tokens seen.
    ``recent_fraction`` (runtime only, default 0 as in the paper): the newest ``floor(recent_fraction * cap)``
    tokens of each head are kept whatever their score (H2O's recent window), the rest of the cap by score.
    """

    name = "namm"
    evicts = True
    needs_attention = True

    def __init__(
        self,
        cfg: NAMMConfig,
        params: Mapping[str, torch.Tensor],
        norm_stats=None,
        shared_across_layers_heads: bool = True,
        base_model: Mapping[str, Any] | None = None,
        budget: float | int | None = None,
        chunk_size: int | None = None,
        update_interval: int | None = None,
        final_update: bool = False,
        mode: str | None = None,
        threshold: float | None = None,
        top_k: int | None = None,
        recent_fraction: float = 0.0,
    ):
        sel = cfg.selection
        if mode is not None or threshold is not None or top_k is not None:
            sel = replace(
                sel,
                mode=mode if mode is not None else sel.mode,
                threshold=float(threshold) if threshold is not None else sel.threshold,
                top_k=int(top_k) if top_k is not None else sel.top_k,
            )
        feats = cfg.features
        if chunk_size is not None or update_interval is not None:
            feats = replace(
                feats,
                chunk_size=int(chunk_size) if chunk_size is not None else feats.chunk_size,
                update_interval=int(update_interval) if update_interval is not None else feats.update_interval,
            )
        self.cfg = NAMMConfig(feats, cfg.scorer, sel)
        self.chunk_size = self.cfg.features.chunk_size
        self.update_interval = self.cfg.features.update_interval
        self.final_update = bool(final_update)
        self.shared = bool(shared_across_layers_heads)
        self.base_model = dict(base_model or {})
        if budget is not None:
            selection.budget_tokens(budget, 1)  # validates
        self.budget = budget
        if isinstance(recent_fraction, bool) or not isinstance(recent_fraction, (int, float)) \
                or not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"namm: recent_fraction={recent_fraction!r} must be a number in [0, 1]")
        if recent_fraction and budget is None:
            raise ValueError(f"namm: recent_fraction={recent_fraction} protects part of a budget; set budget too "
                             "(a token count or a fraction of the tokens seen)")
        self.recent_fraction = float(recent_fraction)
        self.params = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in params.items()}
        self._check_params()
        if norm_stats is not None:
            mean, var = (torch.as_tensor(x, dtype=torch.float32).reshape(-1) for x in norm_stats)
            if mean.numel() != self.cfg.features.spec_dim or var.numel() != self.cfg.features.spec_dim:
                raise PolicyFormatError(
                    f"norm_stats need {self.cfg.features.spec_dim} values each, got {mean.numel()} and {var.numel()}"
                )
            self.norm = (mean, var)
        else:
            self.norm = None
        self.stats_accumulator: F.NormStats | None = None
        self._device_cache: dict = {}

    # --- construction ----------------------------------------------------------------------------
    def _check_params(self) -> None:
        layout = dict(scoring.param_layout(self.cfg))
        missing = sorted(set(layout) - set(self.params))
        extra = sorted(set(self.params) - set(layout))
        if missing:
            raise PolicyFormatError(f"missing parameter {missing[0]!r} (config needs {sorted(layout)})")
        if extra:
            raise PolicyFormatError(f"unexpected parameter {extra[0]!r} for a {self.cfg.scorer.kind} scorer")
        for name, shape in layout.items():
            got = tuple(self.params[name].shape)
            want = shape if self.shared else got[:2] + shape
            if got != want or (not self.shared and len(got) != len(shape) + 2):
                raise PolicyFormatError(
                    f"parameter {name!r} has shape {got}, expected {shape}"
                    + ("" if self.shared else " after a leading [num_layers, num_kv_heads]")
                )
        if not self.shared:
            leads = {tuple(t.shape[:2]) for t in self.params.values()}
            recorded = (self.base_model.get("num_layers"), self.base_model.get("num_kv_heads"))
            if len(leads) > 1 or (None not in recorded and leads != {tuple(int(n) for n in recorded)}):
                raise PolicyFormatError(
                    f"per-layer/per-head parameters with leading shapes {sorted(leads)} do not match the recorded "
                    f"base model ({recorded[0]} layers x {recorded[1]} KV heads); re-export the policy"
                )

    @classmethod
    def untrained(cls, cfg: NAMMConfig | None = None, norm_stats=None, **kw) -> "NAMMPolicy":
        """The zero-parameter NAMM: every score is 0, so every token is kept (tests, calibration)."""
        cfg = cfg or NAMMConfig()
        params = {name: torch.zeros(shape) for name, shape in scoring.param_layout(cfg)}
        return cls(cfg, params, norm_stats, **kw)

    @classmethod
    def from_flat(cls, flat, cfg: NAMMConfig, norm_stats=None, **kw) -> "NAMMPolicy":
        """From a flat parameter vector ``[P]`` in ``param_layout`` order."""
        return cls(cfg, scoring.unflatten(torch.as_tensor(flat, dtype=torch.float32), cfg), norm_stats, **kw)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "NAMMPolicy":
        """Load a policy directory written by ``namm.export.save_pretrained``, or a bundled policy by name
        (``namm.pretrained.available()``).

        overrides: budget, chunk_size, update_interval, final_update, mode, threshold, top_k, recent_fraction. A policy
        evolved under a cap (``trained_budget`` in its config) runs at that cap unless ``budget`` is given;
        likewise its ``trained_schedule`` (chunk_size, update_interval, final_update) for keys not given.
        """
        from namm import pretrained

        try:
            path = pretrained.resolve(path)             # a directory, or the name of a bundled policy
        except FileNotFoundError as e:
            raise PolicyFormatError(str(e)) from None
        cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        meta = read_json_object(cfg_path, PolicyFormatError, f"{path}: no {CONFIG_NAME}; export a policy with "
                                "namm.export.save_pretrained", "re-export the policy")
        if "format_version" not in meta:
            raise PolicyFormatError(f"{cfg_path}: missing key 'format_version'; re-export the policy")
        if meta["format_version"] not in SUPPORTED_FORMATS:
            raise PolicyFormatError(
                f"{cfg_path}: unknown format_version {meta['format_version']!r} (this runtime reads "
                f"{list(SUPPORTED_FORMATS)}); upgrade namm or re-export the policy"
            )
        for key in REQUIRED_KEYS:
            if key not in meta:
                raise PolicyFormatError(f"{cfg_path}: missing key {key!r}; re-export the policy")
        ns = meta["norm_stats"]
        if not isinstance(ns, dict) or "mean" not in ns or "var" not in ns:
            raise PolicyFormatError(f"{cfg_path}: missing key 'norm_stats.mean' or 'norm_stats.var'")
        try:
            cfg = NAMMConfig.from_dict(meta["namm"])
        except (ConfigError, TypeError) as e:
            raise PolicyFormatError(f"{cfg_path}: bad 'namm' config: {e}") from None
        if not w_path.is_file():
            raise PolicyFormatError(f"{path}: no {WEIGHTS_NAME}; the export is incomplete, re-export the policy")
        want = meta.get("weights_sha256")
        if want is not None and _sha256(w_path) != want:
            raise PolicyFormatError(
                f"{w_path} is truncated or corrupted (checksum mismatch with config.json); re-export the policy"
            )
        try:
            from safetensors.torch import load_file

            params = load_file(str(w_path))
        except Exception as e:  # safetensors raises SafetensorError / OSError on torn files
            raise PolicyFormatError(f"{w_path} is truncated or corrupted ({e}); re-export the policy") from None
        for name, shape in meta["param_layout"]:
            if name not in params:
                raise PolicyFormatError(f"{w_path}: missing parameter {name!r}; re-export the policy")
        if overrides.get("budget") is None and meta.get("trained_budget") is not None:
            overrides["budget"] = meta["trained_budget"]
        for key, value in (meta.get("trained_schedule") or {}).items():
            if overrides.get(key) is None:
                overrides[key] = value
        return cls(
            cfg,
            params,
            (ns["mean"], ns["var"]),
            shared_across_layers_heads=bool(meta["shared_across_layers_heads"]),
            base_model=meta["base_model"],
            **overrides,
        )

    def check_model(self, model) -> None:
        if self.shared:
            return
        sig = model_signature(model)
        want = tuple(int(n) for n in next(iter(self.params.values())).shape[:2])  # what the parameters hold
        if (sig["num_layers"], sig["num_kv_heads"]) != want:
            raise CacheConfigError(
                f"this NAMM has per-layer/per-head parameters for {want[0]} layers x {want[1]} KV heads "
                f"({self.base_model.get('name', '?')}); the model has {sig['num_layers']} x {sig['num_kv_heads']}. "
                "Use a policy exported with shared_across_layers_heads=True, or the model it was trained on"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mode": self.cfg.selection.mode,
            "threshold": self.cfg.selection.threshold,
            "top_k": self.cfg.selection.top_k,
            "budget": self.budget,
            "chunk_size": self.chunk_size,
            "update_interval": self.update_interval,
            "recent_fraction": self.recent_fraction,
        }

    @property
    def row_multiple(self) -> int:
        """Attention rows are consumed in STFT hops (frames of ``n_fft`` rows, ``hop`` apart)."""
        return self.cfg.features.hop

    # --- one update ------------------------------------------------------------------------------
    def _layer_params(self, layer_idx: int, device) -> dict[str, torch.Tensor]:
        key = (layer_idx if not self.shared else -1, str(device))
        if key not in self._device_cache:
            params = self.params if self.shared else {k: v[layer_idx] for k, v in self.params.items()}
            self._device_cache[key] = {k: v.to(device) for k, v in params.items()}
        return self._device_cache[key]

    def _norm(self, device):
        if self.norm is None:
            return None
        return self.norm[0].to(device), self.norm[1].to(device)

    def features(self, state, rows, positions, valid, n_new):
        """The candidate-independent half of an update: rows ``[B, H, n_new, S]`` -> (features
        ``[B, H, S, F]``, EMA ``[B, H, S, 17]``, left context ``[B, H, S, 16]``, validity ``[B, H, S]``)."""
        c = self.cfg.features
        b, h, s = positions.shape
        device = positions.device
        s_old = s - n_new
        drop = rows.shape[-2] % c.hop
        if drop:  # a late update (one-shot prefill): frames align with the newest queries
            rows = rows[..., drop:, :]
        ema_old = _extend(state.get("ema"), (b, h, s_old, c.spec_dim), s, device)
        ctx_old = _extend(state.get("left_context"), (b, h, s_old, c.n_fft - c.hop), s, device)
        is_new = (torch.arange(s, device=device) >= s_old).expand(b, h, s)
        valid_full = torch.ones(b, h, s, dtype=torch.bool, device=device) if valid is None else valid
        recency = positions.amax(dim=-1, keepdim=True) - positions  # [B, H, S], newest 0
        feats, ema, next_ctx = F.token_features(rows, ctx_old, ema_old, is_new, recency, self._norm(device), c)
        feats = F.with_pooled(feats, positions, valid_full, c)  # + pooled spectrogram if pool_kernel
        return feats, ema, next_ctx, valid_full

    def select_tokens(self, params, feats, positions, valid, seen):
        """Scores of ``params`` on ``feats`` and the kept tokens: (keep ``[B, H, S]`` bool, scores, selection)."""
        valid_full = torch.ones(positions.shape, dtype=torch.bool, device=positions.device) if valid is None else valid
        scores = scoring.score_tokens(params, self.cfg, feats, valid)
        sel = self.cfg.selection
        newest = selection.newest_mask(positions, valid_full)
        if self.budget is not None:
            cap = selection.budget_tokens(self.budget, seen)
            sel = replace(sel, top_k=cap if sel.top_k is None else min(cap, sel.top_k))
            if self.recent_fraction:   # the newest tokens rank first, as the newest one always does
                newest = newest | selection.recent_mask(positions, valid_full, int(self.recent_fraction * cap))
        return selection.select(scores, valid_full, newest, sel), scores, sel

    def update(self, state, rows, keys, positions, valid, n_new, seen, layer_idx, final):
        """rows ``[B, H, n_new, S]`` -> new state (EMA ``[B, H, S, 17]``, left context ``[B, H, S, 16]``) + keep."""
        feats, ema, next_ctx, valid_full = self.features(state, rows, positions, valid, n_new)
        if self.stats_accumulator is not None:
            self.stats_accumulator.update(ema, valid_full)
        keep, scores, sel = self.select_tokens(self._layer_params(layer_idx, keys.device), feats, positions, valid,
                                               seen)
        return self.decision(keep, sel, {"ema": ema, "left_context": next_ctx}, scores)

    @staticmethod
    def decision(keep, sel, state, scores) -> PolicyUpdate:
        """The ``PolicyUpdate`` that keeps ``keep [B, H, S]`` (no eviction when it keeps every slot; the
        per-head flags only under ``masked`` selection)."""
        if bool(keep.all()):
            return PolicyUpdate(state=state, scores=scores)
        idx, flags = selection.kept_indices(keep)
        return PolicyUpdate(state=state, keep=idx, valid=flags if sel.mode == "masked" else None, scores=scores)


def _extend(x: torch.Tensor | None, shape, total: int, device) -> torch.Tensor:
    """State ``[B, H, S_old, ...]`` padded with zeros for the new tokens to ``[B, H, total, ...]``."""
    b, h, s_old = shape[:3]
    out = torch.zeros(b, h, total, *shape[3:], device=device)
    if x is not None and s_old > 0:
        out[:, :, :s_old] = x.to(device)
    return out


@torch.no_grad()
def calibrate_norm_stats(
    model,
    prompts: Iterable[torch.Tensor],
    cfg: NAMMConfig | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalisation statistics from a full-cache pass (reference 2.4).

    Runs ``model`` with the keep-all NAMM (zero parameters, no normalisation) over ``prompts``
    (LongTensors ``[1, T]``) with the policy's chunking and update schedule, and accumulates the raw
    EMA spectrogram features of every token at every update, pooled over heads, tokens and layers
    per frequency bin (Chan merge). Returns ``(mean [S], var [S])`` for ``namm.export.save_pretrained``.
    """
    from namm.torch.generate import prefill

    cfg = cfg or NAMMConfig()
    policy = NAMMPolicy.untrained(cfg, None)
    policy.stats_accumulator = F.NormStats(cfg.features.spec_dim)
    prompts = list(prompts)
    it = prompts
    if progress:
        from tqdm import tqdm

        it = tqdm(prompts, desc="calibrating NAMM norm stats", leave=False)
    for ids in it:
        cache = policy.make_cache(model)
        prefill(model, cache, ids.to(next(model.parameters()).device))
    if policy.stats_accumulator.count == 0:
        raise ValueError(
            f"calibration saw no policy update: prompts need at least update_interval="
            f"{cfg.features.update_interval} tokens"
        )
    return policy.stats_accumulator.finalize()


__all__ = ["NAMMPolicy", "PolicyFormatError", "calibrate_norm_stats", "FORMAT_VERSION"]
