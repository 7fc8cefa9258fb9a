"""`duetlm demo`: the whole DUET method on a CPU in minutes, with real numbers.

Phases (each timed; a progress bar on every long one):

    task        tokenizer, training / validation / test problems (`duetlm.lab.task`)
    warm start  supervised M and m (`duetlm.lab.warmstart`), cached by config hash: a second run loads
    baselines   on the test problems, greedy, through `duetlm.evaluate.run_eval`: m alone, the original
                M, budget forcing at several caps (M answers), the same cut thinking answered by m,
                and DUET with the warm-started pair
    train       DUET with the project's trainer (`DuetTrainer`, problems passed in)
    after       DUET with the trained pair; m alone after training; budget forcing of the *original* M
                capped at DUET's mean M tokens (M answers, and m answers)
    report      a table (accuracy, M tokens, m tokens, IPT, wall-clock), `results.json`, `pareto.png`,
                `curves.png` (λ, M tokens, guided success, validation accuracy per step)

The run directory holds the evaluation directories of `duetlm eval` (per-sample records) and the
trainer's run directory (metrics.jsonl, the final checkpoint), so every figure can be traced.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from duetlm.config import (
    GRPOConfig,
    ObjectiveConfig,
    OptimConfig,
    RolloutConfig,
    SamplingConfig,
    Strict,
    dump_config,
)
from duetlm.errors import DuetError
from duetlm.lab import SPLIT_SEEDS
from duetlm.lab.recipes import ModelRecipe
from duetlm.lab.task import MIX_TASK, TaskSpec, chains
from duetlm.lab.warmstart import SFTConfig
from duetlm.models import resolve_autocast
from duetlm.problems import Problem

# Bump when the task generator, tokenizer or warm start changes what a cached warm start contains.
LAB_VERSION = 2
MARKER = "demo-config.yaml"  # a directory holding it is a demo run directory (safe to overwrite)


class TaskConfig(Strict):
    """The lab task (`duetlm.lab.task.TaskSpec`): difficulty and verbosity of M's warm-start traces."""

    steps: int = Field(6, ge=2, description="operations per problem (difficulty)")
    modulus: int = Field(10, ge=3, le=100, description="arithmetic modulo this (values are digits at 10)")
    style: str = Field("split", description="split | merged (how steps are written; see lab/task.py)")
    p_open: float = Field(0.8, ge=0, lt=1, description="P(restate the start)")
    p_restate: float = Field(0.7, ge=0, lt=1, description="P(restate the value after a step)")
    p_check: float = Field(0.6, ge=0, lt=1, description="P(re-check a step)")
    p_hesitate: float = Field(0.6, ge=0, lt=1, description="P(hesitate before a step)")
    p_more: float = Field(0.35, ge=0, lt=1, description="P(one more hesitation word)")
    p_terse: float = Field(0.25, ge=0, lt=1, description="share of terse warm-start traces")
    min_steps: int | None = Field(
        None, ge=1, description="mixed difficulty: chain lengths min_steps..steps (None: all `steps` long)"
    )
    small_cap: int | None = Field(
        None, ge=1, description="m's answer cap (tokens), the budget m reasons itself within (None: classic)"
    )
    p_stop: float = Field(0.0, ge=0, lt=1, description="share of M's warm-start traces that stop early")

    def spec(self) -> TaskSpec:
        try:
            return TaskSpec(**self.model_dump())
        except ValueError as err:
            raise DuetError(f"task: {err}") from None


class DataSizes(Strict):
    train: int = Field(4000, ge=1, description="RL training problems")
    val: int = Field(64, ge=1, description="held-out problems for the trainer's validation curve")
    test: int = Field(300, ge=1, description="held-out problems every method is scored on")


class EvalSettings(Strict):
    caps: list[int] = Field([8, 16, 24, 32], description="budget forcing's caps T on M's thinking (tokens)")
    max_signal_tokens: int = Field(96, ge=1, description="cap on M's thinking")
    max_answer_tokens: int = Field(8, ge=1, description="cap on an answer")
    batch_size: int = Field(100, ge=1, description="problems generated together")


