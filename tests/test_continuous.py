"""ContinuousBatcher on tiny real models: each request decodes as it would alone in `HFEngine`, however
the requests arrive; per-row sampling; robustness (bad requests, a failing step, close)."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from duetlm.engines.base import SamplingParams
from duetlm.engines.continuous import BatcherClosed, ContinuousBatcher, admit_count
from duetlm.engines.hf import HFEngine

TEXTS = [
    "What is 12 + 7?",
    "Compute 3 * (4 + 5). The sum is 9, times 3 gives",
    "hi",
    "A train travels 60 miles in 1.5 hours. What is its average speed in miles per hour? First",
    "hmm, wait",
    "First add the ones: 2 + 7 = 9.",
]
# Measured on both tiny models (fp32, CPU): at most 4.8e-7 between a row of the batch and HFEngine alone.
LOGPROB_TOL = 1e-5
TIMEOUT = 60


@pytest.fixture(scope="module")
def engines(tiny_engine, tiny_small_engine) -> dict[str, HFEngine]:
    return {"qwen3": tiny_engine, "llama": tiny_small_engine}


def _ids(engine: HFEngine, texts: list[str]) -> list[list[int]]:
    return engine.encode(texts)


def _alone(engine: HFEngine, prompt: list[int], sp: SamplingParams):
    return engine.generate_ids([prompt], sp)[0][0]


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_staggered_requests_match_hf_alone(engines, arch):
    """Requests join mid-decode (submitted from the first request's on_token at its 3rd and 7th
    token), with longer and shorter prompts than the running batch, different max_new_tokens, greedy
    and seeded top-k/top-p rows, a stop string, a stop id and log-probs: each request's tokens, text, finish reason
    and log-probs are those HFEngine gives for it alone.

    Greedy decoding of a random tiny model repeats one token, so the seeded sampled rows (a flat
    distribution: every draw depends on the exact logits) and the log-probs are what make this strict.
    """
    engine = engines[arch]
    prompts = _ids(engine, TEXTS)
    sps = [
        SamplingParams(temperature=0.0, max_new_tokens=20, logprobs=True, top_logprobs=3),
        SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=1, logprobs=True),
        SamplingParams(temperature=0.0, max_new_tokens=14, logprobs=True),
        SamplingParams(temperature=0.8, top_k=30, max_new_tokens=18, seed=3, logprobs=True, top_logprobs=5),
        SamplingParams(temperature=1.0, max_new_tokens=22, seed=4, logprobs=True),
        SamplingParams(temperature=0.0, max_new_tokens=26, logprobs=True),
    ]
    # A stop string that request 3 reaches: the text of a token it samples at step 5 or later.
    free = _alone(engine, prompts[3], sps[3])
    piece = next(p for p in (engine.tokenizer.decode([t]) for t in free.token_ids[4:]) if p.strip())
    sps[3] = replace(sps[3], stop=(piece,))
    # A stop id that request 4 reaches: the 4th token it samples.
    sps[4] = replace(sps[4], stop_token_ids=(_alone(engine, prompts[4], sps[4]).token_ids[3],))
    expected = [_alone(engine, p, sp) for p, sp in zip(prompts, sps, strict=True)]
    for k in (3, 4):
        assert expected[k].finish_reason == "stop" and expected[k].num_tokens < sps[k].max_new_tokens
    assert len({tuple(g.token_ids) for g in expected}) == len(expected)

    batcher = ContinuousBatcher(engine, max_batch=8)
    futures = []
    first_tokens: list[int] = []
    joined = threading.Event()

    def on_first(tok: int) -> None:  # runs on the batcher's thread, between steps
        first_tokens.append(tok)
        if len(first_tokens) == 3:  # a longer and two shorter prompts join a running batch
            futures.extend(batcher.submit(p, sp) for p, sp in zip(prompts[1:4], sps[1:4], strict=True))
        if len(first_tokens) == 7:
            futures.extend(batcher.submit(p, sp) for p, sp in zip(prompts[4:], sps[4:], strict=True))
            joined.set()

    try:
        futures.append(batcher.submit(prompts[0], sps[0], on_first))
        assert joined.wait(TIMEOUT)
        out = [f.result(TIMEOUT) for f in list(futures)]
    finally:
        batcher.close()
    # Three prefills (so two merges into a running batch); request 3 (the longest prompt) stopped
    # early, so its padding columns were trimmed from the others.
    assert batcher.stats.prefills == 3 and batcher.stats.trims >= 1
    for got, want in zip(out, expected, strict=True):
        assert got.token_ids == want.token_ids
        assert got.text == want.text
        assert got.finish_reason == want.finish_reason
        assert got.prompt_token_ids == want.prompt_token_ids and got.prompt_index == 0
        assert got.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_TOL)
        if want.top_logprobs is None:
            assert got.top_logprobs is None
        else:  # rows asking for 3, 5 and no top log-probs share steps; each gets its own
            assert [[t for t, _ in top] for top in got.top_logprobs] == [
                [t for t, _ in top] for top in want.top_logprobs
            ]
            flat = [v for top in got.top_logprobs for _, v in top]
            assert flat == pytest.approx([v for top in want.top_logprobs for _, v in top], abs=LOGPROB_TOL)
    assert [g.top_logprobs is not None for g in out] == [True, False, False, True, False, False]
    assert {len(top) for top in out[3].top_logprobs} == {5}
    assert first_tokens == out[0].token_ids


def test_seeded_sample_is_the_same_whatever_shares_its_batch(engines):
    engine = engines["qwen3"]
    prompts = _ids(engine, TEXTS)
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=40, max_new_tokens=12, seed=11, logprobs=True)
    noise = SamplingParams(temperature=1.0, max_new_tokens=16)
    with ContinuousBatcher(engine, max_batch=8) as batcher:
        alone = batcher.submit(prompts[1], sp).result(TIMEOUT)
        crowd = [batcher.submit(p, noise) for p in prompts[2:5]]
        crowded = batcher.submit(prompts[1], sp)
        crowd += [batcher.submit(p, noise) for p in prompts[:2]]
        crowded_gen = crowded.result(TIMEOUT)
        other_seed = batcher.submit(prompts[1], replace(sp, seed=12)).result(TIMEOUT)
        for f in crowd:
            f.result(TIMEOUT)
    assert crowded_gen.token_ids == alone.token_ids
    assert crowded_gen.logprobs == pytest.approx(alone.logprobs, abs=LOGPROB_TOL)
    assert other_seed.token_ids != alone.token_ids  # the seed matters (flat random model, 12 draws)


def test_unseeded_rows_draw_each_within_its_own_filter(engines):
    """Unseeded sampled rows sharing steps: each row's tokens come from its own logits (top-2 of them),
    and a top-1 row is greedy."""
    engine = engines["qwen3"]
    prompts = _ids(engine, TEXTS)
    top2 = SamplingParams(temperature=1.0, top_k=2, max_new_tokens=8)
    top1 = SamplingParams(temperature=0.7, top_k=1, max_new_tokens=8)
    torch.manual_seed(0)
    with ContinuousBatcher(engine, max_batch=8) as batcher:
        futures = [batcher.submit(p, top1 if i % 3 == 0 else top2) for i, p in enumerate(prompts)]
        out = [f.result(TIMEOUT) for f in futures]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    drew_second = 0
    for i, (prompt, g) in enumerate(zip(prompts, out, strict=True)):
        if i % 3 == 0:
            assert g.token_ids == _alone(engine, prompt, greedy).token_ids
            continue
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([prompt + g.token_ids])).logits[0]
        for k, tok in enumerate(g.token_ids):
            best = logits[len(prompt) - 1 + k].topk(2).indices.tolist()
            assert tok in best, (i, k)
            drew_second += tok == best[1]
    assert drew_second > 0  # the top-2 rows did sample (a flat random model: about half the draws)


def test_max_batch_is_respected_and_every_request_completes(engines):
    engine = engines["llama"]
    prompts = _ids(engine, TEXTS) * 2
    streams: list[list[int]] = [[] for _ in prompts]
    with ContinuousBatcher(engine, max_batch=3) as batcher:
        futures = [
            batcher.submit(p, SamplingParams(temperature=0.0, max_new_tokens=3 + i), streams[i].append)
            for i, p in enumerate(prompts)
        ]
        out = [f.result(TIMEOUT) for f in futures]
    assert batcher.stats.peak_batch == 3
    assert [len(g.token_ids) for g in out] == [3 + i for i in range(len(prompts))]
    assert streams == [g.token_ids for g in out]
    assert batcher.stats.requests == len(prompts)


def test_equal_prompts_admitted_together_share_one_prefill(engines):
    """A request's n choices are n requests with one prompt: admitted together, the prompt is prefilled
    once and its cache copied to each row; every choice is still what HFEngine gives it alone."""
    engine = engines["qwen3"]
    prompts = _ids(engine, TEXTS)
    sampled = [
        SamplingParams(temperature=1.0, max_new_tokens=10, seed=s, logprobs=True, top_logprobs=2)
        for s in (1, 2, 3, 4)
    ]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    late = [(prompts[3], sp) for sp in sampled] + [(prompts[1], greedy), (prompts[3], greedy)]
    futures = []
    batcher = ContinuousBatcher(engine, max_batch=8)

    def on_first(tok: int) -> None:  # the batcher's thread: all six wait for the same admission
        if not futures:
            futures.extend(batcher.submit(p, sp) for p, sp in late)
            submitted.set()

    submitted = threading.Event()
    try:
        head = batcher.submit(prompts[0], greedy, on_first)
        assert submitted.wait(TIMEOUT)
        out = [f.result(TIMEOUT) for f in [head, *futures]]
    finally:
        batcher.close()
    assert batcher.stats.prefills == 2 and batcher.stats.prefill_rows == 1 + 2
    for got, (prompt, sp) in zip(out[1:], late, strict=True):
        want = _alone(engine, prompt, sp)
        assert got.token_ids == want.token_ids and got.prompt_token_ids == prompt
        if sp.logprobs:
            assert got.logprobs == pytest.approx(want.logprobs, abs=LOGPROB_TOL)
            assert [[t for t, _ in top] for top in got.top_logprobs] == [
                [t for t, _ in top] for top in want.top_logprobs
            ]
    assert len({tuple(g.token_ids) for g in out[1:5]}) == 4  # four seeds, four different choices


def test_admit_count_follows_the_ratio_and_the_wait():
    # Nothing running, or enough waiting for the ratio, or the oldest waited long enough: all that fit.
    assert admit_count(3, 0, 8, 0, ratio=2.0, max_wait=16) == 3
    assert admit_count(4, 2, 8, 0, ratio=2.0, max_wait=16) == 4
    assert admit_count(3, 2, 8, 16, ratio=2.0, max_wait=16) == 3
    assert admit_count(12, 2, 6, 0, ratio=2.0, max_wait=16) == 6  # no more than the room
    # Too few waiting and not waited long enough: none yet.
    assert admit_count(3, 2, 8, 15, ratio=2.0, max_wait=16) == 0
    # ratio 0 admits at every step boundary; nothing to admit or no room: none.
    assert admit_count(1, 15, 1, 0, ratio=0.0, max_wait=16) == 1
    assert admit_count(0, 0, 8, 0, ratio=0.0, max_wait=0) == 0
    assert admit_count(5, 8, 0, 99, ratio=0.0, max_wait=0) == 0


def test_negative_admission_settings_are_refused(engines):
    with pytest.raises(ValueError, match="admit_ratio and admit_max_wait must be >= 0, got -1"):
        ContinuousBatcher(engines["llama"], admit_ratio=-1)


@pytest.mark.parametrize(
    ("ratio", "max_wait", "late", "joins_after"),
    [
        (0.0, 16, 1, 3),  # admitted at the next step boundary
        (1.0, 16, 1, 3),  # 1 waiting >= 1.0 x 1 running
        (2.0, 5, 1, 8),  # 1 < 2.0 x 1: waits 5 decode steps, then joins
        (2.0, 5, 2, 3),  # 2 >= 2.0 x 1: join at once, together
    ],
)
def test_admission_waits_for_the_ratio_or_the_step_limit(engines, ratio, max_wait, late, joins_after):
    """A request decodes alone; on its 3rd token (during decode step 2) `late` requests arrive. They
    join when `admit_count` says so: their first token comes after the first request's `joins_after`-th.
    However long they waited, each output is what HFEngine gives for it alone."""
    engine = engines["llama"]
    prompts = _ids(engine, TEXTS)
    sp = SamplingParams(temperature=0.0, max_new_tokens=12)
    events: list[str] = []
    futures = []
    batcher = ContinuousBatcher(engine, max_batch=8, admit_ratio=ratio, admit_max_wait=max_wait)

    def on_first(tok: int) -> None:  # the batcher's thread, inside a step
        events.append("first")
        if events.count("first") == 3:
            for k in range(late):
                futures.append(batcher.submit(prompts[1 + k], sp, lambda t, k=k: events.append(f"late{k}")))

    try:
        futures.insert(0, batcher.submit(prompts[0], sp, on_first))
        out = [f.result(TIMEOUT) for f in futures]
    finally:
        batcher.close()
    for k in range(late):
        assert events[: events.index(f"late{k}")].count("first") == joins_after
    assert batcher.stats.prefills == 2
    for got, prompt in zip(out, prompts, strict=False):
        assert got.token_ids == _alone(engine, prompt, sp).token_ids


def test_bad_requests_are_refused_at_submit(engines):
    engine = engines["qwen3"]
    limit = engine.model.config.max_position_embeddings
    with ContinuousBatcher(engine) as batcher:
        with pytest.raises(ValueError, match="empty"):
            batcher.submit([], SamplingParams())
        with pytest.raises(ValueError, match="n=2"):
            batcher.submit([1, 2], SamplingParams(n=2))
        with pytest.raises(ValueError, match=rf"3 tokens \+ max_new_tokens {limit} = {limit + 3}"):
            batcher.submit([1, 2, 3], SamplingParams(max_new_tokens=limit))
        with pytest.raises(ValueError, match="token id 99999"):
            batcher.submit([1, 99999], SamplingParams())
        # Zero new tokens is no error: an empty "length" sample at once, as HFEngine gives.
        empty = batcher.submit([1, 2], SamplingParams(max_new_tokens=0)).result(TIMEOUT)
        assert empty.token_ids == [] and empty.finish_reason == "length" and empty.text == ""
        assert _alone(engine, [1, 2], SamplingParams(max_new_tokens=0)).token_ids == []
        # The batcher still serves after refusals.
        assert (
            batcher.submit([1, 2], SamplingParams(temperature=0.0, max_new_tokens=2))
            .result(TIMEOUT)
            .num_tokens
            == 2
        )


def test_a_failing_step_fails_its_rows_and_the_loop_goes_on(engines):
    """A fault inside the model's forward (a real hook that raises once armed) fails every request of
    that batch with the error; requests submitted afterwards are served. A raising on_token fails only
    its own request."""
    engine = engines["qwen3"]
    prompts = _ids(engine, TEXTS)
    armed = threading.Event()

    def fault(module, args):
        if armed.is_set():
            raise RuntimeError("injected fault")

    handle = engine.model.register_forward_pre_hook(fault)
    try:
        with ContinuousBatcher(engine, max_batch=4) as batcher:
            started = threading.Event()
            first = batcher.submit(
                prompts[0], SamplingParams(temperature=0.0, max_new_tokens=50), lambda _t: started.set()
            )
            second = batcher.submit(prompts[1], SamplingParams(temperature=0.0, max_new_tokens=50))
            assert started.wait(TIMEOUT)
            armed.set()
            for f in (first, second):
                with pytest.raises(RuntimeError, match="injected fault"):
                    f.result(TIMEOUT)
            armed.clear()

            def broken(_tok: int) -> None:
                raise KeyError("client went away")

            bad = batcher.submit(prompts[2], SamplingParams(temperature=0.0, max_new_tokens=5), broken)
            good = batcher.submit(prompts[2], SamplingParams(temperature=0.0, max_new_tokens=5))
            with pytest.raises(KeyError, match="client went away"):
                bad.result(TIMEOUT)
            want = _alone(engine, prompts[2], SamplingParams(temperature=0.0, max_new_tokens=5))
            assert good.result(TIMEOUT).token_ids == want.token_ids
    finally:
        handle.remove()


def test_close_fails_running_and_waiting_requests(engines):
    engine = engines["llama"]
    prompts = _ids(engine, TEXTS)
    sp = SamplingParams(temperature=0.0, max_new_tokens=400)
    batcher = ContinuousBatcher(engine, max_batch=1)
    started = threading.Event()
    futures = [batcher.submit(prompts[0], sp, lambda _t: started.set())]
    futures += [batcher.submit(p, sp) for p in prompts[1:]]
    assert started.wait(TIMEOUT)
    batcher.close()
    assert not batcher._thread.is_alive()
    for f in futures:
        with pytest.raises(BatcherClosed, match="closed before this request finished"):
            f.result(TIMEOUT)
    with pytest.raises(BatcherClosed, match="closed"):
        batcher.submit(prompts[0], sp)
    batcher.close()  # idempotent


def test_model_left_in_training_mode_is_restored(engines):
    """The batcher decodes in eval mode (no dropout) and leaves the model's mode as it found it."""
    engine = engines["llama"]
    engine.model.train()
    try:
        with ContinuousBatcher(engine) as batcher:
            g = batcher.submit([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=3)).result(TIMEOUT)
        assert engine.model.training
        assert (
            g.token_ids
            == _alone(engine, [1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=3)).token_ids
        )
    finally:
        engine.model.eval()
    assert torch.is_grad_enabled()


def test_a_final_eos_ends_the_sample_and_is_not_text(engines):
    """With a token the model samples declared an EOS of the engine, the sample stops there, keeps the
    token in `token_ids` and drops it from `text`, as HFEngine does."""
    engine = engines["llama"]
    prompt = _ids(engine, TEXTS[:1])[0]
    sp = SamplingParams(temperature=1.0, max_new_tokens=12, seed=21)
    eos = _alone(engine, prompt, sp).token_ids[4]
    eos_engine = HFEngine(engine.model, engine.tokenizer)
    eos_engine.eos_ids = engine.eos_ids | {eos}
    want = _alone(eos_engine, prompt, sp)
    with ContinuousBatcher(eos_engine) as batcher:
        got = batcher.submit(prompt, sp).result(TIMEOUT)
    assert got.token_ids == want.token_ids and got.token_ids[-1] == eos
    assert got.finish_reason == want.finish_reason == "stop"
    assert got.text == want.text == engine.tokenizer.decode(want.token_ids[:-1])
