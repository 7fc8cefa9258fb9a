"""Checkpoint directories: atomic commit, newest-complete lookup, pruning, RNG state round trip."""

from __future__ import annotations

import random

import numpy as np
import torch

from duetlm import checkpoint as ckpt


def fake_checkpoint(run_dir, step, keep_last=10):
    tmp = ckpt.begin_checkpoint(run_dir, step)
    (tmp / "payload").write_text(str(step))
    return ckpt.commit_checkpoint(tmp, step, keep_last)


def test_only_complete_checkpoints_count(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 10)
    # A crash mid-write leaves a temporary directory; one without COMPLETE is never picked either.
    crashed = ckpt.begin_checkpoint(tmp_path, 12)
    (crashed / "payload").write_text("half")
    (ckpt.checkpoints_dir(tmp_path) / "step_000011").mkdir()
    latest = ckpt.latest_checkpoint(tmp_path)
    assert latest.name == "step_000010" and (latest / "payload").read_text() == "10"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 10]
    assert ckpt.remove_partial(tmp_path) == [crashed] and not crashed.exists()


def test_keep_last_prunes_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in ckpt.checkpoints_dir(tmp_path).iterdir()) == ["step_000003", "step_000004"]


def test_keep_steps_survive_pruning(tmp_path):
    """The paper's evaluation steps (50/100/150) with save_every 10 and keep_last 3: without
    keep_steps, steps 50 and 100 would be deleted long before the run ends."""
    for step in range(10, 160, 10):
        tmp = ckpt.begin_checkpoint(tmp_path, step)
        ckpt.commit_checkpoint(tmp, step, keep_last=3, keep_steps=[50, 100, 150])
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [50, 100, 130, 140, 150]


def test_paper_configs_keep_the_evaluated_steps():
    from pathlib import Path

    from duetlm.config import TrainConfig, load_config

    for path in sorted(Path("configs/paper").glob("*.yaml")):
        cfg = load_config(TrainConfig, path)
        assert {50, 100, 150} <= set(cfg.run.keep_steps), path
        assert all(s % cfg.run.save_every == 0 for s in (50, 100, 150)), path  # each is saved at all


def test_same_step_saved_twice_replaces_it(tmp_path):
    fake_checkpoint(tmp_path, 5)
    tmp = ckpt.begin_checkpoint(tmp_path, 5)
    (tmp / "payload").write_text("again")
    final = ckpt.commit_checkpoint(tmp, 5, keep_last=3)
    assert (final / "payload").read_text() == "again" and len(ckpt.list_checkpoints(tmp_path)) == 1


def test_rng_states_round_trip_through_a_weights_only_load(tmp_path):
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.save_state(tmp_path, {"rng": ckpt.rng_state(), "step": 3})
    expected = (random.random(), np.random.rand(), torch.rand(3).tolist())
    random.random(), np.random.rand(), torch.rand(5)  # move every stream on
    state = ckpt.load_state(tmp_path)
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(3).tolist()) == expected and state["step"] == 3