class RLSettings(Strict):
    """The DUET training run (the trainer's own config sections; see `duetlm.config.TrainConfig`).

    Why these defaults (each measured on this task; README "Demo"):
    - `budget` B = 22 with `lambda_max` 0.3: the necessary signal costs 20 M tokens (`<think>`, 18
      words, `</think>`). With B = 20 and λ_max = 1, λ never left its ceiling (the mean length never
      got under B), the penalty of a full signal (≈ 1) exceeded what it adds to m's success (≈ 0.6 at
      T = 1), and M collapsed to an empty signal at step 42. λ_max · L / B must stay below that gain.
    - `grpo.norm_std: false` (Dr. GRPO centring): with std scaling the length term alone becomes an
      order-one advantage in groups whose successes tie (cpu-facts.md).
    - `lr_large` 5e-5 and `kl_coef` 0.05: at 1e-4 without KL, RL corrupted single arithmetic facts of M
      (e.g. `+1` giving 9) while it stripped the filler (DUET 0.973 vs the original's 1.000); the KL
      term (k1, in the reward) anchors the tokens M samples to the warm start.
    - `mu_baseline: per_prompt`: under per-prompt GRPO any per-prompt b cancels (algorithm.md §2.1);
      per_prompt is the cheapest estimate for the logged marginal utility.
    """

    steps: int = Field(80, ge=1, description="RL steps of DUET training")
    schedule: str = Field("joint", description="joint | alternate | frozen_small")
    val_every: int = Field(10, ge=0, description="greedy validation every N steps")
    rollout: RolloutConfig = Field(
        default_factory=lambda: RolloutConfig(
            batch_size=8,
            n=8,
            n_small=2,
            large=SamplingConfig(temperature=1.0, max_new_tokens=96),
            small=SamplingConfig(temperature=1.0, max_new_tokens=8),
            engine_batch_size=128,
        )
    )
    objective: ObjectiveConfig = Field(
        default_factory=lambda: ObjectiveConfig(
            budget=22, mu_baseline="per_prompt", kl_coef=0.05, lambda_step_size=0.5, lambda_max=0.3
        )
    )
    grpo: GRPOConfig = Field(default_factory=lambda: GRPOConfig(norm_std=False))
    optim: OptimConfig = Field(
        default_factory=lambda: OptimConfig(
            lr_large=5e-5, lr_small=1e-4, micro_batch_size=128, autocast="auto"
        )
    )


