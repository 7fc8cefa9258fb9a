"""The two-stage pipeline: problem x -> M -> signal z -> m -> answer y (design.md, "One path").

Training, evaluation, the demo and the server all call `DuetPipeline`; they differ only in what they do
with the `DuetResult`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from duetlm import protocol
from duetlm.engines.base import Engine, Generation, SamplingParams
from duetlm.errors import DuetError
from duetlm.protocol import Signal


@dataclass
class DuetResult:
    """One pass of one problem through M -> z -> m.

    `large_tokens`: tokens M generated (|z| plus the stop marker; the paper's M tokens).
    `small_tokens`: tokens m generated for its answer.
    """

    question: str
    signal: Signal
    answer: str
    large_tokens: int
    small_tokens: int
    large_finish: str
    small_finish: str
    large: Generation | None = None
    small: Generation | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "signal": self.signal.text,
            "signal_complete": self.signal.complete,
            "answer": self.answer,
            "large_tokens": self.large_tokens,
            "small_tokens": self.small_tokens,
            "large_finish": self.large_finish,
            "small_finish": self.small_finish,
            "timings": self.timings,
        }


@dataclass
class DuetPipeline:
    """M (`large`) thinks, m (`small`) answers. Each engine brings its own tokenizer for its template.

    `large_sampling.stop` gets the end-of-thinking marker added: M never writes its own answer.
    """

    large: Engine
    small: Engine
    large_sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=256)
    )
    small_sampling: SamplingParams = field(
        default_factory=lambda: SamplingParams(temperature=0.0, max_new_tokens=256)
    )
    large_instruction: str = protocol.LARGE_INSTRUCTION

    def large_params(self) -> SamplingParams:
        tok = _tokenizer(self.large)
        stop_ids = protocol.large_stop_token_ids(tok) if tok is not None else ()
        return replace(
            self.large_sampling,
            stop=tuple(dict.fromkeys(self.large_sampling.stop + protocol.large_stop())),
            stop_token_ids=tuple(dict.fromkeys(self.large_sampling.stop_token_ids + stop_ids)),
        )

    def think(self, questions: list[str]) -> list[list[Generation]]:
        """Stage 1: M's rollouts (n per question, as `large_sampling.n` says)."""
        prompts = [
            protocol.large_prompt(_tokenizer(self.large), q, self.large_instruction) for q in questions
        ]
        return self.large.generate(prompts, self.large_params())

    def answer(
        self, questions: list[str], signals: list[str | None], n: int | None = None
    ) -> list[list[Generation]]:
        """Stage 2: m's answers to (x, z); a `None` signal gives m alone (the unguided baseline)."""
        tok = _tokenizer(self.small)
        prompts = [protocol.small_prompt(tok, q, z) for q, z in zip(questions, signals, strict=True)]
        params = self.small_sampling if n is None else replace(self.small_sampling, n=n)
        return self.small.generate(prompts, params)

    def run(self, questions: list[str]) -> list[DuetResult]:
        """Each question through M -> z -> m, one sample each (greedy unless the sampling says not)."""
        for i, q in enumerate(questions):
            if not q or not q.strip():
                raise DuetError(f"question {i} is empty")
        t0 = time.perf_counter()
        large = [gs[0] for gs in self.think(questions)]
        t1 = time.perf_counter()
        signals = [protocol.extract_signal(g.text) for g in large]
        small = [gs[0] for gs in self.answer(questions, [s.text for s in signals], n=1)]
        t2 = time.perf_counter()
        timings = {"large_s": t1 - t0, "small_s": t2 - t1, "total_s": t2 - t0, "batch_size": len(questions)}
        return [
            DuetResult(
                question=q,
                signal=s,
                answer=y.text.strip(),
                large_tokens=g.num_tokens,
                small_tokens=y.num_tokens,
                large_finish=g.finish_reason,
                small_finish=y.finish_reason,
                large=g,
                small=y,
                timings=timings,
            )
            for q, s, g, y in zip(questions, signals, large, small, strict=True)
        ]


def _tokenizer(engine: Engine) -> Any:
    return getattr(engine, "tokenizer", None)


def build_hf_engine(spec: str, dtype: str = "auto", device: str = "auto") -> Engine:
    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model

    model, tokenizer = load_model(spec, dtype=dtype, device=device)
    return HFEngine(model, tokenizer)


def run_infer(
    question: str,
    large: str,
    small: str,
    max_signal_tokens: int = 256,
    max_answer_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, Any]:
    """`duetlm infer`: one question through the pipeline, as a JSON-ready dict."""
    if not question.strip():
        raise DuetError("the question is empty")
    large_engine = build_hf_engine(large, device=device)
    small_engine = large_engine if small == large else build_hf_engine(small, device=device)
    pipe = DuetPipeline(
        large_engine,
        small_engine,
        large_sampling=SamplingParams(temperature=temperature, max_new_tokens=max_signal_tokens, seed=seed),
        small_sampling=SamplingParams(temperature=temperature, max_new_tokens=max_answer_tokens, seed=seed),
    )
    (result,) = pipe.run([question])
    return result.to_json()
