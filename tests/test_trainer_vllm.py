"""The trainer with vLLM rollouts (`large.engine: vllm`): the training copy stays an HF model, each
update's weights are pushed to the engine, π_old comes from the training model, a resumed run's engine
starts from the checkpoint.

The `vllm`-marked test needs vLLM (`.venv-vllm/bin/python -m pytest -m vllm -q tests/test_trainer_vllm.py`);
without it, it skips (fails under DUETLM_REQUIRE_VLLM=1). The unmarked tests run in the default suite:
they check what is refused before any model loads.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import arithmetic_problems, tiny_train_config
from duetlm.config import ConfigError, TrainConfig
from duetlm.engines.base import SamplingParams
from test_vllm import TINY_LOGPROB_TOL, _max_diff, _require_vllm, _vivid

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

PROBLEMS = arithmetic_problems(4, prefix="v")


# What the vLLM run changes in the trainer tests' tiny config (conftest.tiny_train_config).
VLLM_SECTIONS = {
    "large": {"dtype": "float32", "engine": "vllm"},
    "small": {"dtype": "float32"},
    "data": {"source": "unused"},
    "rollout": {"vllm": {"max_model_len": 256, "kv_cache_gib": 0.25}},
    # λ > 0 and L = |z| (re-tokenised signal text, which varies even when every rollout runs to
    # max_new_tokens): M's rewards differ within a group, so its advantages and gradient are not 0.
    # η is the config's default (0.01), as this test was written with.
    "objective": {"lambda_init": 1.0, "lambda_step_size": 0.01, "length_measure": "signal"},
    "optim": {"lr_large": 1e-2},
    "logging": {"sample_every": 0},
}


def vllm_config(tmp_path: Path, large_dir: Path, small_dir: Path, **sections) -> TrainConfig:
    """2 prompts × 2 rollouts × 2 answers, 8-token outputs, M rolled out by vLLM."""
    return tiny_train_config(tmp_path, large_dir, small_dir, VLLM_SECTIONS, sections)


# -------------------------------------------------------------------------------------------------
# Default suite: validation before any model loads


def test_config_accepts_vllm_and_refuses_remote(tmp_path):
    cfg = vllm_config(tmp_path, tmp_path, tmp_path, small={"engine": "vllm", "lora": True})
    assert (cfg.large.engine, cfg.small.engine) == ("vllm", "vllm")
    for role in ("large", "small"):
        with pytest.raises(
            ConfigError, match=re.escape(f"{role}.engine='remote' cannot be used for training")
        ):
            vllm_config(tmp_path, tmp_path, tmp_path, **{role: {"engine": "remote", "url": "http://x"}})
    with pytest.raises(
        ConfigError, match=r"unknown rollout.vllm option\(s\) \['kv_cache'\]; valid: max_model_len"
    ):
        vllm_config(tmp_path, tmp_path, tmp_path, rollout={"vllm": {"kv_cache": 1}})


def test_trainer_refuses_vllm_with_several_processes_or_without_vllm(tmp_path, tiny_dir, monkeypatch):
    import importlib.util

    from duetlm.engines.vllm import VLLMUnavailableError
    from duetlm.train import DuetTrainer

    cfg = vllm_config(tmp_path, tiny_dir, tiny_dir)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        ConfigError, match=r"large.engine=vllm: vLLM rollouts are supported in one process only"
    ):
        DuetTrainer(cfg, train_problems=PROBLEMS)
    monkeypatch.delenv("WORLD_SIZE")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(
            VLLMUnavailableError, match=r"large.engine=vllm needs the vllm package.*install_vllm"
        ):
            DuetTrainer(cfg, train_problems=PROBLEMS)
    else:  # constructing validates only; the engine starts in setup()
        assert DuetTrainer(cfg, train_problems=PROBLEMS).policies == {}


# -------------------------------------------------------------------------------------------------
# vLLM for real


@pytest.fixture(scope="module")
def vllm_models(tiny_tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    """M: a tiny Qwen3 vLLM accepts (head_dim 32), with varied greedy text (`_vivid`); m: a smaller one."""
    from duetlm.models import save_pretrained, tiny_model

    root = tmp_path_factory.mktemp("trainer-vllm")
    large = tiny_model(tiny_tokenizer, arch="qwen3", hidden_size=64, num_layers=2, num_heads=2, seed=15)
    small = tiny_model(tiny_tokenizer, arch="qwen3", hidden_size=32, num_layers=2, num_heads=1, seed=2)
    return (
        save_pretrained(_vivid(large, seed=15), tiny_tokenizer, root / "large"),
        save_pretrained(small, tiny_tokenizer, root / "small"),
    )


def _greedy_check(policy, prompts: list[str]) -> list:
    """vLLM's greedy output against the HF training copy's: same tokens, same log-probs."""
    from duetlm.engines.hf import HFEngine

    sp = SamplingParams(temperature=0.0, max_new_tokens=16, logprobs=True)
    ours, ref = (
        policy.engine.generate(prompts, sp),
        HFEngine(policy.model, policy.tokenizer).generate(prompts, sp),
    )
    for (v,), (h,) in zip(ours, ref, strict=True):
        assert v.token_ids == h.token_ids
        assert _max_diff(v.logprobs, h.logprobs) < TINY_LOGPROB_TOL
    return ours


@pytest.mark.vllm
def test_duet_run_with_vllm_rollouts_pushes_weights_and_resumes(tmp_path, vllm_models):
    _require_vllm()
    from duetlm import protocol
    from duetlm.engines.hf import HFEngine
    from duetlm.engines.vllm import VLLMEngine
    from duetlm.logging_utils import read_jsonl
    from duetlm.models import load_model
    from duetlm.train import DuetTrainer, StepBatch, phases, sequence_logprobs
    from duetlm.train.policy import wrap_lora

    large_dir, small_dir = vllm_models
    cfg = vllm_config(tmp_path, large_dir, small_dir)
    trainer = DuetTrainer(cfg, train_problems=PROBLEMS)
    try:
        result = trainer.train()
        policy = trainer.policies["large"]
        assert isinstance(policy.engine, VLLMEngine)
        assert isinstance(trainer.policies["small"].engine, HFEngine)
        assert result.step == 2
        records = read_jsonl(Path(cfg.run.dir) / "metrics.jsonl")
        assert [r["step"] for r in records] == [1, 2]
        # π_old of M is the training model's own: the ratio at the first update is 1.
        assert abs(records[0]["large/ratio_max"] - 1.0) < 1e-4
        assert all(r["large/skipped"] == 0 and r["large/grad_norm"] > 0 for r in records)

        # It trained: M's weights moved, and vLLM serves the moved weights (greedy output = HF's).
        start, _ = load_model(str(large_dir), dtype="float32", device="cpu")
        moved = {
            k: (v - start.state_dict()[k]).abs().max().item() for k, v in policy.model.state_dict().items()
        }
        assert max(moved.values()) > 1e-3
        prompts = [protocol.large_prompt(policy.tokenizer, p.question) for p in PROBLEMS]
        after = _greedy_check(policy, prompts)
        # Teeth: under the starting weights the same tokens have other log-probs, so the check above
        # could not pass had the weights not been pushed.
        old = HFEngine(start, policy.tokenizer)
        gaps = []
        for (g,) in after:
            ids = torch.tensor([g.prompt_token_ids + g.token_ids])
            with torch.no_grad():
                logits = old.model(input_ids=ids).logits[0, len(g.prompt_token_ids) - 1 : -1]
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(g.token_ids)[:, None]).squeeze(-1)
            gaps.append(_max_diff(g.logprobs, lp.tolist()))
        assert max(gaps) > 100 * TINY_LOGPROB_TOL

        # Sampled rollouts from vLLM are on-policy for the training copy: its log-probs of vLLM's
        # samples are vLLM's own (so π_θ / π_old ≈ 1 even without recomputing π_old).
        ro = trainer.cfg.rollout
        roll = phases.rollout(trainer.pipeline, StepBatch(PROBLEMS[:2], 3, trainer.cfg.seed), ro.large, ro.n)
        mine = sequence_logprobs(policy.model, roll.large, policy.pad_id, policy.spec)
        assert roll.large.old_logprobs is not None
        assert (
            max(_max_diff(a.tolist(), b.tolist()) for a, b in zip(roll.large.old_logprobs, mine, strict=True))
            < 1e-4
        )

        # LoRA: the push merges the adapter (vLLM takes plain checkpoint names), on the same engine.
        base, _ = load_model(str(large_dir), dtype="float32", device="cpu")
        adapted = wrap_lora(base, trainer.cfg.lora, policy.cfg.gradient_checkpointing, None)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in adapted.named_parameters():
                if "lora_B" in name:  # B = 0 at init would make the adapter a no-op
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        lora_policy = replace(policy, model=adapted)
        assert lora_policy.is_lora
        lora_policy.push_weights()
        with_lora = _greedy_check(lora_policy, prompts)
        assert [g[0].token_ids for g in with_lora] != [g[0].token_ids for g in after]
    finally:
        trainer.close()

    # Resume: the new engine starts from the checkpoint's weights, not from large.path.
    resumed = DuetTrainer(
        vllm_config(tmp_path, large_dir, small_dir, run={"steps": 3}), train_problems=PROBLEMS
    )
    try:
        checkpoint = resumed.resolve_resume("auto")
        assert checkpoint is not None
        resumed.setup(checkpoint)
        assert resumed.step == 2
        again = _greedy_check(resumed.policies["large"], prompts)
        assert [g[0].token_ids for g in again] == [g[0].token_ids for g in after]
    finally:
        resumed.close()