class DemoConfig(Strict):
    """Everything `duetlm demo` does, with the defaults that meet the issue's targets on a 2-core CPU."""

    seed: int = Field(0, description="seed of the training problems, the warm start and RL")
    threads: int = Field(
        1, ge=1, description="torch threads (2 is faster on an idle 2-core machine, far slower on a busy one)"
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataSizes = Field(default_factory=DataSizes)
    large: ModelRecipe = Field(
        default_factory=lambda: ModelRecipe(hidden_size=256, num_layers=5, num_heads=4)
    )
    small: ModelRecipe = Field(
        default_factory=lambda: ModelRecipe(hidden_size=128, num_layers=4, num_heads=4)
    )
    warm_large: SFTConfig = Field(default_factory=lambda: SFTConfig(steps=250, batch_size=32, lr=1e-3))
    warm_small: SFTConfig = Field(default_factory=lambda: SFTConfig(steps=450, batch_size=32, lr=2e-3))
    eval: EvalSettings = Field(default_factory=EvalSettings)
    rl: RLSettings = Field(default_factory=RLSettings)


TASKS = ("chain", "mix")


def task_config(task: str = "chain") -> DemoConfig:
    """The demo's defaults for a task family: `chain` (today's: 6 steps, m finishes one) or `mix` (chain
    lengths 2..6, m reasons itself within a 10-token answer cap, M's traces sometimes stop early;
    `duetlm.lab.task`)."""
    if task not in TASKS:
        raise DuetError(f"unknown lab task family {task!r}; valid: {', '.join(TASKS)}")
    cfg = DemoConfig()
    if task == "mix":
        # m's answer cap is its budget (the task's `small_cap`) everywhere m answers. B = 6: the mean
        # shortest sufficient signal costs 5.5 M tokens (3.5 words, `<think>`, `</think>`), as the
        # classic task's B = 22 sits at its 20-token necessary signal; below the ~15 tokens a single
        # model needs at the least (11.8 words of necessary trace, the tags, its answer), so the length
        # term keeps pressing where only handing work to m can meet it (the paper's B = 1000 likewise
        # sits below what any of its methods reaches).
        cfg.task = TaskConfig(**MIX_TASK)
        cap = cfg.task.small_cap
        cfg.eval = cfg.eval.model_copy(update={"max_answer_tokens": cap})
        cfg.rl.rollout.small = cfg.rl.rollout.small.model_copy(update={"max_new_tokens": cap})
        cfg.rl.objective = cfg.rl.objective.model_copy(update={"budget": 6.0})
        # m's best shot within its cap: 1,800 steps (311 s here, against M's 250 steps in 430-600 s).
        # At 450 steps m alone solved k = 2 / 3 at 0.81 / 0.61 and m given the minimal signal 0.73
        # overall; at 1,800 both are 1.000 (`duetlm lab properties`, README "Lab").
        cfg.warm_small = cfg.warm_small.model_copy(update={"steps": 1800})
        # M: 500 steps. At the classic task's 250, M's loss was still falling on seeds 1 and 2 (0.52 and
        # 0.45 over the last 10 steps, against 0.39 on seed 0) and seed 1's M alone solved 0.333 of the
        # test problems (seeds 0 / 2: 0.983 / 0.963), so a three-seed grid compared seeds with and
        # without a capable M.
        cfg.warm_large = cfg.warm_large.model_copy(update={"steps": 500})
    return cfg


def quick_config(task: str = "chain") -> DemoConfig:
    """`--quick`: the same phases at toy sizes (CI checks structure, not targets)."""
    cfg = task_config(task)
    cfg.data = DataSizes(train=64, val=8, test=24)
    cfg.large = ModelRecipe(hidden_size=64, num_layers=2, num_heads=2)
    cfg.small = ModelRecipe(hidden_size=32, num_layers=2, num_heads=2)
    cfg.warm_large = SFTConfig(steps=30, batch_size=16, lr=3e-3, warmup_steps=3)
    cfg.warm_small = SFTConfig(steps=20, batch_size=16, lr=3e-3, warmup_steps=3)
    cfg.eval = cfg.eval.model_copy(update={"caps": [8], "max_signal_tokens": 64, "batch_size": 24})
    if task == "chain":
        cfg.eval.max_answer_tokens = 4
    rl = cfg.rl.model_copy(deep=True)
    rl.steps, rl.val_every = 2, 1
    rl.rollout = rl.rollout.model_copy(update={"batch_size": 4, "n": 2})
    rl.rollout.large = SamplingConfig(temperature=1.0, max_new_tokens=64)
    cfg.rl = rl
    return cfg


# --------------------------------------------------------------------------------------------------
# Data and the warm-start cache


@dataclass
class LabData:
    train: list[Problem]
    val: list[Problem]
    test: list[Problem]

    @property
    def held_out(self) -> frozenset[str]:
        return frozenset(p.question for p in self.val + self.test)


def build_data(cfg: DemoConfig) -> LabData:
    """Test and validation sets from fixed seeds (every seed of the demo scores the same problems);
    training problems from the run's seed; no question in two sets."""
    spec = cfg.task.spec()
    test = chains(spec, cfg.data.test, SPLIT_SEEDS["test"])
    seen = frozenset(c.question() for c in test)
    val = chains(spec, cfg.data.val, SPLIT_SEEDS["validation"], exclude=seen)
    seen |= frozenset(c.question() for c in val)
    train = chains(spec, cfg.data.train, SPLIT_SEEDS["train"] + cfg.seed, exclude=seen)
    as_problems = lambda cs, tag: [c.problem(f"{tag}-{i}") for i, c in enumerate(cs)]  # noqa: E731
    return LabData(as_problems(train, "train"), as_problems(val, "val"), as_problems(test, "test"))


def warm_start_key(cfg: DemoConfig, role: str) -> str:
    """Hash of everything the warm-started `role` ("large" or "small") depends on, so changing m's
    recipe does not retrain M and vice versa."""
    parts = {
        "version": LAB_VERSION,
        "role": role,
        "seed": cfg.seed,
        "task": _task_key(cfg.task),
        "data": {"val": cfg.data.val, "test": cfg.data.test},  # the held-out questions it never sees
        "model": getattr(cfg, role).model_dump(),
        "sft": getattr(cfg, f"warm_{role}").model_dump(),
        # `bf16: auto` trains differently on CPUs with and without bf16 units: key the resolved choice.
        "bf16": resolve_autocast(getattr(cfg, f"warm_{role}").bf16, "cpu"),
    }
    return f"{role}-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _task_key(task: TaskConfig) -> dict[str, Any]:
    """The task's fields for the cache key; the `mix` fields only where set, so the classic task's
    cached warm starts keep their keys."""
    mixed = {"min_steps": None, "small_cap": None, "p_stop": 0.0}
    return {k: v for k, v in task.model_dump().items() if k not in mixed or v != mixed[k]}


@dataclass
class WarmStart:
    large_dir: Path
    small_dir: Path
    cached: dict[str, bool]
    info: dict[str, Any]


def warm_start(cfg: DemoConfig, data: LabData, cache_root: Path, say: Callable[[str], None]) -> WarmStart:
    """Warm-start M and m, each loaded instead from `cache_root/lab/<role>-<key>` when present."""
    import torch

    from duetlm.lab.recipes import build_model, build_tokenizer, count_parameters
    from duetlm.lab.warmstart import example_stream, large_example, sft, small_example
    from duetlm.models import save_pretrained

    spec = cfg.task.spec()
    tok = build_tokenizer(spec)
    dirs: dict[str, Path] = {}
    cached: dict[str, bool] = {}
    info: dict[str, Any] = {}
    for role, recipe, sft_cfg, make in (
        ("large", cfg.large, cfg.warm_large, large_example),
        ("small", cfg.small, cfg.warm_small, small_example),
    ):
        folder = cache_root / "lab" / warm_start_key(cfg, role)
        dirs[role] = folder / "model"
        info_file = folder / "warm.json"
        if info_file.is_file():
            info[role] = json.loads(info_file.read_text())
            cached[role] = True
            say(f"warm start {role}: cached in {folder}")
            continue
        torch.manual_seed(cfg.seed)
        model = build_model(tok, recipe, seed=cfg.seed + (1 if role == "large" else 2))
        stream = example_stream(tok, make, spec, seed=cfg.seed * 1000 + len(role), exclude=data.held_out)
        t0 = time.perf_counter()
        with _bar(sft_cfg.steps, f"warm start {'M' if role == 'large' else 'm'}") as bar:

            def on_step(log: Any, bar: Any = bar) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{log.loss:.3f}", refresh=False)

            logs = sft(model, tok, stream, sft_cfg, on_step)
        info[role] = {
            "key": folder.name,
            "params": count_parameters(model),
            "steps": sft_cfg.steps,
            "seconds": time.perf_counter() - t0,
            "final_loss": sum(x.loss for x in logs[-10:]) / min(10, len(logs)),
            "loss_curve": [round(x.loss, 4) for x in logs],
        }
        cached[role] = False
        folder.mkdir(parents=True, exist_ok=True)
        save_pretrained(model, tok, dirs[role])
        info_file.write_text(json.dumps(info[role]))  # written last: its presence means complete
        say(
            f"warm start {role}: {info[role]['params'] / 1e6:.2f}M parameters, {sft_cfg.steps} steps, "
            f"{info[role]['seconds']:.0f}s, loss {info[role]['final_loss']:.3f}"
        )
    return WarmStart(dirs["large"], dirs["small"], cached, info)


def _bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------------------------------------
# Evaluation through `duetlm eval`


@dataclass
class Row:
    """One line of the demo's table."""

    method: str
    accuracy: float
    large_tokens: float
    small_tokens: float
    seconds: float
    models: str  # which weights: warm start or trained

    @property
    def ipt(self) -> float | None:
        return 1000.0 * self.accuracy / self.large_tokens if self.large_tokens > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "accuracy": self.accuracy,
            "large_tokens": self.large_tokens,
            "small_tokens": self.small_tokens,
            "ipt": self.ipt,
            "seconds": self.seconds,
            "models": self.models,
        }


