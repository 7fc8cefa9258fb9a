"""Run state and checkpoints: what a run must carry across a restart (steps, data cursor, λ, optimizer
and RNG states, the weights), written atomically (checkpoint.py) and read back on `--resume`."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duetlm import checkpoint as ckpt
from duetlm import distributed
from duetlm.config import TrainConfig, dump_config
from duetlm.distributed import Dist
from duetlm.errors import DuetError
from duetlm.objective import LambdaController
from duetlm.train.policy import Policy

STATE_FORMAT = 2  # 1: positional optimizer states (before data parallelism); 2: keyed by parameter name


@dataclass
class RunState:
    """Where a run stands after `step` completed steps."""

    lam: LambdaController  # λ_t, saved in every checkpoint (algorithm.md §2 item 6, Decision)
    step: int = 0
    cursor: int = 0  # training problems consumed (position in the stream of seeded epochs)
    bad_steps: int = 0  # consecutive steps with a skipped (non-finite) update

    def state_dict(self, policies: dict[str, Policy]) -> dict[str, Any]:
        """The trainer state of a checkpoint (collective: FSDP's optimizer states are gathered).
        Optimizer states are full and keyed by parameter name, so any world size and strategy can
        load them."""
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "cursor": self.cursor,
            "bad_steps": self.bad_steps,
            "lambda": self.lam.state_dict(),
            "optimizers": {
                r: distributed.optimizer_state(p.model, p.optimizer)
                for r, p in policies.items()
                if p.optimizer
            },
            "rng": ckpt.rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any], policies: dict[str, Policy]) -> None:
        """Restore a checkpoint's trainer state, optimizer states and RNG states."""
        self.step, self.cursor, self.bad_steps = state["step"], state["cursor"], state["bad_steps"]
        self.lam.load_state_dict(state["lambda"])
        for role, opt_state in state["optimizers"].items():
            policy = policies.get(role)
            if policy is None or policy.optimizer is None:
                continue
            if state.get("format", 1) == 1:
                policy.optimizer.load_state_dict(opt_state)
            else:
                distributed.load_optimizer_state(policy.model, policy.optimizer, opt_state)
        ckpt.set_rng_state(state["rng"])


def save_checkpoint(
    run_dir: Path, state: RunState, policies: dict[str, Policy], cfg: TrainConfig, dist: Dist
) -> Path:
    """Write the checkpoint of completed step `state.step` atomically (see checkpoint.py). Every rank
    calls it (optimizer states may need gathering); rank 0 writes. LoRA models are saved as their
    adapter and as a merged plain HF directory, so eval and vLLM need no peft."""
    from duetlm.models import save_pretrained

    trainer_state = state.state_dict(policies)
    final = ckpt.checkpoints_dir(run_dir) / ckpt.checkpoint_name(state.step)
    if dist.is_main:
        tmp = ckpt.begin_checkpoint(run_dir, state.step)
        for role, policy in policies.items():
            if policy.is_lora:
                policy.model.save_pretrained(str(tmp / f"{role}_adapter"))
                merged = copy.deepcopy(policy.model).merge_and_unload()
                save_pretrained(merged, policy.tokenizer, tmp / role)
                del merged
            else:
                save_pretrained(policy.full_model, policy.tokenizer, tmp / role)
        ckpt.save_state(tmp, trainer_state)
        dump_config(cfg, tmp / "config.yaml")
        final = ckpt.commit_checkpoint(tmp, state.step, cfg.run.keep_last, cfg.run.keep_steps)
    dist.barrier()  # nobody reads the checkpoint (or exits) before it is complete
    return final


def resolve_resume(run_dir: Path, resume: str | None, dist: Dist) -> Path | None:
    """`None`: a fresh run (an error if the run directory already has checkpoints); `"auto"`: the
    newest complete checkpoint of the run directory, if any; otherwise a checkpoint directory."""
    if dist.is_main:
        ckpt.remove_partial(run_dir)
    latest = ckpt.latest_checkpoint(run_dir)
    if resume is None:
        if latest is not None:
            raise DuetError(
                f"run directory {run_dir} already has checkpoints (newest: {latest.name}); "
                "pass --resume auto to continue it, or choose another run.dir"
            )
        return None
    if resume == "auto":
        return latest
    path = Path(resume)
    if not (path / ckpt.COMPLETE).is_file():
        raise DuetError(f"--resume {resume}: not a complete checkpoint directory (no {ckpt.COMPLETE})")
    return path


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(saved: Path, cfg: TrainConfig) -> list[str]:
    """Dotted keys whose value in `cfg` differs from the config saved at `saved` (YAML)."""
    import yaml

    if not saved.is_file():
        return []
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(cfg.model_dump(mode="json"))
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
