"""The two-stage pipeline: problem x -> M -> signal z -> m -> answer y (design.md, "One path").

Training, evaluation, the demo and the server all call `DuetPipeline`; they differ only in what they do
with the `DuetResult`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from duetlm import protocol
from duetlm.cascade import ESTIMATORS, VOTE_TEMPERATURE, CascadeSpec, calls_large
from duetlm.engines.base import Engine, Generation, OutputCallback, SamplingParams, generate_streaming
from duetlm.errors import DuetError
from duetlm.protocol import Signal


@dataclass
class DuetResult:
    """One pass of one problem through M -> z -> m (or through one inference baseline).

    `signal`: M's thinking (z). `answer`: the text that is graded.
    `large_tokens`: tokens M generated (|z| plus the stop marker for DUET; the paper's M tokens).
    `small_tokens`: tokens m generated for its answer.
    `large_finish` / `small_finish`: how M's last generation / m's generation ended ("stop", "length",
    or "" for a model the method does not use). `think_finish`: how M's thinking phase ended, where it
    is a generation of its own (DUET, truncation).
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
    think_finish: str = ""
    large_called: bool | None = (
        None  # the cascade: whether m asked M (None: a method that always does or never does)
    )
    confidence: float | None = None  # the cascade: m's confidence in its own first answer

    def to_json(self) -> dict[str, Any]:
        routed = {"large_called": self.large_called, "confidence": self.confidence}
        return {
            **{k: v for k, v in routed.items() if v is not None},
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
    small: Engine | None  # None: M alone (the M-only training modes); `answer` then refuses
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

    def think(self, questions: list[str], on_token: OutputCallback | None = None) -> list[list[Generation]]:
        """Stage 1: M's rollouts (n per question, as `large_sampling.n` says). `on_token` streams
        M's output where its engine can: token ids, or text from a remote M (see
        `engines.base.generate_streaming`)."""
        return generate_streaming(self.large, self.think_prompts(questions), self.large_params(), on_token)

    def think_prompts(self, questions: list[str], instruction: str | None = None) -> list[str]:
        """M's prompts for `questions` (what `think` and `respond` generate from); `instruction`
        replaces `large_instruction`."""
        tok = _tokenizer(self.large)
        instruction = self.large_instruction if instruction is None else instruction
        return [protocol.large_prompt(tok, q, instruction) for q in questions]

    def respond_params(self) -> SamplingParams:
        """M alone: no stop at the end of thinking; its thinking cap plus the answer cap."""
        answer_tokens = self.small_sampling.max_new_tokens if self.small is not None else 0
        return replace(self.large_sampling, max_new_tokens=self.large_sampling.max_new_tokens + answer_tokens)

    def respond(
        self, questions: list[str], instruction: str | None = None, on_token: OutputCallback | None = None
    ) -> list[list[Generation]]:
        """M alone thinks, then writes its own answer (n per question, as `large_sampling.n` says):
        the `original` baseline's generation, the M-alone training modes' rollouts and the server's
        `<model>:large` route. Grade each with `protocol.own_answer`. `on_token`: as in `think`."""
        prompts = self.think_prompts(questions, instruction)
        if on_token is None:
            return self.large.generate(prompts, self.respond_params())
        return generate_streaming(self.large, prompts, self.respond_params(), on_token)

    def answer_prompts(
        self, questions: list[str], signals: list[str | None], at_once: bool = False
    ) -> list[str]:
        """m's prompts for (x, z) pairs (what `answer` generates from); `at_once`: see
        `protocol.small_prompt`."""
        tok = _tokenizer(self.small)
        return [
            protocol.small_prompt(tok, q, z, at_once=at_once) for q, z in zip(questions, signals, strict=True)
        ]

    def answer(
        self,
        questions: list[str],
        signals: list[str | None],
        n: int | None = None,
        on_token: OutputCallback | None = None,
        at_once: bool = False,
    ) -> list[list[Generation]]:
        """Stage 2: m's answers to (x, z); a `None` signal gives m alone (the unguided baseline).
        `at_once`: m's answer is forced to begin with the box (`protocol.ANSWER_AT_ONCE`, not part of
        the generations' text), or, where the vocabulary cannot spell the prefix, capped at one boxed
        value (`protocol.at_once_cap`)."""
        if self.small is None:
            raise DuetError("this pipeline has no small model m: it can only run M alone (respond)")
        params = self.small_sampling if n is None else replace(self.small_sampling, n=n)
        if at_once and not protocol.at_once_by_prefix(_tokenizer(self.small)):
            cap = protocol.at_once_cap(_tokenizer(self.small))
            params = replace(params, max_new_tokens=min(params.max_new_tokens, cap))
        prompts = self.answer_prompts(questions, signals, at_once=at_once)
        return generate_streaming(self.small, prompts, params, on_token)

    def run(self, questions: list[str], seed: int | None = None) -> list[DuetResult]:
        """Each question through M -> z -> m, one sample each (greedy unless the sampling says not).

        `seed` overrides both samplings' seeds for this call (the evaluator seeds each batch).
        """
        _check_questions(questions)
        pipe = self.seeded(seed)
        t0 = time.perf_counter()
        large = [gs[0] for gs in pipe.think(questions)]
        t1 = time.perf_counter()
        signals = signals_of(large)
        small = [gs[0] for gs in pipe.answer(questions, [s.text for s in signals], n=1)]
        t2 = time.perf_counter()
        timings = _timings(t1 - t0, t2 - t1, len(questions))
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
                think_finish=g.finish_reason,
            )
            for q, s, g, y in zip(questions, signals, large, small, strict=True)
        ]

    # ---------------------------------------------------------------------------------------------
    # Inference-only baselines (algorithm.md §5). They return `DuetResult`s so the evaluator treats
    # every method alike: `signal` is M's thinking, `answer` the text that is graded, `large_tokens`
    # every token M generated, `small_tokens` every token m generated.
    #
    # Token caps, the same for every method so that comparisons are fair: M may think for
    # `large_sampling.max_new_tokens` tokens, and the answer (m's, or M's own after its thinking) may
    # take `small_sampling.max_new_tokens` tokens.
    # ---------------------------------------------------------------------------------------------

    def seeded(self, seed: int | None) -> DuetPipeline:
        """This pipeline with both samplings' seeds set to `seed` (itself when `seed` is None)."""
        if seed is None:
            return self
        return replace(
            self,
            large_sampling=replace(self.large_sampling, seed=seed),
            small_sampling=replace(self.small_sampling, seed=seed),
        )

    def original(
        self, questions: list[str], instruction: str | None = None, seed: int | None = None
    ) -> list[DuetResult]:
        """The paper's "original" baseline: M alone thinks, then writes its own answer in one go.

        No stop at the end of thinking; M may generate thinking cap + answer cap tokens. The graded
        `answer` is the text after `</think>`, or the whole response when M never closed the block.
        `instruction` replaces M's instruction (the prompt-based baseline appends the concise one).
        """
        _check_questions(questions)
        seed = self.large_sampling.seed if seed is None else seed
        pipe = replace(self, large_sampling=replace(self.large_sampling, n=1, seed=seed))
        t0 = time.perf_counter()
        outs = [gs[0] for gs in pipe.respond(questions, instruction)]
        elapsed = time.perf_counter() - t0
        timings = _timings(elapsed, 0.0, len(questions))
        return [
            DuetResult(
                question=q,
                signal=s,
                answer=protocol.own_answer(g.text),
                large_tokens=g.num_tokens,
                small_tokens=0,
                large_finish=g.finish_reason,
                small_finish="",
                large=g,
                timings=timings,
            )
            for q, g, s in zip(questions, outs, signals_of(outs), strict=True)
        ]

    def concise(self, questions: list[str], seed: int | None = None) -> list[DuetResult]:
        """The prompt-based baseline: `original` with the paper's concise instruction appended."""
        return self.original(questions, self.large_instruction + protocol.CONCISE_INSTRUCTION, seed=seed)

    def truncation(self, questions: list[str], cap: int, seed: int | None = None) -> list[DuetResult]:
        """Budget forcing: M thinks for at most `cap` tokens; the thinking (cut at `cap` when M
        had not closed it) goes into a closed thinking block (`protocol.large_answer_prompt`), and M
        itself writes the answer. `large_tokens` = thinking tokens + answer tokens;
        `signal.complete` says whether M closed its thinking within the cap."""
        if cap < 1:
            raise DuetError(f"truncation cap must be a positive number of tokens (got {cap})")
        _check_questions(questions)
        tok = _tokenizer(self.large)
        pipe = self.seeded(seed)
        t0 = time.perf_counter()
        think_params = replace(pipe.large_params(), max_new_tokens=cap, n=1)
        prompts = self.think_prompts(questions)
        thoughts = [gs[0] for gs in self.large.generate(prompts, think_params)]
        signals = signals_of(thoughts)
        # The same builder closes a finished and a cut thinking block, so both paths answer alike.
        answer_prompts = [
            protocol.large_answer_prompt(tok, q, s.text, self.large_instruction)
            for q, s in zip(questions, signals, strict=True)
        ]
        answer_params = replace(pipe.large_sampling, max_new_tokens=self.small_sampling.max_new_tokens, n=1)
        answers = [gs[0] for gs in self.large.generate(answer_prompts, answer_params)]
        elapsed = time.perf_counter() - t0
        timings = _timings(elapsed, 0.0, len(questions))
        return [
            DuetResult(
                question=q,
                signal=s,
                answer=a.text.strip(),
                large_tokens=g.num_tokens + a.num_tokens,
                small_tokens=0,
                large_finish=a.finish_reason,
                small_finish="",
                large=a,
                timings=timings,
                think_finish=g.finish_reason,
            )
            for q, s, g, a in zip(questions, signals, thoughts, answers, strict=True)
        ]

    def small_only(
        self, questions: list[str], seed: int | None = None, at_once: bool = False
    ) -> list[DuetResult]:
        """m alone: m's prompt without a signal (its thinking block empty), as in the unguided term
        of marginal utility. No M tokens. `at_once`: m must answer at once, its answer begun with the
        box, so it cannot reason first (Table 1's small model answering directly)."""
        _check_questions(questions)
        pipe = self.seeded(seed)
        t0 = time.perf_counter()
        outs = [gs[0] for gs in pipe.answer(questions, [None] * len(questions), n=1, at_once=at_once)]
        prefixed = at_once and protocol.at_once_by_prefix(_tokenizer(self.small))
        elapsed = time.perf_counter() - t0
        timings = _timings(0.0, elapsed, len(questions))
        return [
            DuetResult(
                question=q,
                signal=protocol.Signal("", complete=True),
                answer=protocol.answer_text(y.text, prefixed=prefixed),
                large_tokens=0,
                small_tokens=y.num_tokens,
                large_finish="",
                small_finish=y.finish_reason,
                small=y,
                timings=timings,
            )
            for q, y in zip(questions, outs, strict=True)
        ]

    def cascade(self, questions: list[str], spec: CascadeSpec, seed: int | None = None) -> list[DuetResult]:
        """m answers alone first; where its confidence (`duetlm.cascade`) is below `spec.threshold`,
        M writes z and m answers again from (x, z), exactly as `run` does for those questions. M tokens
        are zero where M was not called; m tokens count every answer m wrote (its first, the votes of
        `consistency`, and its answer with z)."""
        _check_questions(questions)
        if self.small is None:
            raise DuetError("the cascade needs a small model m: it answers first")
        estimator = ESTIMATORS[spec.estimator]
        pipe = self.seeded(seed)
        t0 = time.perf_counter()
        first_pipe = replace(pipe, small_sampling=replace(pipe.small_sampling, logprobs=True))
        first = [gs[0] for gs in first_pipe.answer(questions, [None] * len(questions), n=1)]
        votes: list[list[Generation]] = [[] for _ in questions]
        if estimator.votes:
            vote_seed = None if seed is None else seed + 1  # not m's first answer's draws
            vote_pipe = replace(
                pipe,
                small_sampling=replace(pipe.small_sampling, temperature=VOTE_TEMPERATURE, seed=vote_seed),
            )
            votes = vote_pipe.answer(questions, [None] * len(questions), n=spec.votes)
        small_s = time.perf_counter() - t0
        confidence = [
            estimator.confidence(g.text, g.logprobs, [v.text for v in vs])
            for g, vs in zip(first, votes, strict=True)
        ]
        asked = [i for i, c in enumerate(confidence) if calls_large(c, spec.threshold)]
        helped = dict(zip(asked, self.run([questions[i] for i in asked], seed=seed), strict=True))
        out = []
        for i, (q, g) in enumerate(zip(questions, first, strict=True)):
            spent = g.num_tokens + sum(v.num_tokens for v in votes[i])
            if i in helped:
                r = helped[i]
                out.append(
                    replace(
                        r, small_tokens=r.small_tokens + spent, large_called=True, confidence=confidence[i]
                    )
                )
                continue
            out.append(
                DuetResult(
                    question=q,
                    signal=protocol.Signal("", complete=True),
                    answer=g.text.strip(),
                    large_tokens=0,
                    small_tokens=spent,
                    large_finish="",
                    small_finish=g.finish_reason,
                    small=g,
                    timings=_timings(0.0, small_s, len(questions)),
                    large_called=False,
                    confidence=confidence[i],
                )
            )
        return out


def signals_of(generations: list[Generation]) -> list[Signal]:
    """z of each of M's generations (`protocol.extract_signal`): the one place the pipeline's users
    (trainer, evaluator, server) read a signal from M's output."""
    return [protocol.extract_signal(g.text) for g in generations]


def _timings(large_s: float, small_s: float, batch_size: int) -> dict[str, float]:
    """A batch's wall-clock per model (`DuetResult.timings`)."""
    return {"large_s": large_s, "small_s": small_s, "total_s": large_s + small_s, "batch_size": batch_size}


def _check_questions(questions: list[str]) -> None:
    for i, q in enumerate(questions):
        if not q or not q.strip():
            raise DuetError(f"question {i} is empty")


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