def evaluate(
    out: Path,
    cfg: DemoConfig,
    large: Any,
    small: Any,
    problems: list[Problem],
    methods: list[str],
    max_signal_tokens: int | None = None,
    rename: dict[str, str] | None = None,
    models: str = "warm start",
) -> list[Row]:
    """`run_eval` over the test problems with engines already in memory; one `Row` per method."""
    from duetlm.evaluate import make_config, run_eval
    from duetlm.report import ORACLE_ROUTE

    ecfg = make_config(
        large=f"lab M ({models})",
        small=f"lab m ({models})",
        benchmarks=["lab"],
        methods=methods,
        output=str(out),
        max_signal_tokens=max_signal_tokens or cfg.eval.max_signal_tokens,
        max_answer_tokens=cfg.eval.max_answer_tokens,
        batch_size=cfg.eval.batch_size,
        seed=cfg.seed,
        threads=cfg.threads,
    )
    summary = run_eval(ecfg, large_engine=large, small_engine=small, problems={"lab": problems})
    rename = rename or {}
    return [
        Row(rename.get(m.method, m.method), m.accuracy, m.large_tokens, m.small_tokens, m.wall_s, models)
        for m in summary.metrics
        if m.method != ORACLE_ROUTE  # derived from small's and duet's samples; not a demo row
    ]


