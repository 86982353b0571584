"""NAMM hyper-parameters as frozen dataclasses (framework-free: stdlib only).

The defaults are the paper's BAM configuration (stages i1-i3 of the official runs):
STFT n_fft 32 / hop 16 / periodic Hann / magnitudes (17 bins), EMA coefficient 0.99 per token,
8-dim sinusoidal age embedding (max frequency 50000), update every 512 tokens, BAM with one head of
width 32 and biases, threshold selection at 0 with the ragged-max rule. ``NAMMConfig.feature_dim``
is 8 + 17 = 25 and the BAM has 4,172 parameters.

``to_dict`` / ``from_dict`` round-trip through plain JSON-able dicts; ``from_dict`` rejects unknown
keys and bad values with a one-line error naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


class ConfigError(ValueError):
    """A NAMM configuration that cannot be used (unknown key, bad value)."""


WINDOWS = ("hann_periodic", "hann_symmetric", "rect")
OUTPUTS = ("magnitude", "real_imag")
SCORERS = ("bam", "mlp")
SELECTION_MODES = ("ragged_max", "masked")


def _from_dict(cls, d: Mapping[str, Any] | None, where: str):
    if d is None:
        return cls()
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    return cls(**dict(d))


@dataclass(frozen=True)
class FeatureConfig:
    """Spectrogram + EMA + age-embedding features (reference sections 2.2-2.5)."""

    n_fft: int = 32                # STFT window length (queries)
    hop: int = 16                  # STFT hop; left context carried across updates is n_fft - hop
    window: str = "hann_periodic"  # torch.hann_window(periodic=True) == scipy get_window("hann", fftbins=True)
    ema_coeff: float = 0.99        # gamma per token; per frame beta = gamma ** hop
    age_dim: int = 8               # sinusoidal age embedding size: sin(age_dim/2) then cos(age_dim/2)
    age_max_freq: float = 50000.0  # f_i = age_max_freq ** (-i / (age_dim/2))
    max_age: int = 32768           # recency is clipped to [0, max_age] (the official lookup-table size - 1)
    update_interval: int = 512     # n_up: the policy runs every this many tokens
    chunk_size: int = 128          # prefill chunk size (update_interval must be a multiple of it)
    norm_eps: float = 1e-7         # x <- (x - mean) / max(sqrt(var), norm_eps)
    output: str = "magnitude"      # "magnitude" (|STFT|, n_fft//2+1 dims) or "real_imag" (2x that)
    pool_kernel: int = 0           # 0: off (the paper). Odd k >= 3: append the normalised spectrogram max-pooled
                                   # over k chronologically neighbouring cached tokens (spec_dim more features)

    def __post_init__(self):
        if self.n_fft < 2 or self.hop < 1 or self.hop > self.n_fft:
            raise ConfigError(f"features: need n_fft >= 2 and 1 <= hop <= n_fft, got n_fft={self.n_fft} hop={self.hop}")
        if self.window not in WINDOWS:
            raise ConfigError(f"features.window={self.window!r}; use one of {WINDOWS}")
        if self.output not in OUTPUTS:
            raise ConfigError(f"features.output={self.output!r}; use one of {OUTPUTS}")
        if not 0.0 <= self.ema_coeff < 1.0:
            raise ConfigError(f"features.ema_coeff={self.ema_coeff}; must be in [0, 1)")
        if self.age_dim < 0 or self.age_dim % 2:
            raise ConfigError(f"features.age_dim={self.age_dim}; must be an even number >= 0")
        if self.update_interval % self.hop or self.update_interval % self.chunk_size:
            raise ConfigError(
                f"features.update_interval={self.update_interval} must be a multiple of hop={self.hop} "
                f"and chunk_size={self.chunk_size}")
        if isinstance(self.pool_kernel, bool) or self.pool_kernel < 0 or (self.pool_kernel and (
                self.pool_kernel < 3 or self.pool_kernel % 2 == 0)):
            raise ConfigError(f"features.pool_kernel={self.pool_kernel}; use 0 (off) or an odd number >= 3")
        if self.max_age < 1 or self.norm_eps <= 0:
            raise ConfigError("features: max_age must be >= 1 and norm_eps > 0")

    @property
    def spec_dim(self) -> int:
        """Spectrogram feature size: n_fft//2 + 1 bins (x2 for real_imag)."""
        bins = self.n_fft // 2 + 1
        return bins if self.output == "magnitude" else 2 * bins

    @property
    def token_dim(self) -> int:
        """Per-token feature size: age_dim + spec_dim, + spec_dim again with neighbour pooling."""
        return self.age_dim + self.spec_dim * (2 if self.pool_kernel else 1)

    @property
    def context(self) -> int:
        """Left-context columns carried across updates: n_fft - hop."""
        return self.n_fft - self.hop

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "FeatureConfig":
        return _from_dict(cls, d, "features")


