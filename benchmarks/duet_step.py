"""One DUET training step broken into its phases, so the slowest phase is visible.

Builds a tiny M (Qwen3) and m (Llama) with a locally trained tokenizer, then runs `DuetTrainer` for
`--warmup` + `--steps` steps on the arithmetic problems of configs/data/arith.jsonl and prints, per
phase, the median seconds per step (over the measured steps) and its share of the step:

    rollout       M samples n responses per prompt (its thinking, stopped at </think>)
    guided        m answers each (x, z_i) n_m times
    unguided      m answers x alone (the marginal-utility baseline)
    grade         every answer graded (grading.grade_many)
    old_logprobs  π_old recomputed by a forward pass (only with grpo.recompute_old_logprobs)
    reference     log π_ref of M's tokens for the β·KL term (kl_coef > 0)
    rewards, advantages, update_small, update_large, lambda

The models are random, so M rarely closes its thinking and m rarely stops early: every response runs
to its token limit, which makes the work of each step the same from run to run. The phase times are
the trainer's own (`time/<phase>_s` in metrics.jsonl). `--set a.b=v` overrides the config (e.g.
`--set optim.autocast=bf16`, `--set objective.mu_baseline=per_rollout`). On a shared machine the
figures are noisy: compare medians of runs made at the same time.

    python benchmarks/duet_step.py                         # 8 prompts x 4 rollouts x 2 answers
    python benchmarks/duet_step.py --steps 5 --set rollout.batch_size=16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
PHASES = (
    "rollout",
    "guided",
    "unguided",
    "grade",
    "old_logprobs",
    "reference",
    "rewards",
    "advantages",
    "update_small",
    "update_large",
    "lambda",
)


def tiny_models(root: Path, large_hidden: int, large_layers: int, small_hidden: int) -> tuple[str, str]:
    """M (Qwen3) and m (Llama) with random weights and a shared BPE tokenizer, saved under `root`."""
    from transformers.utils import logging as hf_logging

    from duetlm.models import save_pretrained, tiny_corpus, tiny_model, train_tokenizer

    hf_logging.disable_progress_bar()
    tok = train_tokenizer(tiny_corpus(0), vocab_size=384)
    heads = max(large_hidden // 32, 1)  # head_dim 32
    large = tiny_model(
        tok, arch="qwen3", hidden_size=large_hidden, num_layers=large_layers, num_heads=heads, seed=1
    )
    small = tiny_model(tok, arch="llama", hidden_size=small_hidden, num_layers=2, num_heads=2, seed=2)
    return (
        str(save_pretrained(large, tok, root / "large")),
        str(save_pretrained(small, tok, root / "small")),
    )


def build_config(large: str, small: str, run_dir: Path, overrides: list[str]) -> object:
    from duetlm.config import TrainConfig, build_config, deep_merge, parse_overrides

    data = {
        "mode": "duet",
        "seed": 0,
        "large": {"path": large, "device": "cpu"},
        "small": {"path": small, "device": "cpu"},
        "data": {"source": str(REPO / "configs" / "data" / "arith.jsonl")},
        "rollout": {
            "batch_size": 8,
            "n": 4,
            "n_small": 2,
            "large": {"max_new_tokens": 32},
            "small": {"max_new_tokens": 16},
        },
        "objective": {"budget": 16, "mu_baseline": "per_prompt", "kl_coef": 0.001},
        "grpo": {"norm_std": False},
        "optim": {"lr_large": 1e-4, "lr_small": 1e-4, "micro_batch_size": 16},
        "run": {"steps": 1000, "dir": str(run_dir), "save_every": 0, "grading_workers": 1, "threads": 1},
        "logging": {"tensorboard": False, "progress": "off", "sample_every": 0, "val_every": 0},
    }
    return build_config(TrainConfig, deep_merge(data, parse_overrides(overrides)), "duet_step.py")


def run(cfg: object, warmup: int, steps: int) -> list[dict[str, float]]:
    """Metrics of `steps` measured steps after `warmup` unmeasured ones."""
    from duetlm.train import DuetTrainer

    trainer = DuetTrainer(cfg)
    trainer.setup()
    out = []
    for k in range(warmup + steps):
        outcome = trainer.train_step(trainer.step + 1)
        trainer.step += 1
        if k >= warmup:
            out.append(outcome.metrics)
    return out


def summarise(records: list[dict[str, float]]) -> dict[str, float]:
    """Median seconds per phase (phases that ran), and of the whole step."""
    out = {}
    for phase in (*PHASES, "step"):
        values = [r[f"time/{phase}_s"] for r in records if f"time/{phase}_s" in r]
        if values:
            out[phase] = statistics.median(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=4, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--large-hidden", type=int, default=128)
    parser.add_argument("--large-layers", type=int, default=4)
    parser.add_argument("--small-hidden", type=int, default=64)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=v")
    parser.add_argument("--json", type=Path, help="also write the medians and every step's times here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        large, small = tiny_models(root, args.large_hidden, args.large_layers, args.small_hidden)
        cfg = build_config(large, small, root / "run", args.overrides)
        t0 = time.perf_counter()
        records = run(cfg, args.warmup, args.steps)
        wall = time.perf_counter() - t0
    med = summarise(records)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"DUET step, {cfg.rollout.batch_size} prompts x n={cfg.rollout.n} x n_m={cfg.rollout.n_small}; "
        f"M {cfg.rollout.large.max_new_tokens} / m {cfg.rollout.small.max_new_tokens} tokens; "
        f"median of {args.steps} steps after {args.warmup} warm-up ({wall:.1f} s in all; load {load:.1f})"
    )
    total = med["step"]
    print(f"{'phase':<14}{'s/step':>9}{'share':>8}")
    for phase in PHASES:
        if phase in med:
            print(f"{phase:<14}{med[phase]:>9.3f}{100 * med[phase] / total:>7.1f}%")
    print(f"{'step':<14}{total:>9.3f}")
    tokens = statistics.median(r["tokens/generated"] for r in records)
    print(f"generated tokens per step: {tokens:.0f}")
    slowest = max((p for p in PHASES if p in med), key=med.get)
    print(f"slowest phase: {slowest}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "argv": sys.argv[1:],
                    "median_s": med,
                    "steps": [
                        {k: v for k, v in r.items() if k.startswith(("time/", "tokens/"))} for r in records
                    ],
                    "load": load,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