# --------------------------------------------------------------------------------------------------
# Training through the project's trainer


def train_config(cfg: DemoConfig, ws: WarmStart, run_dir: Path) -> Any:
    from duetlm.config import DataConfig, LoggingConfig, ModelConfig, RunConfig, TrainConfig

    rl = cfg.rl
    return TrainConfig(
        mode="duet",
        schedule=rl.schedule,
        seed=cfg.seed,
        large=ModelConfig(path=str(ws.large_dir), device="cpu", dtype="float32"),
        small=ModelConfig(path=str(ws.small_dir), device="cpu", dtype="float32"),
        data=DataConfig(),
        rollout=rl.rollout,
        objective=rl.objective,
        grpo=rl.grpo,
        optim=rl.optim,
        run=RunConfig(
            steps=rl.steps,
            dir=str(run_dir),
            save_every=0,
            keep_last=1,
            grading_workers=1,
            threads=cfg.threads,
        ),
        logging=LoggingConfig(val_every=rl.val_every, sample_every=10, num_samples=4, tensorboard=False),
    )


CURVES = (
    ("lambda", "λ"),
    ("tokens/large_mean", "M tokens (rollouts, T=1)"),
    ("success/guided", "guided success (rollouts)"),
    ("val/accuracy", "validation accuracy (greedy)"),
)


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from duetlm.logging_utils import METRICS_FILE, read_jsonl

    rows = read_jsonl(run_dir / METRICS_FILE)
    curves: dict[str, list[tuple[int, float]]] = {key: [] for key, _ in CURVES}
    curves["val/large_tokens"] = []
    curves["success/unguided"] = []
    for row in rows:
        for key in curves:
            if key in row:
                curves[key].append((int(row["step"]), float(row[key])))
    return curves


# --------------------------------------------------------------------------------------------------
# Report


