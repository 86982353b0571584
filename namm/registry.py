"""What the JAX and the torch baseline packages share, framework-free: the budget rule, the name registry and
the loading of every baseline module of a package (so a new baseline is one file, registered where it is written).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, MutableMapping


def check_budget(budget) -> int | float:
    """Validate a budget: int >= 1 (tokens) or float in (0, 1] (fraction of tokens seen)."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget={budget!r}: use a token count (int >= 1) or a fraction (0 < float <= 1)")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget={budget}: a token count must be >= 1")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise ValueError(f"budget={budget}: a fraction must be in (0, 1]; pass an int for a token count")
    return budget


def add(registry: MutableMapping[str, object], name: str, obj) -> None:
    """``registry[name] = obj``; a name registered twice is an error naming both modules."""
    if name in registry:
        raise ValueError(f"baseline {name!r} is registered twice ({registry[name].__module__} and "
                         f"{obj.__module__}); give one of them another name")
    registry[name] = obj


def load_modules(package: str, path: Iterable[str], skip: tuple[str, ...] = ("base",)) -> None:
    """Import every module of ``package`` (its ``__path__``) but ``skip``: each registers itself on import."""
    for module in pkgutil.iter_modules(path):
        if module.name not in skip:
            importlib.import_module(f"{package}.{module.name}")

