"""The lab's tokenizer and tiny-model recipes (M about 5-10M parameters, m about 0.5-1M)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from duetlm import protocol
from duetlm.config import Strict
from duetlm.lab.task import TaskSpec


class ModelRecipe(Strict):
    """A tiny causal LM's shape (`duetlm.models.tiny_model`)."""

    arch: Literal["qwen3", "llama"] = Field("qwen3", description="transformers architecture")
    hidden_size: int = Field(256, ge=16, description="model width")
    num_layers: int = Field(4, ge=1, description="decoder layers")
    num_heads: int = Field(4, ge=1, description="attention heads")
    intermediate_size: int | None = Field(None, description="MLP width; default 4 x hidden_size")


def build_tokenizer(spec: TaskSpec) -> Any:
    """A word-level tokenizer holding every word of the task, of both instructions and of the chat
    template, so a question, a trace or an answer is one token per word (no `<unk>`)."""
    from duetlm.models import train_tokenizer

    words = spec.vocabulary() + ["user", "assistant", "system"]
    text = (protocol.LARGE_INSTRUCTION + protocol.CONCISE_INSTRUCTION).split()
    corpus = [" ".join(words), " ".join(text)]
    return train_tokenizer(corpus, vocab_size=len(words) + len(text) + 16, kind="word")


def build_model(tokenizer: Any, recipe: ModelRecipe, seed: int) -> Any:
    from duetlm.models import tiny_model

    return tiny_model(
        tokenizer,
        arch=recipe.arch,
        hidden_size=recipe.hidden_size,
        num_layers=recipe.num_layers,
        num_heads=recipe.num_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=256,
        seed=seed,
    )


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
