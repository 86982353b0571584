"""Hand-designed eviction policies behind the NAMM step interface (reference section 9); see ``base``."""

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
    full,
    h2o,
    init_state,
    l2,
    make_baseline,
    random,
    recency,
    resolve_budget,
    snapkv,
    streamingllm,
)
