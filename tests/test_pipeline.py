"""The one M → z → m path (`duetlm.pipeline`): what each stage generates from, what is graded, and the
token accounting, checked against the engines and `protocol` called by hand (tiny real models, greedy)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from duetlm import protocol
from duetlm.engines.base import SamplingParams
from duetlm.errors import DuetError
from duetlm.pipeline import DuetPipeline, signals_of

QUESTIONS = ["What is 12 + 7?", "Compute 3 * (4 + 5).", "What is 6 * 7?"]


@pytest.fixture(scope="module")
def pipe(make_pipeline):
    return make_pipeline(signal_tokens=10, answer_tokens=6)


def test_run_is_think_then_extract_then_answer(pipe):
    results = pipe.run(QUESTIONS)
    large, small = pipe.large, pipe.small
    # Stage 1 by hand: M's prompt, stopped at the end of its thinking.
    params = pipe.large_params()
    assert protocol.THINK_CLOSE in params.stop
    thoughts = [gs[0] for gs in large.generate(pipe.think_prompts(QUESTIONS), params)]
    # Stage 2 by hand: m's prompt carries z = extract_signal(M's text).
    signals = [protocol.extract_signal(g.text) for g in thoughts]
    prompts = [
        protocol.small_prompt(small.tokenizer, q, s.text) for q, s in zip(QUESTIONS, signals, strict=True)
    ]
    answers = [gs[0] for gs in small.generate(prompts, pipe.small_sampling)]
    for r, g, s, y in zip(results, thoughts, signals, answers, strict=True):
        assert r.signal == s and r.large.token_ids == g.token_ids
        assert r.answer == y.text.strip() and r.small.token_ids == y.token_ids
        assert (r.large_tokens, r.small_tokens) == (g.num_tokens, y.num_tokens)
        assert 1 <= r.large_tokens <= 10 and 1 <= r.small_tokens <= 6
        assert r.think_finish == r.large_finish == g.finish_reason
    assert results[0].timings["batch_size"] == len(QUESTIONS)
    assert signals_of(thoughts) == signals


def test_small_only_is_m_with_an_empty_thinking_block(pipe):
    results = pipe.small_only(QUESTIONS)
    alone = [gs[0] for gs in pipe.answer(QUESTIONS, [None] * len(QUESTIONS))]
    assert pipe.answer_prompts(QUESTIONS, [None] * 3) == pipe.answer_prompts(QUESTIONS, [""] * 3)
    for r, y in zip(results, alone, strict=True):
        assert (r.answer, r.small_tokens, r.large_tokens) == (y.text.strip(), y.num_tokens, 0)
        assert r.signal == protocol.Signal("", True) and r.large is None


def test_small_at_once_begins_m_s_answer_with_the_box(pipe):
    results = pipe.small_only(QUESTIONS, at_once=True)
    prompts = pipe.answer_prompts(QUESTIONS, [None] * 3, at_once=True)
    assert prompts == [p + protocol.ANSWER_AT_ONCE for p in pipe.answer_prompts(QUESTIONS, [None] * 3)]
    forced = [gs[0] for gs in pipe.answer(QUESTIONS, [None] * 3, at_once=True)]
    free = [gs[0] for gs in pipe.answer(QUESTIONS, [None] * 3)]
    assert [y.text for y in forced] != [y.text for y in free]  # the prefix changes what m writes
    for r, y in zip(results, forced, strict=True):
        assert r.answer == (protocol.ANSWER_AT_ONCE + y.text).strip() and r.answer.startswith("\\boxed{")
        assert (r.small_tokens, r.large_tokens) == (y.num_tokens, 0)


def test_original_grades_the_whole_text_when_thinking_never_closes(make_pipeline):
    # Sampled, so the tiny M writes text rather than greedy newlines; seeded, so `respond` repeats it.
    pipe = make_pipeline(signal_tokens=10, answer_tokens=6, temperature=1.0, seed=0)
    # M alone may think for the thinking cap plus the answer cap, with no stop at </think>.
    assert pipe.respond_params().max_new_tokens == 16
    assert protocol.THINK_CLOSE not in pipe.respond_params().stop
    results = pipe.original(QUESTIONS)
    responses = [gs[0] for gs in pipe.respond(QUESTIONS)]
    unclosed = [r for r, g in zip(results, responses, strict=True) if protocol.THINK_CLOSE not in g.text]
    assert unclosed, "the tiny M closed every thinking block; the test needs one that never closes"
    for r, g in zip(results, responses, strict=True):
        assert r.answer == protocol.own_answer(g.text) and r.large_tokens == g.num_tokens
        assert r.small_tokens == 0 and r.small is None
    for r in unclosed:
        assert r.answer and r.answer == r.large.text.strip()  # graded on everything M wrote


def test_m_alone_pipeline_responds_but_cannot_answer(tiny_engine):
    solo = DuetPipeline(tiny_engine, None, large_sampling=SamplingParams(temperature=0.0, max_new_tokens=7))
    assert solo.respond_params().max_new_tokens == 7  # no answer cap without m
    (g,) = [gs[0] for gs in solo.respond(QUESTIONS[:1])]
    assert 1 <= g.num_tokens <= 7
    with pytest.raises(DuetError, match="no small model"):
        solo.answer(QUESTIONS[:1], [None])


def test_sampled_runs_are_reproducible_by_seed(make_pipeline):
    pipe = make_pipeline(signal_tokens=10, answer_tokens=6, temperature=1.0, seed=3)
    first, again = pipe.run(QUESTIONS), pipe.run(QUESTIONS)
    assert [r.to_json() | {"timings": 0} for r in first] == [r.to_json() | {"timings": 0} for r in again]
    other = pipe.run(QUESTIONS, seed=4)
    assert [r.large.token_ids for r in other] != [r.large.token_ids for r in first]
    assert pipe.seeded(4).large_sampling.seed == pipe.seeded(4).small_sampling.seed == 4
    assert pipe.seeded(None) is pipe


def test_bad_input_names_the_item(pipe):
    with pytest.raises(DuetError, match="question 1 is empty"):
        pipe.run(["What is 1 + 1?", "  "])
    with pytest.raises(DuetError, match="positive"):
        pipe.truncation(QUESTIONS, 0)
    with pytest.raises(ValueError):
        pipe.answer(QUESTIONS, [None])  # one signal per question


def test_instruction_replaces_ms_instruction(pipe):
    custom = pipe.think_prompts(QUESTIONS[:1], instruction=" Be brief.")
    default = pipe.think_prompts(QUESTIONS[:1])
    assert custom != default and " Be brief." in custom[0]
    assert replace(pipe, large_instruction=" Be brief.").think_prompts(QUESTIONS[:1]) == custom
