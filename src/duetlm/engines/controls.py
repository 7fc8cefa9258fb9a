"""Decoding controls: the request-time logit adjustments a `SamplingParams` may ask for, row by row,
for the HF engines (`HFEngine`, `ContinuousBatcher`); vLLM applies its own (`VLLMEngine.vllm_params`).

vLLM's order, so that a request means the same on either engine: the JSON constraint's mask, then
`logit_bias`, then the penalties (`repetition_penalty` over prompt and output, `presence_penalty` and
`frequency_penalty` over the output), then temperature, `min_p`, top-k and top-p (`sampling_logits`).
The log-probs an engine reports are taken before all of this: the raw model's, as vLLM's
`raw_logprobs` and GRPO's pi_old.

transformers' processors do the work where it has them (repetition penalty, sequence bias, min-p);
OpenAI's presence and frequency penalties have none there, so `count_penalties` is ours. The JSON
constraint runs through xgrammar, vLLM's default structured-output backend (a grammar compiled once
per schema and tokenizer, a matcher per row, a token bitmask per step); why xgrammar: the same grammar
engine as `--engine vllm`, byte-level vocabularies handled, and a compiled JSON schema masks a step in
microseconds on CPU.
"""

from __future__ import annotations

from typing import Any

import torch

from duetlm.engines.base import SamplingParams


def count_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's penalties on (B, V) logits: `logit - frequency * count - presence * (count > 0)`,
    where `counts` (B, V) holds how often each token has been generated so far (the prompt does not
    count, as in OpenAI's and vLLM's definition)."""
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def sampling_logits(logits: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
    """(B, V) logits to sample from at `sp.temperature > 0`: divided by the temperature, then `min_p`,
    top-k and top-p filtering (removed entries -inf)."""
    from transformers.generation.logits_process import MinPLogitsWarper

    scaled = logits / sp.temperature
    if sp.min_p > 0:
        scaled = MinPLogitsWarper(sp.min_p)(None, scaled)  # type: ignore[arg-type]  (it reads scores only)
    return filter_logits(scaled, sp.top_k, sp.top_p)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then nucleus filtering on (B, V) logits; removed entries become -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Remove a token when the mass before it already reaches top_p (the first token always stays).
        remove = (probs.cumsum(-1) - probs) >= top_p
        remove_orig = torch.zeros_like(remove).scatter(-1, order, remove)
        logits = logits.masked_fill(remove_orig, float("-inf"))
    return logits


class Grammars:
    """JSON-schema grammars for one tokenizer, compiled once each (xgrammar's compiler caches them):
    `vocab_size` is the model's logits width, `stop_ids` the ids that may end a matched output."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = stop_ids
        self._compiler: Any = None

    def compiled(self, schema: str) -> Any:
        """The compiled grammar of `schema` (JSON text); a ValueError naming the problem when xgrammar
        cannot take it."""
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(self.stop_ids)
            )
            self._compiler = xgr.GrammarCompiler(info)
        try:
            # Compact JSON (no free whitespace between tokens), as vLLM's `disable_any_whitespace`
            # (which `VLLMEngine` sets): a model cannot spend its budget on blank runs in the object.
            return self._compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
        except Exception as err:  # xgrammar raises its own error types (and RuntimeError) for a bad schema
            raise ValueError(f"the JSON schema cannot be compiled: {err}") from None


def engine_grammars(engine: Any, vocab: int) -> Grammars:
    """`engine.grammars`, made (or remade for another logits width) on first use: one compiler, and
    its cache of compiled schemas, per engine."""
    grammars = getattr(engine, "grammars", None)
    if grammars is None or grammars.vocab_size != vocab:
        grammars = engine.grammars = Grammars(engine.tokenizer, vocab, engine.eos_ids)
    return grammars


def check_controls(engine: Any, sp: SamplingParams) -> None:
    """A ValueError naming the control when `engine` cannot decode with `sp`'s: a `logit_bias` token id
    outside its vocabulary, or a JSON schema xgrammar cannot compile. Engines that hold no tokenizer
    (a remote server) are not checked here: the server answers for itself."""
    vocab = getattr(engine, "vocab_size", None)
    if vocab is None:
        return
    bad = [t for t, _ in sp.logit_bias if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary (size {vocab})")
    if sp.json_schema is not None:
        grammars = engine_grammars(engine, vocab)
        grammars.compiled(sp.json_schema)


class RowControls:
    """One sequence's decoding controls: its token history (for the penalties), its grammar matcher
    (for `json_schema`) and its bias. `adjust` before each step, `accept` after it."""

    def __init__(
        self,
        sp: SamplingParams,
        prompt_ids: list[int],
        vocab: int,
        device: torch.device,
        grammars: Grammars | None,
    ) -> None:
        from transformers.generation.logits_process import (
            RepetitionPenaltyLogitsProcessor,
            SequenceBiasLogitsProcessor,
        )

        self.sp = sp
        self.history = list(prompt_ids)  # prompt + output: what the repetition penalty reads
        self.counts = torch.zeros((1, vocab), device=device)  # output only: presence/frequency
        self.repetition = (
            RepetitionPenaltyLogitsProcessor(sp.repetition_penalty) if sp.repetition_penalty != 1.0 else None
        )
        self.bias = None
        if sp.logit_bias:
            bad = [t for t, _ in sp.logit_bias if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary (size {vocab})")
            self.bias = SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in sp.logit_bias])
        self.matcher = self.bitmask = None
        if sp.json_schema is not None:
            if grammars is None:
                raise ValueError("json_schema needs the engine's grammars (a tokenizer)")
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(grammars.compiled(sp.json_schema))
            self.bitmask = xgr.allocate_token_bitmask(1, vocab)

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """This row's (1, V) logits after the constraint, the bias and the penalties."""
        logits = logits.clone()
        if self.matcher is not None and not self.matcher.is_terminated():
            import xgrammar as xgr

            self.matcher.fill_next_token_bitmask(self.bitmask)
            xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device))
        ids = torch.tensor([self.history], device=logits.device)
        if self.bias is not None:
            logits = self.bias(ids, logits)
        if self.repetition is not None:
            logits = self.repetition(ids, logits)
        if self.sp.presence_penalty or self.sp.frequency_penalty:
            logits = count_penalties(logits, self.counts, self.sp.presence_penalty, self.sp.frequency_penalty)
        return logits

    def accept(self, token: int) -> None:
        """Record the token the row took; a RuntimeError if the grammar refuses it (it cannot, once
        `adjust` masked the step)."""
        self.history.append(token)
        self.counts[0, token] += 1
        live = self.matcher is not None and not self.matcher.is_terminated()
        if live and not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} breaks the JSON schema")


def pick(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """The next token of each row of (B, V) logits: argmax at temperature 0, else a draw from
    `sampling_logits`."""
    if sp.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(sampling_logits(logits, sp), dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)
