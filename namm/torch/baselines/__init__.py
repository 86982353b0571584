"""Hand-designed eviction policies in the runtime, with the semantics of ``namm.baselines`` (reference 9).

Every baseline keeps exactly ``min(budget, tokens)`` per head at each update and always keeps the
newest token. Ranking is lexicographic: (newest, protected tier, score, slot index). Budgets: an
``int >= 1`` is a token count, a ``float`` in (0, 1] a fraction of the tokens seen by the layer
(latest position + 1), rounded up, at least 1.

Schedule (the NAMM one, for parity): prefill chunks of ``chunk_size`` (128), an update every
``update_interval`` (512) tokens on the buffered attention, plus one at the end of the prefill
(``final_update``, default True) so the cache holds exactly the budget when decoding starts.

One module per baseline (``namm/torch/baselines/<name>.py``, its method in its docstring): a
:class:`BaselinePolicy` subclass registered by name with ``@register("<name>")``. Importing the package
loads every module, so ``BASELINES`` maps each name to its class and each class is importable from here
(``from namm.torch.baselines import H2O``). ``policy=full`` is the cache's ``FullPolicy``, not a baseline.
"""

from __future__ import annotations

from namm.registry import load_modules
from namm.torch.baselines.base import (  # noqa: F401  (re-exported: the package's interface)
    BASELINES,
    SCHEDULE_KEYS,
    BaselinePolicy,
    check_budget,
    keep_mask,
    make_baseline,
    rank_lex,
    register,
    resolve_budget,
)

load_modules(__name__, __path__)

from namm.torch.baselines.full import Full  # noqa: E402,F401  (not registered: see its module)

globals().update({cls.__name__: cls for cls in BASELINES.values()})
