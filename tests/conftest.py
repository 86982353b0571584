"""Shared test setup: offline, no wandb, and the tiny random Llama used by the unit tests."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama():
    """``(model, tokenizer)``: ``experiments.models.tiny_random("llama", seed=0)``, shared by the session."""
    from experiments.models import tiny_random

    return tiny_random("llama", seed=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one torch thread (and the CI machine is shared); restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
