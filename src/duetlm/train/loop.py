"""`DuetTrainer`: set-up, then `train` runs `train_step` (the phases, in order) to `run.steps`.

Reproducibility that survives a restart: every random stream derives from (seed, step, role)
(`streams.py`), and the global python/numpy/torch RNG states go into every checkpoint, so a run killed
with SIGKILL and resumed from its last checkpoint reproduces an uninterrupted run's per-step metrics and
final weights bit for bit on CPU (tests/test_trainer.py kills one to check).

Signals: SIGTERM or SIGINT asks the run to stop. Before the step's first update the step is abandoned
(nothing has changed yet), otherwise it is finished; then a checkpoint is written and `train` returns.
A second SIGINT aborts at once.

Data parallelism (`duetlm.distributed`; docs/distributed.md): under `accelerate launch` / `torchrun`
each process takes a contiguous shard of every step's prompts with all their rollouts and answers, so
GRPO groups stay on one process; advantages, λ and metrics come from per-sample tensors gathered in
global order; the updates draw the global mini-batches with global normalisers through DDP or FSDP2;
rank 0 writes logs and checkpoints.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from duetlm import distributed
from duetlm.config import ConfigError, ModelConfig, TrainConfig, dump_config
from duetlm.distributed import Dist
from duetlm.errors import DataError
from duetlm.modes import MODES, SCHEDULES
from duetlm.objective import LambdaController
from duetlm.pipeline import DuetPipeline
from duetlm.problems import Problem, load_source
from duetlm.train import phases
from duetlm.train.control import PhaseTimer, StepAborted, StopRequest, TrainingError
from duetlm.train.metrics import per_sample, sample_rows, step_metrics, time_metrics
from duetlm.train.policy import Policy, build_policy, check_engines, load_reference, recomputes_old_logprobs
from duetlm.train.records import SmallRollout, StepOutcome, TrainResult, UpdateStats
from duetlm.train.state import RunState, config_changes, resolve_resume, save_checkpoint
from duetlm.train.streams import StepBatch, batch_indices, derive_seed, split_holdout


class DuetTrainer:
    """Train M (and m) with GRPO on the DUET objective or a trained baseline (`modes.MODES`).

    Construction validates everything that can be checked without loading a model: logging backends,
    the data (loaded here; an empty source is an error), each model path, the rollout engines.
    `train()` then loads the models (from a checkpoint when resuming) and runs to `run.steps`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        run_dir: str | Path | None = None,
        train_problems: list[Problem] | None = None,
        val_problems: list[Problem] | None = None,
    ) -> None:
        from duetlm.logging_utils import check_backends
        from duetlm.models import resolve_model_path

        self.cfg = cfg
        self.mode = MODES[cfg.mode]
        self.schedule = SCHEDULES[cfg.schedule]
        self.run_dir = Path(run_dir if run_dir is not None else cfg.run.dir)
        check_backends(cfg.logging)
        self.train_problems, self.val_problems = load_data(cfg, train_problems, val_problems)
        for _, mcfg in self.model_configs():
            resolve_model_path(mcfg.path)  # a missing model fails here, before any model loads
        check_engines(self.model_configs())
        obj = cfg.objective
        lam = LambdaController(
            init=obj.lambda_init,
            step_size=obj.lambda_step_size,
            bound=obj.budget,
            max_value=obj.lambda_max,
            schedule=obj.lambda_schedule,
        )
        self.state = RunState(lam)
        self.stop = StopRequest()
        self.dist = Dist()  # one process until `init_distributed` finds a launcher
        self.grading = phases.Grading(cfg.run.grading_workers)
        self.policies: dict[str, Policy] = {}
        self.reference: torch.nn.Module | None = None
        self.pipeline: DuetPipeline | None = None  # M (and m) once `setup` loaded them
        self.prompts_skipped = 0  # problems over rollout.max_prompt_tokens (`setup`)

    # The run state, as attributes (benchmarks and the demo step the trainer by hand).
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def cursor(self) -> int:
        return self.state.cursor

    @property
    def lam(self) -> LambdaController:
        return self.state.lam

    @property
    def bad_steps(self) -> int:
        return self.state.bad_steps

    def model_configs(self) -> list[tuple[str, ModelConfig]]:
        """(role, config) of each model this mode uses: M, and m in DUET."""
        roles = [("large", self.cfg.large)]
        if self.mode.uses_small:
            assert self.cfg.small is not None  # TrainConfig guarantees it
            roles.append(("small", self.cfg.small))
        return roles

    # -- set-up -------------------------------------------------------------------------------------

    def init_distributed(self) -> Dist:
        """Join the launcher's process group, once (a single process gets a trivial `Dist`)."""
        if not self.dist.enabled and distributed.launched_world_size() > 1:
            from duetlm.models import resolve_device

            cpu = all(resolve_device(m.device) == "cpu" for _, m in self.model_configs())
            self.dist = distributed.init_distributed(self.cfg.distributed.strategy, cpu=cpu)
            lo, hi = self.dist.shard(self.cfg.rollout.batch_size)  # checks divisibility
            block = self.cfg.rollout.generation_block
            if block is not None and (hi - lo) % block:
                raise ConfigError(
                    f"rollout.generation_block={block} must divide the {hi - lo} prompts of each of "
                    f"the {self.dist.world_size} processes (rollout.batch_size={self.cfg.rollout.batch_size})"
                )
        return self.dist

    def setup(self, checkpoint: Path | None = None) -> None:
        """Load the models (from `checkpoint` when resuming), optimizers, λ and RNG states."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the run has its own progress display
        self.init_distributed()
        if self.cfg.run.threads:
            torch.set_num_threads(self.cfg.run.threads)
        seed = self.cfg.seed
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # LoRA's initial adapter weights come from the global stream
        for role, _ in self.model_configs():
            trainable = role == "large" or self.schedule.trains_small
            self.policies[role] = build_policy(role, self.cfg, trainable, checkpoint, self.dist)
        if self.cfg.objective.uses_reference and not self.policies["large"].is_lora:
            self.reference = load_reference(self.cfg, self.dist)
        small = self.policies.get("small")
        self.pipeline = DuetPipeline(self.policies["large"].engine, small.engine if small else None)
        self._skip_long_prompts()
        if checkpoint is not None:
            from duetlm import checkpoint as ckpt

            self.state.load_state_dict(ckpt.load_state(checkpoint), self.policies)

    def _skip_long_prompts(self) -> None:
        """Drop the problems whose M prompt exceeds `rollout.max_prompt_tokens` (deterministic, so a
        resumed run sees the same list); the count goes into every step's metrics."""
        limit = self.cfg.rollout.max_prompt_tokens
        assert self.pipeline is not None
        self.train_problems, long_train = phases.within_prompt_limit(
            self.pipeline, self.train_problems, limit
        )
        self.val_problems, long_val = phases.within_prompt_limit(self.pipeline, self.val_problems, limit)
        self.prompts_skipped = len(long_train) + len(long_val)
        if long_train and not self.train_problems:
            raise DataError(
                f"every training problem's prompt exceeds rollout.max_prompt_tokens={limit} "
                f"(e.g. {long_train[0].id!r}): raise the limit"
            )

    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the completed step (every rank calls it; rank 0 writes)."""
        return save_checkpoint(self.run_dir, self.state, self.policies, self.cfg, self.dist)

    def resolve_resume(self, resume: str | None) -> Path | None:
        """The checkpoint `--resume` names (`None`: a fresh run; `"auto"`: the newest, if any)."""
        return resolve_resume(self.run_dir, resume, self.dist)

    def close(self) -> None:
        """Stop the rollout engines' own processes (vLLM). `train` leaves them running, so the
        engines can still be used after it returns; `run_training` calls this."""
        for policy in self.policies.values():
            policy.close()

    # -- the loop -----------------------------------------------------------------------------------

    def _open_logger(self, start: Path | None) -> Any:
        """The run's logger (rank 0 writes the run directory; the others log nothing)."""
        from duetlm.logging_utils import NullLogger, RunLogger

        if not self.dist.is_main:
            return NullLogger()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.run_dir / "config.yaml")
        logger = RunLogger(
            self.run_dir,
            self.cfg.logging,
            total_steps=self.cfg.run.steps,
            start_step=self.step,
            config=self.cfg.model_dump(mode="json"),
        )
        if self.dist.enabled:
            logger.message(
                f"data parallel: {self.dist.world_size} processes ({self.dist.strategy}), "
                f"{self.cfg.rollout.batch_size // self.dist.world_size} prompts each per step"
            )
        if start is not None:
            logger.message(f"resumed from {start} (step {self.step}, λ = {self.lam.value:.4g})")
            changed = config_changes(start / "config.yaml", self.cfg)
            if changed:
                logger.message("config differs from the checkpoint's: " + ", ".join(changed))
        return logger

    def train(self, resume: str | None = None) -> TrainResult:
        """Run (or resume) training up to `run.steps`; returns where it stopped and why."""
        self.init_distributed()
        start = self.resolve_resume(resume)
        self.setup(start)
        logger = self._open_logger(start)
        saved, saved_step = start, self.step if start is not None else -1
        outcome = None
        self.stop.install()
        try:
            while self.step < self.cfg.run.steps:
                try:
                    outcome = self.train_step(self.step + 1)
                except StepAborted:
                    break
                self.step += 1
                self.finish_step(outcome, logger)
                every = self.cfg.run.save_every
                if (every and self.step % every == 0) or self.step == self.cfg.run.steps:
                    saved, saved_step = self.save_checkpoint(), self.step
                self.stop.agree(self.dist)
                if self.stop.signum is not None:
                    break
            if saved_step != self.step:
                saved, saved_step = self.save_checkpoint(), self.step
            if self.stop.signum is not None:
                logger.message(f"stopped by signal {self.stop.signum}; checkpoint {saved}")
        finally:
            self.stop.restore()
            logger.close()
            self.grading.close()
        last = outcome.metrics if outcome is not None else {}
        return TrainResult(self.run_dir, self.step, saved, self.stop.signum, last)

    def finish_step(self, outcome: StepOutcome, logger: Any) -> None:
        """Validation, logging, sample tables and the NaN guard, after step `self.step`."""
        step, lg = self.step, self.cfg.logging
        if self.val_problems and lg.val_every and (step % lg.val_every == 0 or step == self.cfg.run.steps):
            outcome.metrics.update(self.validate())
        logger.log_step(step, outcome.metrics)
        if lg.sample_every and step % lg.sample_every == 0:
            logger.log_samples(step, outcome.samples)
        self.state.bad_steps = self.bad_steps + 1 if outcome.bad_update else 0
        if outcome.bad_update:
            logger.message(
                f"step {step}: non-finite loss or gradient; update skipped ({self.bad_steps} in a row)"
            )
        if self.bad_steps >= self.cfg.run.max_bad_steps:
            raise TrainingError(
                f"{self.bad_steps} steps in a row had a non-finite loss or gradient (run.max_bad_steps = "
                f"{self.cfg.run.max_bad_steps}); lower the learning rate or check the data"
            )

    def step_batch(self, step: int) -> StepBatch:
        """This process's prompts of `step` (steps count from 1), read at the run's data cursor."""
        cfg = self.cfg
        indices = batch_indices(cfg.seed, self.state.cursor, cfg.rollout.batch_size, len(self.train_problems))
        lo, hi = self.dist.shard(cfg.rollout.batch_size)
        problems = [self.train_problems[i] for i in indices[lo:hi]]
        return StepBatch(problems, step, cfg.seed, lo, cfg.rollout.generation_block)

    def train_step(self, step: int) -> StepOutcome:
        """One step, phase by phase (`phases.py`). With data parallelism this rank runs the phases on
        its shard of the prompts; statistics are computed over all shards."""
        cfg, timer, t0 = self.cfg, PhaseTimer(), time.perf_counter()
        ro, pipe, batch = cfg.rollout, self.pipeline, self.step_batch(step)
        assert pipe is not None, "call setup() (or train()) first"
        grading: dict[str, Future] = {}  # graded on their own thread while the next phases run
        small = SmallRollout()
        with timer("rollout"):
            large = phases.large_rollout_config(cfg.mode, ro.large, cfg.objective, step)
            roll = phases.rollout(pipe, batch, large, ro.n)
        if not self.mode.uses_small:
            grading["large"] = self._grade("large", batch, roll, small)
        self.stop.check(self.dist)
        if self.mode.uses_small:
            with timer("guided"):
                small.guided = phases.guided(pipe, batch, roll, ro.small, ro.n_small)
            grading["guided"] = self._grade("guided", batch, roll, small)
            self.stop.check(self.dist)
            with timer("unguided"):
                small.unguided = phases.unguided(
                    pipe, batch, roll, ro.small, ro.n_small, cfg.objective.mu_baseline
                )
            if small.unguided is not None:
                grading["unguided"] = self._grade("unguided", batch, roll, small)
            self.stop.check(self.dist)
        update_small, update_large = self.schedule.updates(step)
        update_small = update_small and small.guided is not None and self.schedule.trains_small
        self._old_logprobs(timer, roll.large, small.guided if update_small else None, update_large)
        kl = None
        if cfg.objective.kl_coef > 0 or (cfg.objective.kl_loss_coef > 0 and update_large):
            with timer("reference"):
                ref = phases.reference_logprobs(self.policies["large"], self.reference, roll.large)
            if cfg.objective.kl_coef > 0:
                kl = phases.reference_kl(roll.large, ref)
            if cfg.objective.kl_loss_coef > 0:
                roll.large.ref_logprobs = ref  # the update adds kl_loss_coef × k3 to M's loss
        with timer("grade"):
            grades = phases.Grading.collect(grading)
        self.stop.check(self.dist)
        with timer("rewards"):
            rewards = phases.rewards(
                cfg.mode, cfg.objective, self.lam.value, step, roll, grades, ro.n_small, kl
            )
        with timer("advantages"):
            adv = phases.advantages(cfg.grpo, roll, small, rewards, self.dist, batch.lo)
        # From here on the step changes state, so it runs to its end even when a stop is requested.
        stats: dict[str, UpdateStats] = {}
        for role, samples, advantage, due in (
            ("small", small.guided, adv.small, update_small),
            ("large", roll.large, adv.large, update_large),
        ):
            if due:
                with timer(f"update_{role}"):
                    seed = derive_seed(cfg.seed, step, role, "mini-batches")
                    stats[role] = phases.update(self.policies[role], samples, advantage, seed, self.dist)
        per = self.dist.gather_cat(per_sample(roll, small, rewards, adv))  # the global batch
        lam_used = self.lam.value
        with timer("lambda"):
            if self.mode.uses_lambda:
                self.lam.update(float(per["penalised"].mean()))
        self.state.cursor += ro.batch_size
        metrics = step_metrics(per, stats, lam_used, self.lam.value, rewards.limit)
        metrics["data/prompts_skipped"] = float(self.prompts_skipped)
        seconds = {**timer.seconds, "step": time.perf_counter() - t0}
        # The slowest rank's time: the others wait for it at the next collective.
        seconds = dict(zip(seconds, self.dist.all_reduce(list(seconds.values()), "max"), strict=True))
        metrics.update(time_metrics(seconds, metrics["tokens/generated"]))
        rows = sample_rows(batch.problems, roll, small, rewards, ro.n_small, cfg.logging.num_samples)
        return StepOutcome(metrics, rows, bad_update=any(s.skipped for s in stats.values()))

    def _grade(self, part: str, batch: StepBatch, roll: Any, small: SmallRollout) -> Future:
        texts, problems = phases.grade_inputs(
            part, batch.problems, roll, small, self.cfg.objective.mu_baseline
        )
        return self.grading.submit(texts, problems)

    def _old_logprobs(self, timer: PhaseTimer, large: Any, guided: Any, update_large: bool) -> None:
        """π_old by a forward pass for the roles whose engine log-probs will not do."""
        recompute = {role: recomputes_old_logprobs(self.cfg, role) for role in self.policies}
        if not any(recompute.values()):
            return
        samples = {r: s for r, s in (("large", large), ("small", guided)) if recompute.get(r)}
        o = self.cfg
        needed = phases.old_logprobs_needed(
            o.objective.kl_coef, o.optim.mini_batches, update_large, guided is not None
        )
        with timer("old_logprobs"):
            phases.recompute_old(self.policies, samples, needed)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Greedy accuracy and M tokens on the held-out problems (`val/...` metrics)."""
        assert self.pipeline is not None
        ro = self.cfg.rollout
        pipe = replace(
            self.pipeline,
            large_sampling=phases.sampling(ro.large, 1, None, greedy=True),
            small_sampling=phases.sampling(ro.small, 1, None, greedy=True),
        )
        return phases.validate(pipe, self.val_problems, self.cfg.run.grading_workers, self.dist)


def load_data(
    cfg: TrainConfig, train: list[Problem] | None, val: list[Problem] | None
) -> tuple[list[Problem], list[Problem]]:
    """(training, validation) problems: given, or from `data.source` / `data.val_source`, or a seeded
    hold-out of `data.val_size` training problems."""
    data = cfg.data
    if train is None:
        if data.source is None:
            raise ConfigError("data.source is required: a registered name, a data file, or lab:<task>")
        train = load_source(data.source, data.split, data.limit, **data.load_options())
    elif not train:
        raise DataError("train_problems is empty")
    if val is None and data.val_source is not None:
        mirror = {"data_dir": data.data_dir} if data.data_dir else {}
        val = load_source(data.val_source, data.val_split, data.val_size or None, **mirror)
    elif val is None and data.val_size:
        train, val = split_holdout(train, data.val_size, cfg.seed)
    return list(train), list(val or [])


def run_training(
    cfg: TrainConfig,
    resume: str | None = None,
    run_dir: str | Path | None = None,
    train_problems: list[Problem] | None = None,
    val_problems: list[Problem] | None = None,
) -> TrainResult:
    """`duetlm train`: validate, then train (or resume) to `run.steps`. Under `accelerate launch` or
    `torchrun` every process runs this; it leaves the process group at the end."""
    import contextlib
    import os

    from duetlm.dirlock import DirLock

    # One training run per directory: rank 0 holds its lock (the other ranks share rank 0's run).
    rank0 = os.environ.get("RANK", "0") == "0"
    folder = run_dir if run_dir is not None else cfg.run.dir
    with DirLock(folder, "duetlm train") if rank0 else contextlib.nullcontext():
        trainer = DuetTrainer(cfg, run_dir=run_dir, train_problems=train_problems, val_problems=val_problems)
        try:
            return trainer.train(resume=resume)
        finally:
            trainer.close()
            distributed.shutdown()
