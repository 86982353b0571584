"""Prompt-lookup decoding: a draft-free proposer that copies the continuation of the latest earlier
occurrence of the current n-gram (Saxena 2023; transformers' ``prompt_lookup_num_tokens``).

Its proposals are deterministic (``q`` one-hot), so in sampling mode the loop accepts d with
probability p(d) and resamples from max(0, p - onehot(d)) on rejection: still exactly p.
"""

from __future__ import annotations


class PromptLookupProposer:
    """Match the last ``max_ngram`` .. ``min_ngram`` tokens against the earlier text (prompt + output)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.calls = 0
        self.generator = None

    def start(self, ids: list[int]) -> None:
        pass

    def propose(self, ids, gamma, sampling):
        n_ids = len(ids)
        for n in range(min(self.max_ngram, n_ids - 1), self.min_ngram - 1, -1):
            tail = ids[n_ids - n:]
            for start in range(n_ids - n - 1, -1, -1):            # latest earlier match first
                if ids[start:start + n] == tail:
                    cont = ids[start + n: start + n + gamma]
                    if cont:
                        return cont, None
        return [], None

    def commit(self, ids: list[int]) -> None:
        pass
