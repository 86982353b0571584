"""Hand-designed eviction policies behind the NAMM step interface (reference section 9). Pure JAX.

Every baseline is a ``Policy(init, update)`` (see ``namm.policy``) with the same fixed-capacity slot
semantics as NAMM: ``update(params, state, attention_rows [H, n, C], positions [C] | [H, C], valid [H, C],
*, keys=None [H, C, d], rng=None, layer=None) -> (new_state, scores [H, C], keep [H, C])``;
``params`` is ignored (pass None). Each keeps exactly ``min(budget, valid tokens)`` per head and
always keeps the newest token. Ranking is lexicographic: (newest, protected tier, score, slot index).

Budgets: an ``int >= 1`` is a token count; a ``float`` in (0, 1] is a fraction of the tokens seen by
the layer (latest position + 1), rounded up, at least 1.

One module per baseline (``namm/baselines/<name>.py``, its method in its docstring), built on
``namm.baselines.base`` and registered by name with ``@register("<name>")``. Importing the package
loads every module, so ``BASELINES`` maps each name to its builder and each builder is importable
from here under its name (``from namm.baselines import h2o``).
"""

from __future__ import annotations

from namm.registry import load_modules
from namm.baselines.base import (  # noqa: F401  (re-exported: the package's interface)
    BASELINES,
    Array,
    BaselineState,
    _keep,
    _make,
    _rank,
    _recent,
    _recent_window,
    check_budget,
    init_state,
    make_baseline,
    register,
    resolve_budget,
)

load_modules(__name__, __path__)

globals().update(BASELINES)   # each builder under its name (it shadows the module of the same name)
