"""Decoding controls (`duetlm.engines.controls`) on tiny real models: each control against a
reference decoding loop written out here by hand, the JSON constraint against jsonschema, and the
continuous batcher against `HFEngine` alone."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from duetlm.engines.base import JSON_OBJECT, SamplingParams
from duetlm.engines.controls import count_penalties

PROMPT = "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
ENUM_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


def reference_greedy(engine, prompt: str, steps: int, adjust) -> list[int]:
    """Greedy decoding the slow way: a full forward pass over prompt + output at each step, the raw
    last-position logits handed to `adjust(logits, prompt_ids, output_ids)`, stopping at EOS."""
    prompt_ids = engine.encode([prompt])[0]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = engine.model(torch.tensor([prompt_ids + out])).logits[0, -1].float()
            tok = int(adjust(logits, prompt_ids, out).argmax())
            out.append(tok)
            if tok in engine.eos_ids:
                break
    return out


def greedy(engine, steps: int = 12, **controls) -> list[int]:
    sp = SamplingParams(temperature=0.0, max_new_tokens=steps, **controls)
    return engine.generate([PROMPT], sp)[0][0].token_ids


def test_count_penalties_is_openais_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    got = count_penalties(logits, counts, presence=0.5, frequency=0.25)
    assert torch.allclose(got, torch.tensor([[1.0, 2.0 - 0.25 - 0.5, 3.0 - 0.75 - 0.5, 4.0]]))


def test_logit_bias_matches_the_reference_loop_and_changes_the_output(tiny_engine):
    plain = greedy(tiny_engine)
    banned = plain[0]
    bias = ((banned, -100.0), (7, 5.0))

    def adjust(logits, _p, _o):
        logits = logits.clone()
        for t, b in bias:
            logits[t] += b
        return logits

    got = greedy(tiny_engine, logit_bias=bias)
    assert got == reference_greedy(tiny_engine, PROMPT, 12, adjust)
    assert banned not in got and got != plain
    forced = greedy(tiny_engine, steps=4, logit_bias=((7, 100.0),))
    assert forced == [7, 7, 7, 7]


def test_repetition_penalty_matches_the_reference_loop(tiny_engine):
    def adjust(logits, prompt, out):
        logits = logits.clone()
        for t in set(prompt + out):
            logits[t] = logits[t] / 5.0 if logits[t] > 0 else logits[t] * 5.0
        return logits

    got = greedy(tiny_engine, steps=16, repetition_penalty=5.0)
    assert got == reference_greedy(tiny_engine, PROMPT, 16, adjust)
    assert got != greedy(tiny_engine, steps=16)


def test_presence_and_frequency_penalties_match_the_reference_loop(tiny_engine):
    def adjust(logits, _prompt, out):
        logits = logits.clone()
        for t in set(out):
            logits[t] -= 0.7 * out.count(t) + 1.1
        return logits

    got = greedy(tiny_engine, steps=16, presence_penalty=1.1, frequency_penalty=0.7)
    assert got == reference_greedy(tiny_engine, PROMPT, 16, adjust)
    assert len(set(got)) > len(set(greedy(tiny_engine, steps=16)))


def test_min_p_one_keeps_only_the_most_likely_token(tiny_engine):
    sampled = SamplingParams(temperature=1.0, max_new_tokens=12, seed=3)
    kept = tiny_engine.generate([PROMPT], SamplingParams(**{**sampled.__dict__, "min_p": 1.0}))[0][0]
    assert kept.token_ids == greedy(tiny_engine)
    free = tiny_engine.generate([PROMPT], sampled)[0][0]
    assert free.token_ids != kept.token_ids  # seed 3 at T=1 leaves the argmax somewhere


@pytest.mark.parametrize("temperature,seed", [(0.0, None), (1.0, 0), (1.0, 1), (1.5, 2)])
def test_json_schema_output_validates(tiny_engine, temperature, seed):
    sp = SamplingParams(
        temperature=temperature, seed=seed, max_new_tokens=40, json_schema=json.dumps(ENUM_SCHEMA), n=2
    )
    for g in tiny_engine.generate([PROMPT], sp)[0]:
        assert g.finish_reason == "stop", g.text
        assert g.token_ids[-1] in tiny_engine.eos_ids
        jsonschema.validate(json.loads(g.text), ENUM_SCHEMA)


def test_json_object_mode_writes_json_where_it_finishes(tiny_engine):
    """Any JSON object: an untrained model may run out of tokens inside a string; where it stops, the
    text parses as an object."""
    sp = SamplingParams(temperature=1.0, seed=0, max_new_tokens=48, json_schema=JSON_OBJECT, n=6)
    outs = tiny_engine.generate([PROMPT], sp)[0]
    finished = [g for g in outs if g.finish_reason == "stop"]
    assert finished
    for g in finished:
        assert isinstance(json.loads(g.text), dict)
    for g in outs:
        assert g.text.startswith("{")


def test_controls_keep_raw_logprobs(tiny_engine):
    """Log-probs are the model's own (vLLM's raw_logprobs): a bias changes the tokens, not how a
    token's log-prob is computed."""
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=True, logit_bias=((7, 100.0),))
    g = tiny_engine.generate([PROMPT], sp)[0][0]
    prompt_ids = tiny_engine.encode([PROMPT])[0]
    with torch.no_grad():
        logits = tiny_engine.model(torch.tensor([prompt_ids + g.token_ids])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], -1)
    want = logp.gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(g.logprobs), want, atol=1e-4)


def test_batcher_rows_with_controls_equal_the_engine_alone(tiny_engine):
    from duetlm.engines.continuous import ContinuousBatcher

    cases = [
        SamplingParams(temperature=0.0, max_new_tokens=10),
        SamplingParams(temperature=0.0, max_new_tokens=10, logit_bias=((7, 3.0),), repetition_penalty=1.5),
        SamplingParams(temperature=1.0, seed=4, max_new_tokens=10, presence_penalty=1.0, min_p=0.2),
        SamplingParams(temperature=1.0, seed=5, max_new_tokens=40, json_schema=json.dumps(ENUM_SCHEMA)),
        SamplingParams(temperature=0.0, max_new_tokens=40, json_schema=json.dumps(ENUM_SCHEMA)),
    ]
    prompt_ids = tiny_engine.encode([PROMPT])[0]
    with ContinuousBatcher(tiny_engine, max_batch=8) as batcher:
        futures = [batcher.submit(prompt_ids, sp) for sp in cases]
        got = [f.result(timeout=120).token_ids for f in futures]
    for sp, ids in zip(cases, got, strict=True):
        assert ids == tiny_engine.generate([PROMPT], sp)[0][0].token_ids, sp


def test_bad_controls_are_clear_errors(tiny_engine):
    from duetlm.engines.continuous import ContinuousBatcher

    with pytest.raises(ValueError, match="logit_bias token id 99999 is outside the vocabulary"):
        greedy(tiny_engine, logit_bias=((99999, 1.0),))
    with pytest.raises(ValueError, match="JSON schema cannot be compiled"):
        greedy(tiny_engine, json_schema='{"type": "no-such-type"}')
    with (
        ContinuousBatcher(tiny_engine, max_batch=2) as batcher,
        pytest.raises(ValueError, match="logit_bias"),
    ):
        batcher.submit([5, 6], SamplingParams(temperature=0.0, logit_bias=((-1, 1.0),)))