@dataclass(frozen=True)
class ScorerConfig:
    """Scoring network (reference section 3).

    ``kind="bam"``: one backward-attention block (``num_heads`` heads splitting ``hidden``, biases
    if ``bias``) then a linear head to one score (with a bias if ``bias``). ``kind="mlp"``: token-wise
    MLP with ``mlp_depth`` linear layers (1 = a single linear map to the score), hidden width
    ``mlp_width`` (None = feature_dim), ``mlp_bias``, and residual hidden layers if ``mlp_residual``.
    """

    kind: str = "bam"
    hidden: int = 32
    bias: bool = True
    num_heads: int = 1
    mlp_depth: int = 1
    mlp_width: int | None = None
    mlp_bias: bool = False
    mlp_residual: bool = False

    def __post_init__(self):
        if self.kind not in SCORERS:
            raise ConfigError(f"scorer.kind={self.kind!r}; use one of {SCORERS}")
        if self.hidden < 1 or self.num_heads < 1 or self.hidden % self.num_heads:
            raise ConfigError(f"scorer: hidden={self.hidden} must be a positive multiple of num_heads={self.num_heads}")
        if self.mlp_depth < 1:
            raise ConfigError(f"scorer.mlp_depth={self.mlp_depth}; must be >= 1")
        if self.mlp_width is not None and self.mlp_width < 1:
            raise ConfigError(f"scorer.mlp_width={self.mlp_width}; must be >= 1 or null")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ScorerConfig":
        return _from_dict(cls, d, "scorer")


@dataclass(frozen=True)
class SelectionConfig:
    """Token selection (reference section 4.2-4.3).

    Keep where score >= threshold (ties at the threshold are kept), newest token always kept,
    invalid slots always dropped. ``ragged_max``: every head of a layer keeps the largest per-head
    kept count K, filled with its best-scoring tokens (the official rule). ``masked``: exact
    per-head mask. ``top_k``: optional hard cap applied before the threshold.
    """

    mode: str = "ragged_max"
    threshold: float = 0.0
    top_k: int | None = None

    def __post_init__(self):
        if self.mode not in SELECTION_MODES:
            raise ConfigError(f"selection.mode={self.mode!r}; use one of {SELECTION_MODES}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) < 1):
            raise ConfigError(f"selection.top_k={self.top_k}; must be an int >= 1 or null")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SelectionConfig":
        return _from_dict(cls, d, "selection")


@dataclass(frozen=True)
class NAMMConfig:
    features: FeatureConfig = field(default_factory=FeatureConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    @property
    def feature_dim(self) -> int:
        """Per-token feature size: age_dim + spectrogram bins (8 + 17 = 25 by default; 42 with ``pool_kernel``)."""
        return self.features.token_dim

    def to_dict(self) -> dict:
        return {"features": self.features.to_dict(), "scorer": self.scorer.to_dict(),
                "selection": self.selection.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "NAMMConfig":
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise ConfigError(f"namm config: expected a mapping, got {type(d).__name__}")
        unknown = sorted(set(d) - {"features", "scorer", "selection"})
        if unknown:
            raise ConfigError(f"namm config: unknown key(s) {unknown}; valid keys are ['features', 'scorer', 'selection']")
        return cls(FeatureConfig.from_dict(d.get("features")), ScorerConfig.from_dict(d.get("scorer")),
                   SelectionConfig.from_dict(d.get("selection")))
