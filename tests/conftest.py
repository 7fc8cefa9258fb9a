"""Shared fixtures: tiny real models and tokenizers built locally (no hub, no mocks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

CORPUS = [
    "What is 12 + 7? Let's think step by step and output the final answer within \\boxed{}.",
    "First add the ones: 2 + 7 = 9. Then the tens: 10. So the answer is \\boxed{19}.",
    "Compute 3 * (4 + 5). The sum is 9, times 3 gives 27. The answer is 27.",
    "A train travels 60 miles in 1.5 hours. What is its average speed in miles per hour?",
    "hmm, wait, let me check again: 6 * 7 = 42, yes. ok so the result is 42.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from duetlm.models import train_tokenizer

    return train_tokenizer(CORPUS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Qwen3 model directory (M in the tests)."""
    from duetlm.models import save_pretrained, tiny_model

    model = tiny_model(tiny_tokenizer, arch="qwen3", hidden_size=64, num_layers=2, num_heads=4, seed=1)
    return save_pretrained(model, tiny_tokenizer, tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama model directory (m in the tests)."""
    from duetlm.models import save_pretrained, tiny_model

    model = tiny_model(tiny_tokenizer, arch="llama", hidden_size=32, num_layers=2, num_heads=2, seed=2)
    return save_pretrained(model, tiny_tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model

    model, tok = load_model(str(tiny_dir), device="cpu")
    return HFEngine(model, tok)