def plot_pareto(rows: list[Row], path: Path) -> None:
    """Accuracy against M tokens: DUET, the original M and m alone as labelled points, budget forcing
    at every cap as two lines (M answers the cut thinking; m answers it), the Pareto front in grey."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    from duetlm.report import pareto_front

    fig, ax = plt.subplots(figsize=(7, 4.5))
    pts = [(r.large_tokens, r.accuracy) for r in rows]
    front = pareto_front(pts)
    if len(front) > 1:
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="grey", lw=1)
    for prefix, label in (
        ("truncation:", "budget forcing, M answers"),
        ("truncation-small:", "cut thinking, m answers"),
    ):
        family = sorted((r for r in rows if r.method.startswith(prefix)), key=lambda r: r.large_tokens)
        if family:
            ax.plot([r.large_tokens for r in family], [r.accuracy for r in family], "o--", ms=4, label=label)
    # Label offsets (points): pairs that sit on top of each other (the original M and DUET before RL;
    # m before and after RL) get their labels on opposite sides.
    offsets = {"duet (warm start)": (-95, -14), "original": (-20, 8), "small (trained m)": (6, 6)}
    for r in rows:
        if r.method.startswith("truncation"):
            continue
        marker = "*" if r.method.startswith("duet") else "s"
        ax.scatter([r.large_tokens], [r.accuracy], s=110 if marker == "*" else 40, marker=marker, zorder=3)
        ax.annotate(
            r.method,
            (r.large_tokens, r.accuracy),
            textcoords="offset points",
            xytext=offsets.get(r.method, (6, -12)),
            fontsize=8,
        )
    ax.set_xlabel("M tokens per problem (greedy)")
    ax.set_ylabel("accuracy (test problems)")
    ax.set_ylim(-0.05, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    ax.set_title("lab: accuracy against large-model tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4 * len(CURVES), 3.2))
    for ax, (key, label) in zip(axes, CURVES, strict=True):
        pts = curves.get(key, [])
        if pts:
            ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 15 else None, ms=3)
        if key == "tokens/large_mean" and curves.get("val/large_tokens"):
            vt = curves["val/large_tokens"]
            ax.plot([s for s, _ in vt], [v for _, v in vt], marker="o", ms=3, label="validation (greedy)")
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
        if key in ("success/guided", "val/accuracy"):
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_targets(rows: dict[str, Row], truncation_at_duet: str, wall_s: float) -> dict[str, Any]:
    """The issue's targets, each with the numbers it compares (targets as stated, not tuned)."""
    original, small, duet = rows["original"], rows["small"], rows["duet"]
    trunc = rows[truncation_at_duet]
    t0 = original.large_tokens

    def item(ok: bool, **numbers: float) -> dict[str, Any]:
        return {"met": bool(ok), **{k: round(v, 4) for k, v in numbers.items()}}

    return {
        "wall_clock_le_900s": item(wall_s <= 900, wall_s=wall_s),
        "original_accuracy_ge_0.85": item(original.accuracy >= 0.85, accuracy=original.accuracy),
        "small_alone_le_0.40": item(small.accuracy <= 0.40, accuracy=small.accuracy),
        "duet_tokens_le_0.40_T0": item(
            duet.large_tokens <= 0.40 * t0, duet_tokens=duet.large_tokens, T0=t0, ratio=duet.large_tokens / t0
        ),
        "duet_accuracy_ge_original_minus_0.02": item(
            duet.accuracy >= original.accuracy - 0.02, duet=duet.accuracy, original=original.accuracy
        ),
        "truncation_at_duet_tokens_le_duet_minus_0.10": item(
            trunc.accuracy <= duet.accuracy - 0.10, truncation=trunc.accuracy, duet=duet.accuracy
        ),
    }


def render_table(rows: list[Row]) -> Any:
    from rich.table import Table

    table = Table(title="duetlm demo: lab task, test problems, greedy")
    for col in ("method", "models", "accuracy", "M tokens", "m tokens", "IPT", "wall-clock (s)"):
        table.add_column(col, justify="left" if col in ("method", "models") else "right")
    for r in rows:
        table.add_row(
            r.method,
            r.models,
            f"{r.accuracy:.3f}",
            f"{r.large_tokens:.1f}",
            f"{r.small_tokens:.1f}",
            "—" if r.ipt is None else f"{r.ipt:.1f}",
            f"{r.seconds:.1f}",
        )
    return table


