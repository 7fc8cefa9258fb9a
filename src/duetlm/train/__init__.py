"""Training: DUET and its trained baselines with GRPO (algorithm.md §2-§5).

The trainer only orchestrates; the math is elsewhere (rewards and λ: `objective.py`; advantages,
log-probs, the PPO-clip loss, KL: `grpo.py`; r(x, y): `grading.py`; prompts and signals: `protocol.py`
through `pipeline.py`; the names of modes, schedules and groups: `modes.py`). The rooms, bottom up:

    records   the typed records one step passes from phase to phase (Samples, Rollout, Rewards, ...)
    streams   reproducible streams: seeds from (seed, step, role), data order, the step's batch
    control   phase timers, stop requests (SIGTERM / SIGINT), TrainingError
    update    log-prob passes and one PPO-clip epoch (`policy_update`)
    policy    a model with its tokenizer, engine, optimizer (LoRA, DDP / FSDP, HF or vLLM rollouts)
    state     run state (step, data cursor, λ) and checkpoints
    metrics   a step's metrics and sample tables
    phases    the step's phases as functions with explicit inputs
    loop      `DuetTrainer` (set-up, `train`, `train_step`) and `run_training`

Modes (`modes.MODES`): `duet`; `single` (M alone, reward r − λL/B); `thinkprune`; `lgrpo`.
Schedules (`modes.SCHEDULES`): `joint` (both models every step, m first: the reference), `alternate`
(M on odd steps, m on even ones), `frozen_small` (the paper's "Fix m" ablation).

π_old. With one PPO epoch and the HF engine, π_old is the engine's per-token log-prob of each sampled
token (the untempered policy, the distribution the update evaluates), so no extra forward pass is
spent. `grpo.recompute_old_logprobs: true` asks for π_old in the update's own precision; with one
mini-batch that is the update's forward pass itself, detached; only M's β·KL term, which needs π_old
before the update, and several mini-batches run the `old_logprobs` pass. vLLM rollouts always
recompute it with the training model, so the PPO ratio compares that model with itself.
"""

from duetlm.train.control import PhaseTimer, StepAborted, StopRequest, TrainingError
from duetlm.train.loop import DuetTrainer, load_data, run_training
from duetlm.train.policy import Policy
from duetlm.train.records import (
    Advantages,
    Grades,
    Rewards,
    Rollout,
    Samples,
    SmallRollout,
    StepOutcome,
    TrainResult,
    UpdateStats,
)
from duetlm.train.streams import StepBatch, batch_indices, derive_seed, epoch_order, split_holdout
from duetlm.train.update import RowShard, UpdateSpec, micro_logprobs, policy_update, sequence_logprobs

__all__ = [
    "Advantages",
    "DuetTrainer",
    "Grades",
    "PhaseTimer",
    "Policy",
    "Rewards",
    "Rollout",
    "RowShard",
    "Samples",
    "SmallRollout",
    "StepAborted",
    "StepBatch",
    "StepOutcome",
    "StopRequest",
    "TrainResult",
    "TrainingError",
    "UpdateSpec",
    "UpdateStats",
    "batch_indices",
    "derive_seed",
    "epoch_order",
    "load_data",
    "micro_logprobs",
    "policy_update",
    "run_training",
    "sequence_logprobs",
    "split_holdout",
]
