"""A faster ``nn.Linear`` for the few-row products of speculative verification on CPU.

Verifying a draft runs the target over ``gamma + 1`` tokens at once. On CPU (MKL, fp32) ``F.linear`` on
2-16 rows takes a general matrix-multiply path that reads the weight far less efficiently than the
one-row matrix-vector product, so a 5-token verification of SmolLM2 cost about twice a one-token
decode step. Computing the same product as ``weight @ x.T`` (the weight as the streamed left
operand, the few rows as a narrow right operand) reads it faster; ``python -m experiments.bench.verify``
measures both in the same run. With one thread the gain is 1.2-1.3x per call at 2-5 rows and gone from
about 7 rows (with two threads it lasts to about 16), hence the default ``max_rows`` of 6.

``use_small_batch_linear(model)`` switches every plain ``nn.Linear`` of a model to ``SmallBatchLinear``
in place. One-row calls and calls over more than ``max_rows`` rows (prefills) still run ``F.linear``
unchanged, so target-only decoding is bit-for-bit what it was; the few-row path is the same product in
another summation order (equal to ``F.linear`` within float rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MAX_ROWS = 6


class SmallBatchLinear(nn.Linear):
    """``nn.Linear`` that computes ``(W @ x.T).T`` when the input has 2..``max_rows`` rows."""

    max_rows: int = DEFAULT_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if not 1 < rows <= self.max_rows:
            return F.linear(x, self.weight, self.bias)
        y = (self.weight @ x.reshape(rows, x.shape[-1]).T).T.contiguous()     # [rows, out]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def use_small_batch_linear(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Switch ``model``'s plain ``nn.Linear`` modules to ``SmallBatchLinear`` (in place; weights shared, no copy).

    ``max_rows`` <= 1 switches them back. Returns the number of modules switched. Subclasses of
    ``nn.Linear`` (quantised or adapter layers) are left alone.
    """
    if not isinstance(max_rows, int) or isinstance(max_rows, bool):
        raise TypeError(f"max_rows must be an int (rows per call that take the few-row path), got {max_rows!r}")
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear or type(module) is SmallBatchLinear:
            if max_rows > 1:
                module.__class__ = SmallBatchLinear
                module.max_rows = max_rows
            else:
                module.__class__ = nn.Linear
                module.__dict__.pop("max_rows", None)
            n += 1
    return n