TARGETS_NOTE = "set for the full-size demo; at --quick's toy sizes most are missed, as expected"


def table_markdown(rows: list[Row], targets: dict[str, dict[str, Any]]) -> str:
    """`table.md`: the table the demo prints, and each target with its numbers."""
    lines = [
        "| method | models | accuracy | M tokens | m tokens | IPT | wall-clock (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ipt = "—" if r.ipt is None else f"{r.ipt:.1f}"
        lines.append(
            f"| {r.method} | {r.models} | {r.accuracy:.3f} | {r.large_tokens:.1f} | {r.small_tokens:.1f} "
            f"| {ipt} | {r.seconds:.1f} |"
        )
    lines += ["", f"Targets: {TARGETS_NOTE}", ""]
    for name, target in targets.items():
        numbers = ", ".join(f"{k} {v:g}" for k, v in target.items() if k != "met")
        lines.append(f"- {'met' if target['met'] else 'NOT MET'}: {name} ({numbers})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# The demo


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t = time.perf_counter()
        try:
            return fn()
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t


def prepare_output(out: Path) -> None:
    """A fresh run directory; an earlier demo's directory is replaced, anything else is refused."""
    if out.exists():
        if not out.is_dir():
            raise DuetError(f"--output {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise DuetError(f"--output {out} is a non-empty directory that is not a demo run; choose another")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def engines_for(cfg: DemoConfig, ws: WarmStart) -> tuple[Any, Any]:
    """HF engines over the warm-started M and m (the baselines' models, kept for budget forcing)."""
    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model

    def engine(path: Path) -> Any:
        model, tok = load_model(str(path), dtype="float32", device="cpu")
        return HFEngine(model, tok, max_batch_size=cfg.eval.batch_size)

    return engine(ws.large_dir), engine(ws.small_dir)


def _cut_small(ev: Path, cfg: DemoConfig, large: Any, small: Any, test: list[Problem], cap: int) -> list[Row]:
    """M's thinking cut at `cap` tokens and handed to m: DUET's pipeline with M capped at `cap`."""
    rename = {"duet": f"truncation-small:{cap}"}
    return evaluate(ev / f"cut-small-{cap}", cfg, large, small, test, ["duet"], cap, rename=rename)


def run_baselines(cfg: DemoConfig, data: LabData, large0: Any, small0: Any, ev: Path) -> list[Row]:
    """m alone, the original M, DUET with the warm-started pair, budget forcing at every cap."""
    caps = sorted(set(cfg.eval.caps))
    methods = ["small", "original", "duet"] + [f"truncation:{t}" for t in caps]
    rows = evaluate(
        ev / "warm", cfg, large0, small0, data.test, methods, rename={"duet": "duet (warm start)"}
    )
    for t in caps:
        rows += _cut_small(ev, cfg, large0, small0, data.test, t)
    return rows


def train_duet(cfg: DemoConfig, ws: WarmStart, data: LabData, run_dir: Path) -> Any:
    """DUET with the project's trainer, from the warm start; returns the trainer (its models in memory)."""
    from duetlm.train import DuetTrainer

    trainer = DuetTrainer(train_config(cfg, ws, run_dir), train_problems=data.train, val_problems=data.val)
    trained = trainer.train()
    if trained.stop_signum is not None:
        raise DuetError(
            f"training stopped by signal {trained.stop_signum} at step {trained.step}; "
            f"its checkpoint is {trained.checkpoint}"
        )
    for policy in trainer.policies.values():
        policy.model.eval()
        policy.engine.max_batch_size = cfg.eval.batch_size
    return trainer


def run_after(
    cfg: DemoConfig, data: LabData, trainer: Any, large0: Any, small0: Any, ev: Path, done: set[str]
) -> tuple[list[Row], int]:
    """DUET and m alone with the trained pair; budget forcing of the *original* M capped at DUET's
    mean M tokens (rounded to a whole token), M answering and m answering. Returns (rows, that cap)."""
    large1, small1 = trainer.policies["large"].engine, trainer.policies["small"].engine
    methods = ["duet", "small"]
    rename = {"small": "small (trained m)"}
    rows = evaluate(ev / "trained", cfg, large1, small1, data.test, methods, rename=rename, models="trained")
    duet = next(r for r in rows if r.method == "duet")
    duet_cap = max(1, round(duet.large_tokens))
    if f"truncation:{duet_cap}" not in done:
        method = [f"truncation:{duet_cap}"]
        rows += evaluate(ev / f"truncation-{duet_cap}", cfg, large0, small0, data.test, method)
    if f"truncation-small:{duet_cap}" not in done:
        rows += _cut_small(ev, cfg, large0, small0, data.test, duet_cap)
    return rows, duet_cap


METHOD_ORDER = ["duet", "original", "duet (warm start)", "small", "small (trained m)"]


def _order(row: Row) -> tuple[int, int, str]:
    rank = METHOD_ORDER.index(row.method) if row.method in METHOD_ORDER else len(METHOD_ORDER)
    _, _, arg = row.method.partition(":")
    return rank, int(arg) if arg.isdigit() else 0, row.method


def run_demo(
    cfg: DemoConfig,
    out: Path,
    cache_root: Path,
    console: Any | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run every phase and write the run directory; returns the content of `results.json`."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the demo has its own bars
    if console is None:
        from rich.console import Console

        # Why a fixed width off a terminal: rich would squeeze the table to 80 columns in a log file.
        console = Console(stderr=False, width=None if sys.stdout.isatty() else 120)
    say = console.print
    start = time.perf_counter()
    timer = Timer()
    prepare_output(out)
    dump_config(cfg, out / MARKER)
    torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    data = timer.run("task", lambda: build_data(cfg))
    example = data.test[0]
    say(f"task: {cfg.task.steps} steps mod {cfg.task.modulus}; e.g. {example.question!r} -> {example.answer}")
    ws = timer.run("warm_start", lambda: warm_start(cfg, data, cache_root, say))
    large0, small0 = engines_for(cfg, ws)
    say("baselines: m alone, original M, budget forcing, DUET with the warm-started pair")
    rows = timer.run("baselines", lambda: run_baselines(cfg, data, large0, small0, out / "eval"))
    say(f"training DUET for {cfg.rl.steps} steps with the project's trainer")
    trainer = timer.run("train", lambda: train_duet(cfg, ws, data, out / "train"))
    done = {r.method for r in rows}
    after, duet_cap = timer.run(
        "after", lambda: run_after(cfg, data, trainer, large0, small0, out / "eval", done)
    )
    rows = sorted(rows + after, key=_order)
    wall = time.perf_counter() - start

    by_name = {r.method: r for r in rows}
    curves = read_curves(out / "train")
    plot_pareto(rows, out / "pareto.png")
    plot_curves(curves, out / "curves.png")
    results = {
        "seed": cfg.seed,
        "command": command,
        "config": cfg.model_dump(mode="json"),
        "methods": {r.method: r.to_json() for r in rows},
        "T0": by_name["original"].large_tokens,
        "duet_cap": duet_cap,
        "targets": check_targets(by_name, f"truncation:{duet_cap}", wall),
        "warm_start": {
            role: {"cached": ws.cached[role], "dir": str(d), **ws.info[role]}
            for role, d in (("large", ws.large_dir), ("small", ws.small_dir))
        },
        "training": {"steps": trainer.step, "curves": curves},
        "timings_s": timer.seconds,
        "wall_clock_s": wall,
        "threads": cfg.threads,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "table.md").write_text(table_markdown(rows, results["targets"]))
    console.print(render_table(rows))
    for name, target in results["targets"].items():
        numbers = ", ".join(f"{k} {v:g}" for k, v in target.items() if k != "met")
        say(f"  {'met    ' if target['met'] else 'NOT MET'}  {name}: {numbers}")
    met = sum(t["met"] for t in results["targets"].values())
    say(f"targets met: {met}/{len(results['targets'])} ({TARGETS_NOTE})")
    say(f"wall-clock {wall:.0f}s; table in {out / 'table.md'}, every number in {out / 'results.json'}")
    return results
