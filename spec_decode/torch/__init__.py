"""PyTorch runtime for speculative decoding: our lossless loop, transformers' assisted generation, prompt lookup,
self-speculation through a compressed (NAMM / H2O / StreamingLLM) KV cache."""

from spec_decode.torch.assisted import hf_generate
from spec_decode.torch.draft import CorruptDraftError, DraftHandle, DraftMismatchError, check_compatible
from spec_decode.torch.linear import SmallBatchLinear, use_small_batch_linear
from spec_decode.torch.prompt_lookup import PromptLookupProposer
from spec_decode.torch.self_spec import SelfSpecProposer
from spec_decode.torch.speculative import (DraftProposer, Sampling, SpecStats, autoregressive_generate,
                                           speculative_generate)

__all__ = ["CorruptDraftError", "DraftHandle", "DraftMismatchError", "DraftProposer", "PromptLookupProposer",
           "Sampling", "SelfSpecProposer", "SmallBatchLinear", "SpecStats", "autoregressive_generate", "check_compatible",
           "hf_generate", "speculative_generate", "use_small_batch_linear"]
