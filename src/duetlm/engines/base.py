"""The `Engine` protocol: what training, evaluation and serving need from a text generator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]

# `on_token(row, token_id)`: called by a streaming engine for each token as it is generated, in order,
# from the thread that runs the engine. `row` is the sample's index in the call's flat order,
# `prompt_index * n + k` for the k-th sample of a prompt. Every token of a row is reported before the
# call returns.
TokenCallback = Callable[[int, int], None]
# `on_text(row, text)`: the same from an engine that streams text rather than token ids (a remote
# server): `text` is the next piece of the raw text the generation's `text` will hold.
TextCallback = Callable[[int, str], None]
# Either: what `generate_streaming` passes on (an int from a token stream, a str from a text stream).
OutputCallback = Callable[[int, Any], None]


# `SamplingParams.json_schema` for OpenAI's `response_format: {"type": "json_object"}`: any JSON object.
JSON_OBJECT = '{"type": "object"}'

# Temperatures below this decode greedily (vLLM's rule too): dividing logits by 1e-30 overflows to inf
# and the sampling distribution to NaN.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options. `temperature=0` means greedy (top_p/top_k ignored); so does any temperature
    below `GREEDY_BELOW` (it is set to 0).

    `stop`: strings that end a sample; the stop string is kept in `text` and in `token_ids` (the trainer
    must train on the token that ended the sample). `stop_token_ids`: token ids that end a sample
    (the tokenizer's EOS is always one). `n`: samples per prompt. `seed`: makes sampling reproducible for
    the whole call. `logprobs`: return the log-probability of each generated token under the sampling
    distribution *before* temperature/top-k/top-p (the policy's own log-prob, which GRPO needs).
    `top_logprobs`: with `logprobs`, also the `top_logprobs` most likely tokens at each step under that
    same distribution (OpenAI's `top_logprobs`; 0: none; set to 0 without `logprobs`, so engines read
    `top_logprobs` alone).

    Decoding controls (serving asks for them; training and evaluation leave them neutral), applied in
    vLLM's order (`duetlm.engines.controls`): `json_schema` (JSON text of a schema the output must
    match; `JSON_OBJECT` for any JSON object), `logit_bias` ((token id, bias) pairs added to the
    logits), `repetition_penalty` (divides the positive and multiplies the negative logits of every
    token in the prompt and the output so far: HF's and vLLM's rule), `presence_penalty` and
    `frequency_penalty` (OpenAI's: subtract `presence` once and `frequency` per occurrence from each
    token already generated); then temperature, `min_p` (drop tokens below `min_p` times the most
    likely one's probability), top-k and top-p. The log-probs stay the raw model's, as vLLM's
    `raw_logprobs`.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    json_schema: str | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0

    @property
    def adjusts_logits(self) -> bool:
        """True when a decoding control other than temperature/top-k/top-p/min_p is set: the engine
        must then adjust each row's logits before it picks a token (`controls.RowControls`)."""
        return bool(
            self.json_schema is not None
            or self.logit_bias
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
        )

    def __post_init__(self) -> None:
        if 0 < self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)
        if self.top_logprobs and not self.logprobs:
            object.__setattr__(self, "top_logprobs", 0)


@dataclass
class Generation:
    """One sample. `token_ids` are the generated ids only (no prompt, no padding). `top_logprobs`: per
    generated token, the most likely `(token id, log-prob)` pairs, most likely first (when asked for)."""

    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Engine(Protocol):
    """A text generator. `prompts` are already-templated strings (see `duetlm.protocol`).

    Returns one list per prompt with `sampling.n` generations each. An engine that can report tokens
    as it generates them sets `streams_tokens = True` and takes `on_token` (a `TokenCallback`) as a
    keyword argument of `generate`; `generate_streaming` calls any engine either way.
    """

    name: str

    def generate(self, prompts: list[str], sampling: SamplingParams) -> list[list[Generation]]: ...

    def count_tokens(self, text: str) -> int: ...


def streams_tokens(engine: Any) -> bool:
    """True when `engine.generate` takes `on_token` and calls it token by token."""
    return bool(getattr(engine, "streams_tokens", False))


def streams_text(engine: Any) -> bool:
    """True when `engine.generate` takes `on_text` and calls it with pieces of text as they come."""
    return bool(getattr(engine, "streams_text", False))


def generate_streaming(
    engine: Engine,
    prompts: list[str],
    sampling: SamplingParams,
    on_output: OutputCallback | None = None,
) -> list[list[Generation]]:
    """`engine.generate`, reporting output as it comes: `on_output(row, token_id)` from an engine that
    streams tokens (`TokenCallback`), `on_output(row, text)` from one that streams text
    (`TextCallback`: a remote server). An engine that does neither is called plainly and `on_output`
    is not called: the caller gets the whole generations when they return."""
    if on_output is not None and streams_tokens(engine):
        return engine.generate(prompts, sampling, on_token=on_output)  # type: ignore[call-arg]
    if on_output is not None and streams_text(engine):
        return engine.generate(prompts, sampling, on_text=on_output)  # type: ignore[call-arg]
    return engine.generate(prompts, sampling)
