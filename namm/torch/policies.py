"""Build any runtime policy from its config (``configs/policy/*.yaml``): ``build_policy({"name": "h2o", "budget": 0.25})``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from namm.torch.cache import CacheConfigError, FullPolicy, TorchPolicy


UNTRAINED = "untrained"  # policy=namm policy.path=untrained: the all-zero NAMM (scores 0, keeps every token)
# What ``policy=namm`` takes besides ``name`` and ``path`` (``NAMMPolicy.from_pretrained``'s overrides).
NAMM_KEYS = ("budget", "chunk_size", "update_interval", "final_update", "mode", "threshold", "top_k", "recent_fraction")
BUDGET_RANGE = "a token count (an int >= 1, e.g. 512) or a fraction of the tokens seen in (0, 1] (e.g. 0.25)"


class PolicyConfigError(ValueError):
    """A policy config that cannot be built."""


def check_budget(budget, where: str = "budget") -> int | float:
    """``budget`` if it is an int >= 1 (tokens) or a float in (0, 1] (fraction of the tokens seen), else a
    ``PolicyConfigError`` naming ``where`` and the valid range."""
    from namm.torch.baselines import check_budget as valid_budget   # the runtime's one budget rule

    try:
        return valid_budget(budget)
    except ValueError:
        if isinstance(budget, float) and budget > 1.0 and budget.is_integer():
            hint = f"; for {int(budget)} tokens write {int(budget)}"
        else:
            hint = ""
        raise PolicyConfigError(f"{where}: {budget!r} is not a valid budget; use {BUDGET_RANGE}{hint}") from None


def _to_dict(policy_cfg: Mapping) -> dict[str, Any]:
    try:  # OmegaConf DictConfig
        from omegaconf import DictConfig, OmegaConf

        if isinstance(policy_cfg, DictConfig):
            return dict(OmegaConf.to_container(policy_cfg, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(policy_cfg, Mapping):
        raise PolicyConfigError(f"a policy config must be a mapping with a 'name' key, got {type(policy_cfg).__name__}")
    return dict(policy_cfg)


def allowed_keys(name: str) -> tuple[str, ...]:
    """The keys policy ``name`` takes besides ``name`` (sorted)."""
    if name == "full":
        return ("budget", "chunk_size", "update_interval")
    if name == "namm":
        return tuple(sorted(("path", *NAMM_KEYS)))
    from namm.torch.baselines import BASELINES

    return BASELINES[name].options()   # the registered class's own knobs and the schedule's


def build_policy(policy_cfg: Mapping) -> TorchPolicy | None:
    """``{"name": ..., "budget": ..., knobs}`` -> a :class:`TorchPolicy`.

    Names: full, namm (needs ``path``) and every registered baseline (``namm.torch.baselines.BASELINES``).
    ``budget`` is a token count (int >= 1) or a fraction of the tokens seen (0 < b <= 1). Keys set to None
    are ignored (Hydra leaves unused knobs as null). A key the policy does not take, a budget out of
    range or a bad knob value is a one-line :class:`PolicyConfigError` naming what it takes.
    """
    cfg = {k: v for k, v in _to_dict(policy_cfg).items() if v is not None}
    if "name" not in cfg:
        raise PolicyConfigError("the policy config has no 'name'; use e.g. {'name': 'full'} or policy=h2o")
    name = str(cfg.pop("name")).lower()
    from namm.torch.baselines import BASELINES, make_baseline

    if name not in ("full", "namm", *BASELINES):
        known = ", ".join(["full", "namm", *sorted(BASELINES)])
        raise PolicyConfigError(f"unknown policy {name!r}; use one of: {known}")
    _reject_unknown(name, cfg, allowed_keys(name))
    if name == "full":
        cfg.pop("budget", None)
        policy = FullPolicy()
        if "chunk_size" in cfg:
            policy.chunk_size = int(cfg["chunk_size"])
        return policy
    if "budget" in cfg:
        check_budget(cfg["budget"], f"policy {name!r} budget")
    try:
        if name == "namm":
            return _namm(cfg)
        return make_baseline(name, **cfg)
    except (TypeError, ValueError) as e:
        from namm.torch.policy import PolicyFormatError

        if isinstance(e, (PolicyConfigError, PolicyFormatError, CacheConfigError)):  # their own line says it all
            raise
        raise PolicyConfigError(f"policy {name!r}: {e}") from None


def _namm(cfg: dict) -> TorchPolicy:
    from namm.torch.policy import NAMMPolicy

    if "path" not in cfg:
        raise PolicyConfigError("policy 'namm' needs a path to an exported policy directory: policy.path=DIR "
                                "(or policy.path=untrained for the all-zero, keep-all NAMM)")
    path = cfg.pop("path")
    if str(path) == UNTRAINED:
        return NAMMPolicy.untrained(**cfg)
    return NAMMPolicy.from_pretrained(path, **cfg)


def _reject_unknown(name: str, cfg: dict, allowed) -> None:
    unknown = sorted(set(cfg) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PolicyConfigError(f"policy {name!r}: unknown option {', '.join(map(repr, unknown))}{hint}; "
                                f"it takes {', '.join(allowed) or 'no options'}")
