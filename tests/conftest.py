"""Shared test setup: offline, no wandb, and the tiny random Llama used by the unit tests."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    """``(model, tokenizer)``: ``experiments.lib.models.tiny_random("llama", seed=0)``, shared by the session."""
    from experiments.lib.models import tiny_random

    return tiny_random("llama", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread (and the CI machine is shared); restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Floating-point tolerances. Every tolerance in these tests is one of: exact (copies, gathers, keep
# decisions, integer counts), a storage rounding (float16), or a float32 summation-order bound
# below. The bound: two float32 evaluations of the same sum of n terms that differ only in the
# order of additions (another fusion, a vmapped batch, another framework) differ by at most about
# n * eps * sum|terms| (Higham's gamma_n, u = eps / 2, on each side).
# --------------------------------------------------------------------------------------------

import numpy as np  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)   # 2**-23, one ulp at 1.0
U16 = 2.0 ** -11                          # float16 unit roundoff: storing x as float16 moves it by <= |x| * 2**-11

# Float32 summation lengths along the BAM scorer (paper config: 25 features, 32 hidden, one head): the
# qkv projection sums 25 terms, the logits 32 (d_h), softmax normaliser and A V one term per key, the out
# projection 32, the head 25. A score is a chain of these sums, so reordering any of them moves it by at
# most about (25 + 32 + n_keys + 32 + 25) * eps * its scale.
BAM_SUMS = 25 + 32 + 32 + 25


def bam_score_atol(scores, n_keys: int) -> float:
    """Absolute tolerance for one parameter vector's BAM scores computed twice in another float32 order.

    ``n_keys``: tokens a query attends over (the backward attention's sum length). The scale of the
    summed terms is the largest |score| of that parameter vector: the parameters are shared by every
    token, so the head's inputs are of one size across tokens, and a near-zero score is a cancellation
    of terms of that size, not a small sum (so a per-token rtol would be wrong for it). Measured: up to
    23 eps max|score| for a vmapped population against single calls (75 with XLA fast math on), 16 for the
    PyTorch runtime against XLA; the bound is (114 + n_keys).
    """
    return (BAM_SUMS + n_keys) * EPS32 * float(np.max(np.abs(np.asarray(scores, np.float64))))


def undecided_keep(scores, valid, newest, tol: float, selection, cap: int | None = None) -> np.ndarray:
    """``[H, N]`` True where a keep decision of ``namm.selection.select`` could flip if every score moved by <= tol.

    Mirrors select(): invalid slots score -inf, the newest +inf; a candidate passes score >= threshold
    and ranks below ``top_k`` / ``cap``; ``masked`` keeps the candidates, ``ragged_max`` keeps the K best
    of every head, K = the layer's largest candidate count. A token's rank under any perturbed scores
    lies between the number of tokens certainly above it (score - tol > its score + tol) and the number
    possibly above it (score + tol >= its score - tol); the decision is settled when both ends of that
    range (and both ends of K's range) give the same answer. Everything else is a near tie: the tests
    compare keep masks exactly outside it, and assert it is small.
    """
    valid = np.asarray(valid, bool)
    s = np.where(valid, np.asarray(scores, np.float64), -np.inf)
    s = np.where(np.asarray(newest, bool) & valid, np.inf, s)
    above_sure = (s[..., None, :] - tol > s[..., :, None] + tol).sum(-1)
    above_maybe = (s[..., None, :] + tol >= s[..., :, None] - tol).sum(-1) - 1       # minus the token itself
    caps = [c for c in (selection.top_k, cap) if c is not None]
    limit = min(caps) if caps else s.shape[-1]
    cand_sure = valid & (s - tol >= selection.threshold) & (above_maybe < limit)
    cand_maybe = valid & (s + tol >= selection.threshold) & (above_sure < limit)
    if selection.mode == "masked":
        return cand_maybe & ~cand_sure
    k_lo, k_hi = cand_sure.sum(-1).max(), cand_maybe.sum(-1).max()
    return valid & ~(above_maybe < k_lo) & ~(above_sure >= k_hi)


def undecided_rank_keep(scores, keep, tol: float, other_scores=None) -> np.ndarray:
    """``[H, N]`` True where a keep-the-best decision of a baseline (``keep``, made on ``scores``) could flip if every
    score moved by <= tol.

    A baseline keeps its best tokens by (tier, score, slot index); a kept and a dropped token can swap only if their
    scores are within 2 tol of each other, so both are undecided (whatever their tiers: conservative). An exact tie
    on both sides (``scores`` and the other side's ``other_scores``, e.g. SnapKV's pooling copying one vote) goes by
    slot index on both, so it is settled. The tests compare keep masks exactly outside this set, and assert it is
    small.
    """
    keep = np.asarray(keep, bool)
    s = np.asarray(scores, np.float64)
    o = s if other_scores is None else np.asarray(other_scores, np.float64)
    close = np.abs(s[..., :, None] - s[..., None, :]) <= 2 * tol           # [H, N, N]
    tied = (s[..., :, None] == s[..., None, :]) & (o[..., :, None] == o[..., None, :])
    swappable = close & ~tied & (keep[..., :, None] != keep[..., None, :])
    return swappable.any(-1)
