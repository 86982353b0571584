"""Build any runtime policy from its config (``configs/policy/*.yaml``): ``build_policy({"name": "h2o", "budget": 0.25})``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from namm.torch.cache import FullPolicy, TorchPolicy


UNTRAINED = "untrained"  # policy=namm policy.path=untrained: the all-zero NAMM (scores 0, keeps every token)


class PolicyConfigError(ValueError):
    """A policy config that cannot be built."""


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


def build_policy(policy_cfg: Mapping) -> TorchPolicy | None:
    """``{"name": ..., "budget": ..., knobs}`` -> a :class:`TorchPolicy`.

    Names: full, namm (needs ``path``), h2o, l2, streamingllm, snapkv, random, recency. ``budget``
    is a token count (int >= 1) or a fraction of the tokens seen (0 < b <= 1). Keys set to None
    are ignored (Hydra leaves unused knobs as null).
    """
    cfg = {k: v for k, v in _to_dict(policy_cfg).items() if v is not None}
    if "name" not in cfg:
        raise PolicyConfigError("the policy config has no 'name'; use e.g. {'name': 'full'} or policy=h2o")
    name = str(cfg.pop("name")).lower()
    if name == "full":
        cfg.pop("budget", None)
        _reject_unknown(name, cfg, {"chunk_size", "update_interval"})
        policy = FullPolicy()
        if "chunk_size" in cfg:
            policy.chunk_size = int(cfg["chunk_size"])
        return policy
    if name == "namm":
        from namm.torch.policy import NAMMPolicy

        if "path" not in cfg:
            raise PolicyConfigError("policy 'namm' needs a path to an exported policy directory: policy.path=DIR "
                                    "(or policy.path=untrained for the all-zero, keep-all NAMM)")
        path = cfg.pop("path")
        try:
            if str(path) == UNTRAINED:
                return NAMMPolicy.untrained(**cfg)
            return NAMMPolicy.from_pretrained(path, **cfg)
        except TypeError as e:
            raise PolicyConfigError(f"policy 'namm': {e}") from None
    from namm.torch.baselines import BASELINES, make_baseline

    if name not in BASELINES:
        known = ", ".join(["full", "namm", *sorted(BASELINES)])
        raise PolicyConfigError(f"unknown policy {name!r}; use one of: {known}")
    return make_baseline(name, **cfg)


def _reject_unknown(name: str, cfg: dict, allowed: set[str]) -> None:
    unknown = set(cfg) - allowed
    if unknown:
        raise PolicyConfigError(
            f"policy {name!r} does not take {sorted(unknown)}; allowed keys: {sorted(allowed) or 'none'}"
        )
