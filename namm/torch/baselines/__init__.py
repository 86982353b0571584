"""Hand-designed eviction policies in the runtime (reference 9); see ``base``."""

from namm.torch.baselines.base import (  # noqa: F401  (re-exported: the package's interface)
    BASELINES,
    H2O,
    L2,
    BaselinePolicy,
    Full,
    Random,
    Recency,
    SnapKV,
    StreamingLLM,
    check_budget,
    keep_mask,
    make_baseline,
    rank_lex,
    resolve_budget,
)
