"""Data-parallel DUET (gloo on CPU): 2 processes train like 1 process on the same global batch.

The 2-process run goes through the real launcher (`torchrun -m duetlm.cli train`). What must be equal:
- the generations: each generation call covers `rollout.generation_block` prompts and is seeded by its
  place in the global batch, so the samples do not depend on the number of processes; hence every
  count-based metric (tokens, successes, rewards, λ) is equal exactly;
- advantages, λ and the metrics: computed from per-sample tensors gathered in global order;
- the update: the global mini-batches (here 2 per step, so the shuffle is global), the global token
  normalisers, DDP's gradient average times the world size. What differs is only floating-point
  summation order (each rank sums its own micro-batches, then the all-reduce sums the ranks), so the
  final weights agree to FLOAT_TOL, not bit for bit.
A checkpoint written by the 2-process run resumes in 1 process and lands on the 1-process result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from duetlm.checkpoint import latest_checkpoint, load_state
from duetlm.config import ConfigError, TrainConfig, build_config
from duetlm.distributed import generation_blocks, local_minibatches, micro_batch_plan, shard_bounds
from duetlm.logging_utils import read_jsonl
from duetlm.problems import Problem
from duetlm.train import DuetTrainer

PROBLEMS = [
    Problem(id=f"d{i}", question=f"What is {a} + {b}?", answer=str(a + b), source="test")
    for i, (a, b) in enumerate([(2, 3), (7, 6), (10, 4), (9, 9), (12, 4), (5, 5), (100, 1), (8, 13)])
]
TIMING = ("time/", "throughput/")  # wall-clock metrics

# Weights of the 1-process and the 2-process run after 3 steps (lr 1e-3, AdamW): all but a few in 10^3
# agree to CLOSE; none differs by more than FLOAT_TOL (1% of one AdamW step). Summation order alone does
# this: AdamW divides each gradient by its own running scale, so an element whose gradient is ~0 turns
# float noise into a visible move. A wrong normaliser, scale or sample moves most weights by ~lr.
CLOSE, FLOAT_TOL, OUTLIERS = 1e-7, 1e-5, 1e-3
# Metrics that come from the update's floating-point sums (loss, grad norm, ...), compared relatively.
UPDATE_KEYS = ("large/", "small/")


def config(tmp_path: Path, large: Path, small: Path, name: str, **run) -> TrainConfig:
    data = {
        "mode": "duet",
        "seed": 5,
        "large": {"path": str(large), "device": "cpu"},
        "small": {"path": str(small), "device": "cpu"},
        "data": {"source": str(tmp_path / "problems.jsonl"), "val_size": 2},
        "rollout": {
            "batch_size": 4,
            "n": 2,
            "n_small": 2,
            "generation_block": 2,
            "large": {"max_new_tokens": 40},  # long enough that some rollouts stop early
            "small": {"max_new_tokens": 6},
        },
        # λ_0 > 0, so M's rewards differ by length from the first step. No KL term: it would add the
        # float noise of two forward passes (engine vs reference) to rewards that otherwise tie exactly.
        "objective": {
            "budget": 16,
            "kl_coef": 0.0,
            "lambda_init": 0.5,
            "lambda_step_size": 0.1,
            "mu_baseline": "per_rollout",
        },
        "grpo": {"advantage": "batch"},  # centred per group, scaled by the std of the whole batch
        "optim": {"lr_large": 1e-3, "lr_small": 1e-3, "micro_batch_size": 3, "mini_batches": 2},
        "run": {
            "steps": 3,
            "dir": str(tmp_path / name),
            "save_every": 1,
            "keep_last": 3,
            "grading_workers": 1,
            "threads": 1,
            **run,
        },
        "logging": {"tensorboard": False, "progress": "off", "sample_every": 0, "val_every": 3},
    }
    return build_config(TrainConfig, data)


def write_problems(path: Path) -> None:
    path.write_text(
        "".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n" for p in PROBLEMS)
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def launch(
    cfg: TrainConfig, tmp_path: Path, name: str, nproc: int = 2, *extra: str, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = dict(
        os.environ, OMP_NUM_THREADS="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false"
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # a rendezvous on a free local port
        "--nproc_per_node",
        str(nproc),
        "-m",
        "duetlm.cli",
        "train",
        "--config",
        str(path),
        *extra,
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert (r.returncode == 0) == ok, r.stderr[-4000:]
    return r


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key.startswith(TIMING):
                continue
            if key.startswith(UPDATE_KEYS):
                assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (ra["step"], key)
            else:  # sampled tokens, grades, rewards, λ, advantages: exactly equal
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["step"], key)


def assert_close_weights(a: Path, b: Path) -> None:
    for role in ("large", "small"):
        wa, wb = weights(a / role), weights(b / role)
        assert wa.keys() == wb.keys()
        diff = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
        assert diff.max().item() <= FLOAT_TOL, (role, diff.max().item())
        assert (diff > CLOSE).float().mean().item() <= OUTLIERS, (role, (diff > CLOSE).sum().item())


def test_two_processes_train_like_one(tmp_path, tiny_dir, tiny_llama_dir):
    write_problems(tmp_path / "problems.jsonl")
    one = config(tmp_path, tiny_dir, tiny_llama_dir, "one")
    ref = DuetTrainer(one).train()
    two = launch(config(tmp_path, tiny_dir, tiny_llama_dir, "two"), tmp_path, "two")
    assert two.stdout.count("checkpoint ") == 1, two.stdout  # rank 0 reports, once

    a, b = read_jsonl(tmp_path / "one" / "metrics.jsonl"), read_jsonl(tmp_path / "two" / "metrics.jsonl")
    assert_same_run(a, b)
    lam = [r["lambda/next"] for r in a]
    assert lam == [r["lambda/next"] for r in b] and lam[-1] > 0  # the same λ trajectory, and it moved
    assert a[0]["large/approx_kl"] != 0 or a[0]["large/loss"] != 0  # the updates did something
    assert "val/accuracy" in b[-1]  # validation sharded over the ranks and gathered
    start = weights(tiny_dir)
    assert any(not torch.equal(start[k], v) for k, v in weights(ref.checkpoint / "large").items())
    assert_close_weights(ref.checkpoint, latest_checkpoint(tmp_path / "two"))
    # One writer: the run directory has one metrics line per step, and the checkpoint is complete.
    assert load_state(latest_checkpoint(tmp_path / "two"))["step"] == 3

    # Resumable at another world size: the 2-process checkpoint of step 2, continued by 1 process.
    two_at_2 = tmp_path / "two" / "checkpoints" / "step_000002"
    resumed = DuetTrainer(config(tmp_path, tiny_dir, tiny_llama_dir, "resumed")).train(resume=str(two_at_2))
    assert resumed.step == 3
    assert_same_run(a[2:], read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
    assert_close_weights(ref.checkpoint, resumed.checkpoint)
    shutil.rmtree(tmp_path / "two" / "checkpoints")

    # FSDP2 (parameters, gradients and AdamW states sharded over the 2 ranks): the same run again.
    launch(
        config(tmp_path, tiny_dir, tiny_llama_dir, "fsdp"),
        tmp_path,
        "fsdp",
        2,
        "--set",
        "distributed.strategy=fsdp",
    )
    assert_same_run(a, read_jsonl(tmp_path / "fsdp" / "metrics.jsonl"))
    # Launched again on a run directory with checkpoints and no --resume: every rank refuses, one says so.
    again = launch(config(tmp_path, tiny_dir, tiny_llama_dir, "fsdp"), tmp_path, "fsdp-again", 2, ok=False)
    assert again.stderr.count("error: run directory") == 1, again.stderr[-4000:]
    assert_close_weights(ref.checkpoint, latest_checkpoint(tmp_path / "fsdp"))
    # Its checkpoint holds whole weights and whole AdamW states: 1 process continues it.
    fsdp_at_2 = tmp_path / "fsdp" / "checkpoints" / "step_000002"
    again = DuetTrainer(config(tmp_path, tiny_dir, tiny_llama_dir, "again")).train(resume=str(fsdp_at_2))
    assert_same_run(a[2:], read_jsonl(tmp_path / "again" / "metrics.jsonl"))
    assert_close_weights(ref.checkpoint, again.checkpoint)


# --------------------------------------------------------------------------------------------------
# The sharding rules, without processes


def test_shards_blocks_and_minibatches():
    assert [shard_bounds(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the 4 processes"):
        shard_bounds(6, 0, 4)
    # Blocks are aligned in the global batch: the same calls at 1 and at 2 processes.
    assert generation_blocks(0, 8, 2) == generation_blocks(0, 4, 2) + generation_blocks(4, 8, 2)
    assert generation_blocks(4, 8, None) == [(4, 8)]
    # Each global mini-batch is the union of the ranks' parts, in the same order.
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    one = local_minibatches(order, 3, 0, 8)
    parts = [local_minibatches(order, 3, lo, lo + 4) for lo in (0, 4)]
    assert one == [[5, 2, 7], [0, 3, 6], [1, 4]]
    assert parts == [[[2], [0, 3], [1]], [[1, 3], [2], [0]]]  # local indices (rank 1: global − 4)
    # Every rank runs as many micro-batches as the rank with the largest part.
    assert micro_batch_plan(1, 2, 1) == (1, 1) and micro_batch_plan(0, 3, 2) == (0, 2)
    assert micro_batch_plan(2, 2, 4) == (1, 0)


def test_generation_block_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="generation_block=3 must divide rollout.batch_size=4"):
        build_config(
            TrainConfig,
            {
                "large": {"path": "x"},
                "small": {"path": "y"},
                "data": {"source": "z"},
                "rollout": {"batch_size": 4, "generation_block": 3},
            },
        )
