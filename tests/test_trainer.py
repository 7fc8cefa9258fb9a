"""DuetTrainer end to end on tiny real models (CPU): every mode and schedule, checkpoints and exact
resume after SIGKILL, SIGTERM, LoRA, guard rails, fail-fast configs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import arithmetic_problems, tiny_train_config
from duetlm.checkpoint import COMPLETE, latest_checkpoint, load_state
from duetlm.config import ConfigError, TrainConfig, load_config
from duetlm.engines.base import Generation, SamplingParams
from duetlm.errors import DataError, DuetError, ModelLoadError
from duetlm.grading import grade
from duetlm.logging_utils import read_jsonl
from duetlm.pipeline import DuetPipeline
from duetlm.problems import Problem, load_source, register_source
from duetlm.protocol import extract_signal
from duetlm.train import (
    DuetTrainer,
    Rollout,
    Samples,
    SmallRollout,
    StepBatch,
    StepOutcome,
    TrainingError,
    UpdateSpec,
    batch_indices,
    epoch_order,
    phases,
    policy_update,
    split_holdout,
)

REPO = Path(__file__).resolve().parents[1]

PROBLEMS = arithmetic_problems(10, prefix="t")

# Keys whose values are wall-clock measurements (everything else must be reproducible).
TIMING = ("time/", "throughput/")


def write_problems(path: Path, problems: list[Problem] = PROBLEMS) -> Path:
    path.write_text(
        "".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n" for p in problems)
    )
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def metrics_of(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def reproducible(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in records]


# --------------------------------------------------------------------------------------------------
# Every mode and schedule, end to end


@pytest.mark.parametrize(
    ("mode", "schedule"),
    [
        ("duet", "joint"),
        ("duet", "alternate"),
        ("duet", "frozen_small"),
        ("single", "joint"),
        ("thinkprune", "joint"),
        ("lgrpo", "joint"),
    ],
)
def test_mode_and_schedule_run_end_to_end(tmp_path, tiny_dir, tiny_llama_dir, mode, schedule):
    cfg = tiny_train_config(
        tmp_path,
        tiny_dir,
        tiny_llama_dir,
        mode=mode,
        schedule=schedule,
        objective={"thinkprune_start": 6, "thinkprune_step": 2, "thinkprune_every": 1, "thinkprune_floor": 2},
    )
    result = DuetTrainer(cfg, train_problems=PROBLEMS).train()
    assert result.step == 2 and result.stop_signum is None
    records = metrics_of(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert all(isinstance(v, float) and v == v for k, v in r.items() if k != "step"), r
        assert 1 <= r["tokens/large_mean"] <= 8
    ckpt = result.checkpoint
    assert ckpt == result.run_dir / "checkpoints" / "step_000002" and (ckpt / COMPLETE).is_file()
    start_large = weights(tiny_dir)
    assert any(not torch.equal(start_large[k], v) for k, v in weights(ckpt / "large").items())
    updated = [({"large", "small"} & {k.split("/")[0] for k in r}) for r in records]
    if mode != "duet":
        assert not (ckpt / "small").exists()
        assert all(u == {"large"} for u in updated) and "success/large" in records[0]
    elif schedule == "joint":
        assert updated == [{"large", "small"}] * 2
    elif schedule == "alternate":
        assert updated == [{"large"}, {"small"}]  # M on odd steps, m on even steps
    else:  # frozen_small: m never changes
        assert updated == [{"large"}] * 2
        start_small = weights(tiny_llama_dir)
        assert all(torch.equal(start_small[k], v) for k, v in weights(ckpt / "small").items())
    for r, models in zip(records, updated, strict=True):
        for role in models:  # π_old from the engine matches the update's own forward pass: ratio 1
            assert abs(r[f"{role}/ratio_max"] - 1) < 1e-4, (role, r)
    if mode in ("duet", "single"):  # λ follows the dual ascent: λ_1 = clip(0 + 0.1 (L/4 − 1))
        first = records[0]
        expected = min(max(0.1 * (first["length/penalised_mean"] / 4 - 1), 0.0), 1.0)
        assert first["lambda"] == 0.0 and first["lambda/next"] == pytest.approx(expected)
        assert records[1]["lambda"] == first["lambda/next"]
    if mode == "thinkprune":
        assert [r["thinkprune/limit"] for r in records] == [6.0, 4.0]
        # M decodes within the limit (App. D), not to max_new_tokens (8) with the excess zeroed
        assert [r["tokens/large_max"] <= r["thinkprune/limit"] for r in records] == [True, True]
    samples = read_jsonl(result.run_dir / "samples.jsonl")
    assert [s["step"] for s in samples] == [1, 2] and {"question", "signal", "answer", "reward"} <= set(
        samples[0]["rows"][0]
    )


def test_golden_tiny_run(tmp_path, tiny_dir, tiny_llama_dir):
    """Pinned per-step metrics of a seeded tiny DUET run: a silent change anywhere on the training path
    (prompts, engine, grading, rewards, advantages, loss, optimizer, data order) shows here. Step 1 has
    one lucky correct answer of m (1 of 8), so both updates see non-zero advantages."""
    result = DuetTrainer(
        tiny_train_config(tmp_path, tiny_dir, tiny_llama_dir), train_problems=PROBLEMS
    ).train()
    got = metrics_of(result.run_dir)
    pinned = [
        {"tokens/generated": 125.0, "success/guided": 0.125, "success/unguided": 0.0, "lambda/next": 0.1},
        {"tokens/generated": 128.0, "success/guided": 0.0, "success/unguided": 0.0, "lambda/next": 0.2},
    ]
    for record, expected in zip(got, pinned, strict=True):
        assert {k: record[k] for k in expected} == pytest.approx(expected, abs=1e-9)
    assert got[0]["reward/large"] == pytest.approx(0.125, abs=1e-6)
    assert got[1]["reward/large"] == pytest.approx(-0.2, abs=1e-6)  # s = b = 0, λ L / B = 0.1 · 8 / 4
    assert got[0]["large/grad_norm"] == pytest.approx(1.27154, rel=1e-4)
    assert got[0]["small/grad_norm"] == pytest.approx(0.43135, rel=1e-4)


def test_checkpoint_is_a_normal_hf_directory_and_restores_state(tmp_path, tiny_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tiny_train_config(tmp_path, tiny_dir, tiny_llama_dir, logging={"val_every": 2, "tensorboard": True})
    trainer = DuetTrainer(cfg, train_problems=PROBLEMS[:6], val_problems=PROBLEMS[6:])
    result = trainer.train()
    ckpt = result.checkpoint
    for role in ("large", "small"):
        model = AutoModelForCausalLM.from_pretrained(ckpt / role)
        AutoTokenizer.from_pretrained(ckpt / role)
        live = trainer.policies[role].model.state_dict()
        assert all(torch.equal(live[k], v) for k, v in model.state_dict().items())
    assert (ckpt / "config.yaml").is_file() and (result.run_dir / "config.yaml").is_file()
    assert list((result.run_dir / "tb").glob("events.out.tfevents.*"))
    records = metrics_of(result.run_dir)
    assert "val/accuracy" not in records[0]
    # Validation is the pipeline's greedy M → z → m on the checkpoint's weights, graded as eval grades.
    pipe = DuetPipeline(
        trainer.policies["large"].engine,
        trainer.policies["small"].engine,
        SamplingParams(temperature=0.0, max_new_tokens=8),
        SamplingParams(temperature=0.0, max_new_tokens=6),
    )
    results = pipe.run([p.question for p in PROBLEMS[6:]])
    assert (
        records[1]["val/accuracy"]
        == sum(grade(r.answer, p) for r, p in zip(results, PROBLEMS[6:], strict=True)) / 4
    )
    assert records[1]["val/large_tokens"] == sum(r.large_tokens for r in results) / 4 >= 1

    # A new trainer resuming from the checkpoint has the same λ, step, data cursor, optimizer state.
    resumed = DuetTrainer(cfg, train_problems=PROBLEMS[:6], val_problems=PROBLEMS[6:])
    resumed.setup(latest_checkpoint(result.run_dir))
    assert resumed.step == 2 and resumed.cursor == 4
    assert resumed.lam.value == records[-1]["lambda/next"] == trainer.lam.value > 0
    assert resumed.lam.num_updates == 2
    for role in ("large", "small"):
        a = trainer.policies[role].optimizer.state_dict()["state"]
        b = resumed.policies[role].optimizer.state_dict()["state"]
        assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg"], b[i]["exp_avg"]) for i in a)
    # Without --resume, an existing run directory is not silently overwritten.
    with pytest.raises(DuetError, match="--resume auto"):
        DuetTrainer(cfg, train_problems=PROBLEMS).train()


def test_lora_gradient_checkpointing_reference_kl_and_accumulation(tmp_path, tiny_dir, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    cfg = tiny_train_config(
        tmp_path,
        tiny_dir,
        tiny_llama_dir,
        large={"lora": True, "gradient_checkpointing": True},
        lora={"r": 4, "alpha": 8},
        objective={"kl_coef": 0.01, "mu_baseline": "per_prompt"},
        grpo={"recompute_old_logprobs": True},
        optim={"micro_batch_size": 1, "mini_batches": 2, "lr_large": 1e-2, "autocast": "bf16"},
        run={"steps": 1},
    )
    trainer = DuetTrainer(cfg, train_problems=PROBLEMS)
    result = trainer.train()
    (record,) = metrics_of(result.run_dir)
    assert "kl/reference" in record and record["large/skipped"] == 0.0
    ckpt = result.checkpoint
    assert (ckpt / "large_adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "large")  # merged: no peft needed
    start = weights(tiny_dir)
    assert any(not torch.equal(start[k], v) for k, v in merged.state_dict().items() if k in start)
    # Resuming loads the base weights plus the saved adapter.
    resumed = DuetTrainer(cfg, train_problems=PROBLEMS)
    resumed.setup(ckpt)
    live = trainer.policies["large"].model.state_dict()
    again = resumed.policies["large"].model.state_dict()
    assert live.keys() == again.keys() and all(torch.equal(live[k], again[k]) for k in live)


def test_kl_loss_term_pulls_m_towards_its_reference(tmp_path, tiny_dir, tiny_llama_dir):
    """`objective.kl_loss_coef` (k3 in M's loss): a frozen reference is loaded (kl_coef 0), the term is
    0 at step 1 (π = π_ref, its gradient too, so step 1 equals the run without it) and > 0 after, and
    it changes the weights from step 2 on."""

    def run(coef: float, steps: int, where: str) -> tuple[DuetTrainer, list[dict]]:
        cfg = tiny_train_config(
            tmp_path / where,
            tiny_dir,
            tiny_llama_dir,
            objective={"kl_loss_coef": coef},
            optim={"lr_large": 1e-2},
            run={"steps": steps, "save_every": 0},
        )
        trainer = DuetTrainer(cfg, train_problems=PROBLEMS)
        result = trainer.train()
        return trainer, metrics_of(result.run_dir)

    with_kl, records = run(1.0, 2, "kl")
    assert with_kl.reference is not None
    assert records[0]["large/kl_loss"] == pytest.approx(0.0, abs=1e-6) and records[1]["large/kl_loss"] > 0
    plain1, _ = run(0.0, 1, "plain1")
    kl1, _ = run(1.0, 1, "kl1")
    w_plain, w_kl = plain1.policies["large"].model.state_dict(), kl1.policies["large"].model.state_dict()
    assert all(torch.allclose(w_plain[k], w_kl[k], atol=1e-6) for k in w_plain)  # step 1: no pull yet
    plain2, _ = run(0.0, 2, "plain2")
    w2, wk2 = plain2.policies["large"].model.state_dict(), with_kl.policies["large"].model.state_dict()
    assert any(not torch.allclose(w2[k], wk2[k], atol=1e-7) for k in w2)


# --------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL, and SIGTERM, through the real CLI


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "duetlm.cli", *args]


def cli_env() -> dict[str, str]:
    return dict(os.environ, TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")


def write_config(tmp_path: Path, large: Path, small: Path, name: str, **run) -> Path:
    cfg = tiny_train_config(tmp_path, large, small, run={"dir": str(tmp_path / name), **run})
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    return path


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the trainer")
        time.sleep(0.02)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, tiny_dir, tiny_llama_dir):
    write_problems(tmp_path / "problems.jsonl")
    straight = write_config(tmp_path, tiny_dir, tiny_llama_dir, "straight", steps=4, save_every=2)
    killed = write_config(tmp_path, tiny_dir, tiny_llama_dir, "killed", steps=4, save_every=2)
    env = cli_env()
    ref = subprocess.Popen(
        cli("train", "--config", str(straight)), env=env, stderr=subprocess.PIPE, text=True
    )
    proc = subprocess.Popen(cli("train", "--config", str(killed)), env=env, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "killed"
    wait_for(lambda: (run / "checkpoints" / "step_000002" / COMPLETE).exists(), proc)
    proc.send_signal(signal.SIGKILL)  # somewhere in step 3
    proc.wait()
    assert latest_checkpoint(run).name == "step_000002"
    resumed = subprocess.run(
        cli("train", "--config", str(killed), "--resume", "auto"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    a, b = metrics_of(tmp_path / "straight"), metrics_of(run)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert reproducible(a) == reproducible(b)
    assert a[-1]["lambda/next"] > 0  # λ moved, so its restore was tested
    final_a = latest_checkpoint(tmp_path / "straight")
    final_b = latest_checkpoint(run)
    for role in ("large", "small"):
        wa, wb = weights(final_a / role), weights(final_b / role)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert load_state(final_a)["lambda"] == load_state(final_b)["lambda"]


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path, tiny_dir, tiny_llama_dir):
    write_problems(tmp_path / "problems.jsonl")
    config = write_config(tmp_path, tiny_dir, tiny_llama_dir, "term", steps=1000, save_every=0)
    run = tmp_path / "term"
    proc = subprocess.Popen(
        cli("train", "--config", str(config)), env=cli_env(), stderr=subprocess.PIPE, text=True
    )
    wait_for(
        lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1,
        proc,
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    ckpt = latest_checkpoint(run)
    assert ckpt is not None
    state = load_state(ckpt)
    assert ckpt.name == f"step_{state['step']:06d}" and state["step"] >= 1
    assert len(metrics_of(run)) == state["step"]  # the abandoned step left no trace


# --------------------------------------------------------------------------------------------------
# Guard rails


def test_empty_signal_is_valid_and_tied_rewards_give_zero_advantages(tmp_path, tiny_dir, tiny_llama_dir):
    cfg = tiny_train_config(tmp_path, tiny_dir, tiny_llama_dir, objective={"mu_baseline": "per_prompt"})
    trainer = DuetTrainer(cfg, train_problems=PROBLEMS)
    trainer.setup()
    tok = trainer.policies["large"].tokenizer
    close = tok.convert_tokens_to_ids("</think>")
    prompt = tok.encode("x", add_special_tokens=False)
    # M closed its thinking at once: the signal is empty (and complete) for every rollout.
    gens = [[Generation(0, [close], "</think>", "stop", prompt, [-0.5]) for _ in range(2)] for _ in range(2)]
    large = Samples.from_generations(gens)
    roll = Rollout(large, [extract_signal("</think>")] * 4, torch.zeros(4))
    assert roll.signals[0].text == "" and roll.signals[0].complete
    batch = StepBatch(PROBLEMS[:2], step=1, seed=cfg.seed)
    ro, mu = cfg.rollout, cfg.objective.mu_baseline
    small = SmallRollout(
        phases.guided(trainer.pipeline, batch, roll, ro.small, ro.n_small),
        phases.unguided(trainer.pipeline, batch, roll, ro.small, ro.n_small, mu),
    )
    assert len(small.guided) == 4 * 2 and len(small.unguided) == 2 * 2
    grading = phases.Grading(workers=1)
    parts = {
        part: grading.submit(*phases.grade_inputs(part, batch.problems, roll, small, mu))
        for part in ("guided", "unguided")
    }
    grades = phases.Grading.collect(parts)
    grading.close()
    rewards = phases.rewards(cfg.mode, cfg.objective, trainer.lam.value, 1, roll, grades, ro.n_small)
    adv = phases.advantages(cfg.grpo, roll, small, rewards, trainer.dist, batch.lo)
    # Every rollout has the same length and m (random) fails everywhere: all rewards tie.
    assert torch.equal(rewards.large, torch.zeros(4)) and torch.equal(adv.large, torch.zeros(4))
    assert torch.equal(adv.small, torch.zeros(8))


def test_non_finite_loss_skips_the_update(tiny_dir):
    from duetlm.models import load_model

    model, tok = load_model(str(tiny_dir), device="cpu", trainable=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gens = [[Generation(0, [5, 6, 7], "", "stop", [1, 2, 3], [-1.0] * 3)] * 2]
    samples = Samples.from_generations(gens)
    spec = UpdateSpec(4, 1, "token-mean", 0.2, None, 8, 1.0, False, None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = policy_update(
        model, opt, samples, torch.tensor([float("nan"), 1.0]), tok.pad_token_id, spec, seed=0
    )
    assert stats.skipped == 1 and stats.mini_batches == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    stats = policy_update(model, opt, samples, torch.tensor([-1.0, 1.0]), tok.pad_token_id, spec, seed=0)
    assert stats.skipped == 0 and stats.mini_batches == 1
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_dir):
    from duetlm.models import load_model

    lengths = [3, 5, 2, 4]
    gens = [
        [
            Generation(0, list(range(10, 10 + n)), "", "stop", [1, 2, 3 + i], [-2.0] * n)
            for i, n in enumerate(lengths)
        ]
    ]
    samples = Samples.from_generations(gens)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0])
    out = {}
    for micro in (1, 4):
        model, tok = load_model(str(tiny_dir), device="cpu", trainable=True)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        spec = UpdateSpec(micro, 1, "token-mean", 0.2, None, 8, 1e9, False, None)
        policy_update(model, opt, samples, adv, tok.pad_token_id, spec, seed=0)
        out[micro] = model.state_dict()
    assert all(torch.allclose(out[1][k], out[4][k], atol=1e-6) for k in out[1])
    start = load_model(str(tiny_dir), device="cpu")[0].state_dict()
    assert any(not torch.allclose(start[k], out[1][k]) for k in start)


@pytest.mark.parametrize("autocast", [False, True])
def test_shared_prompt_pass_equals_full_sequences(tiny_dir, autocast):
    """Rows of one prompt share its forward pass (KV cache repeated per row): the same log-probs and the
    same gradients as the plain [prompt | response] rows, which match grpo.model_token_logprobs."""
    from duetlm.grpo import model_token_logprobs
    from duetlm.models import load_model
    from duetlm.train import micro_logprobs

    model, tok = load_model(str(tiny_dir), device="cpu", trainable=True)
    pad = tok.pad_token_id
    gens = [  # two prompts of different lengths, 3 and 2 responses of different lengths
        [Generation(0, [9, 8, 7, 6], "", "stop", [1, 2, 3, 4, 5], None) for _ in range(1)]
        + [Generation(0, [11, 12], "", "stop", [1, 2, 3, 4, 5], None)]
        + [Generation(0, [13, 14, 15, 16, 17, 18], "", "length", [1, 2, 3, 4, 5], None)],
        [
            Generation(1, [21, 22, 23], "", "stop", [40, 41], None),
            Generation(1, [24], "", "stop", [40, 41], None),
        ],
    ]
    samples = Samples.from_generations(gens)
    rows = list(range(len(samples)))
    out = {}
    for share in (True, False):
        spec = UpdateSpec(8, 1, "token-mean", 0.2, None, 8, 1.0, autocast, None, share_prompts=share)
        model.zero_grad(set_to_none=True)
        logp, mask, old = micro_logprobs(model, samples, rows, pad, spec)
        (logp * mask).sum().backward()
        out[share] = (logp.detach(), mask, {n: q.grad.clone() for n, q in model.named_parameters()})
    assert old is None and torch.equal(out[True][1], out[False][1])
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[True][0], out[False][0], **tol)
    for name, grad in out[False][2].items():
        if autocast:  # bf16 rounds differently in the two layouts: compare each gradient as a whole
            assert (out[True][2][name] - grad).norm() <= 2e-2 * grad.norm() + 1e-6, name
        else:
            torch.testing.assert_close(out[True][2][name], grad, **tol)
    if not autocast:  # against the reference implementation, one row at a time
        for r, i in enumerate(rows):
            ids = torch.tensor([samples.prompt_ids[i] + samples.token_ids[i]])
            with torch.no_grad():
                ref = model_token_logprobs(model, ids, torch.ones_like(ids))[
                    0, len(samples.prompt_ids[i]) - 1 :
                ]
            torch.testing.assert_close(out[True][0][r][out[True][1][r]], ref, atol=1e-5, rtol=1e-5)


def test_consecutive_bad_updates_stop_the_run(tmp_path, tiny_dir, tiny_llama_dir):
    from duetlm.logging_utils import RunLogger

    cfg = tiny_train_config(tmp_path, tiny_dir, tiny_llama_dir, run={"max_bad_steps": 2})
    trainer = DuetTrainer(cfg, train_problems=PROBLEMS)
    logger = RunLogger(tmp_path / "log", cfg.logging, total_steps=5, start_step=0, config={})
    try:
        for step, bad in enumerate([True, False, True], start=1):
            trainer.step = step
            trainer.finish_step(StepOutcome({"x": 0.0}, bad_update=bad), logger)
        assert trainer.bad_steps == 1
        trainer.step = 4
        with pytest.raises(TrainingError, match="2 steps in a row"):
            trainer.finish_step(StepOutcome({"x": 0.0}, bad_update=True), logger)
    finally:
        logger.close()


# --------------------------------------------------------------------------------------------------
# Data order and sources


def test_data_order_is_a_seeded_permutation_per_epoch():
    order = epoch_order(0, 0, 10)
    assert sorted(order) == list(range(10)) and order == epoch_order(0, 0, 10) != epoch_order(0, 1, 10)
    stream = batch_indices(0, 0, 25, 10)
    assert stream == batch_indices(0, 0, 12, 10) + batch_indices(0, 12, 13, 10)  # a cursor resumes it
    assert sorted(stream[:10]) == sorted(stream[10:20]) == list(range(10))
    train, val = split_holdout(PROBLEMS, 3, seed=0)
    assert len(val) == 3 and len(train) == 7 and not {p.id for p in val} & {p.id for p in train}
    with pytest.raises(DataError, match="val_size"):
        split_holdout(PROBLEMS, 10, seed=0)


def test_registered_source_prefix(tmp_path):
    register_source("unit", lambda name, split, limit: PROBLEMS[: int(name)])
    assert load_source("unit:3") == PROBLEMS[:3]
    with pytest.raises(DataError, match="no problems"):
        load_source("unit:0")


# --------------------------------------------------------------------------------------------------
# Bad input fails before any model loads


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"rollout": {"n": 1}}, "rollout.n must be >= 2"),
        ({"rollout": {"n_small": 1}}, "raise rollout.n_small"),
        ({"mode": "dual"}, "unknown mode 'dual'; valid: duet, single, thinkprune, lgrpo"),
        ({"schedule": "both"}, "unknown schedule 'both'; valid: joint, alternate, frozen_small"),
        ({"grpo": {"advantage": "ppo"}}, "unknown advantage estimator 'ppo'"),
        ({"grpo": {"loss_agg": "sum"}}, "unknown loss_agg 'sum'"),
        ({"objective": {"mu_baseline": "mean"}}, "unknown mu_baseline 'mean'"),
        ({"small": None}, "needs a small model"),
        ({"rollout": {"n_small": 3, "nn": 2}}, "rollout.nn: unknown key"),
    ],
)
def test_bad_config_fails_with_a_clear_message(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        tiny_train_config(tmp_path, tmp_path, tmp_path, **override)


def test_missing_model_and_empty_data_fail_before_loading(tmp_path, tiny_dir):
    cfg = tiny_train_config(tmp_path, tiny_dir, tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        DuetTrainer(cfg, train_problems=PROBLEMS)
    cfg = tiny_train_config(tmp_path, tiny_dir, tiny_dir, data={"source": "unit-empty:x"})
    register_source("unit-empty", lambda name, split, limit: [])
    with pytest.raises(DataError, match="unit-empty:x.*no problems"):
        DuetTrainer(cfg)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")
def test_enabled_but_missing_logger_fails_fast(tmp_path, tiny_dir):
    cfg = tiny_train_config(tmp_path, tiny_dir, tiny_dir, logging={"wandb": True})
    with pytest.raises(ConfigError, match="pip install wandb"):
        DuetTrainer(cfg, train_problems=PROBLEMS)


def test_cli_bad_config_is_one_line(tmp_path, tiny_dir):
    path = tmp_path / "bad.yaml"
    path.write_text(f"large:\n  path: {tiny_dir}\ndata:\n  source: x.jsonl\nrollout:\n  n: 1\n  bogus: 2\n")
    r = subprocess.run(cli("train", "--config", str(path)), env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("error: invalid config")
    assert "rollout.bogus: unknown key" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------------------------------
# The shipped configs


def test_shipped_configs_validate():
    for path in [REPO / "configs" / "tiny.yaml", *sorted((REPO / "configs" / "paper").glob("*.yaml"))]:
        cfg = load_config(TrainConfig, path)
        assert cfg.rollout.n >= 2, path
    assert len(list((REPO / "configs" / "paper").glob("*.yaml"))) >= 3


def test_tiny_config_trains_through_the_cli(tmp_path):
    from duetlm.models import init_tiny

    paths = init_tiny(tmp_path / "models")
    r = subprocess.run(
        cli(
            "train",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--set",
            f"large.path={paths['large']}",
            "--set",
            f"small.path={paths['small']}",
            "--set",
            f"run.dir={tmp_path / 'run'}",
            "--set",
            "run.steps=1",
            "--set",
            "logging.val_every=1",
        ),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "step 1/1" in r.stdout and "val" in r.stdout  # the plain progress line (not a terminal)
    (record,) = metrics_of(tmp_path / "run")
    assert (
        record["val/large_tokens"] >= 1
        and (tmp_path / "run" / "checkpoints" / "step_000001" / COMPLETE).is_file()
    )


# --------------------------------------------------------------------------------------------------
# Training and evaluation grade alike (one M → z → m path)


def _teach_unclosed_answers(model_dir: Path, out: Path, problems: list[Problem]) -> Path:
    """A copy of the tiny M taught (a few seconds of SFT) to answer each problem with `\\boxed{a}`
    and stop, without ever closing its thinking block: its graded answer is its whole response."""
    from duetlm.models import load_model, save_pretrained
    from duetlm.protocol import large_prompt

    torch.manual_seed(0)
    model, tok = load_model(str(model_dir), device="cpu", trainable=True)
    rows = []
    for p in problems:
        prompt = tok.encode(large_prompt(tok, p.question), add_special_tokens=False)
        target = tok.encode(f"\\boxed{{{p.answer}}}", add_special_tokens=False) + [tok.eos_token_id]
        rows.append((torch.tensor([prompt + target]), len(prompt)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        for ids, n in rows:
            labels = ids.clone()
            labels[:, :n] = -100
            model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return save_pretrained(model, tok, out)


def test_single_mode_validation_equals_eval_original_on_unclosed_thinking(tmp_path, tiny_dir):
    """`val/accuracy` of a `single` run = `duetlm eval --methods original` on the same weights and
    decoding, when M's response never closes `</think>` (both grade the whole response; training once
    graded it as empty)."""
    from duetlm.evaluate import make_config, run_eval

    val = PROBLEMS[6:9]
    taught = _teach_unclosed_answers(tiny_dir, tmp_path / "taught", val)
    cfg = tiny_train_config(
        tmp_path,
        taught,
        taught,
        mode="single",
        small=None,
        optim={"lr_large": 1e-9},
        run={"steps": 1},
        logging={"val_every": 1},
    )
    result = DuetTrainer(cfg, train_problems=PROBLEMS[:6], val_problems=val).train()
    (record,) = metrics_of(result.run_dir)
    data = write_problems(tmp_path / "val.jsonl", val)
    # original's budget is M's thinking cap + the answer cap: 6 + 2 = rollout.large.max_new_tokens (8).
    summary = run_eval(
        make_config(
            large=str(result.checkpoint / "large"),
            benchmarks=[str(data)],
            methods=["original"],
            output=str(tmp_path / "eval"),
            max_signal_tokens=6,
            max_answer_tokens=2,
            device="cpu",
        ),
        progress=False,
    )
    (metrics,) = summary.metrics
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").open()]
    assert len(rows) == 3 and not any(r["signal_complete"] for r in rows)  # the block never closes
    assert record["val/accuracy"] == metrics.accuracy > 0.5
    assert record["val/large_tokens"] == metrics.large_tokens


def test_over_long_prompts_are_skipped_and_counted(tmp_path, tiny_dir, tiny_llama_dir):
    """`rollout.max_prompt_tokens`: a problem whose M prompt is longer is never sampled (nor cut),
    and `data/prompts_skipped` counts it in every step's metrics; every training problem too long is
    a clear error."""
    from duetlm.errors import DataError
    from duetlm.problems import Problem

    long = Problem(
        id="long", question="What is " + " + ".join(["1"] * 200) + "?", answer="200", source="test"
    )
    problems = [*PROBLEMS[:3], long]
    probe = DuetTrainer(
        tiny_train_config(tmp_path / "probe", tiny_dir, tiny_llama_dir), train_problems=problems
    )
    probe.setup()
    lengths = [
        probe.pipeline.large.count_tokens(p)
        for p in probe.pipeline.think_prompts([x.question for x in problems])
    ]
    limit = max(lengths[:3])
    assert lengths[3] > limit
    cfg = tiny_train_config(tmp_path, tiny_dir, tiny_llama_dir, rollout={"max_prompt_tokens": limit})
    result = DuetTrainer(cfg, train_problems=problems).train()
    records = metrics_of(result.run_dir)
    assert [r["data/prompts_skipped"] for r in records] == [1.0, 1.0]
    questions = {row["question"] for s in read_jsonl(result.run_dir / "samples.jsonl") for row in s["rows"]}
    assert questions and long.question not in questions
    tight = tiny_train_config(tmp_path / "tight", tiny_dir, tiny_llama_dir, rollout={"max_prompt_tokens": 3})
    with pytest.raises(DataError, match="exceeds rollout.max_prompt_tokens=3"):
        DuetTrainer(tight, train_problems=problems).setup()
