"""The grid behind `duetlm lab tables`: every (variant, seed) of the paper's Table 1 and ablations on a
lab task, run as cached units in worker processes.

A unit is one seed's `baselines` (the warm-started pair, inference only: m alone, the original M, the
prompt-based M, budget forcing at 0.4 / 0.6 / 0.8 × T0, DUET before RL) or one trained variant (the
demo's RL config with the variant's mode, schedule and overrides, from the same warm start). Its result
(`result.json`: per method accuracy, tokens, compute, a per-chain-length breakdown; the training
curves) is written atomically when it finishes, with the hash of everything it depends on, so an
interrupted or extended grid redoes nothing that finished, and an entry that does not parse or whose
hash differs is recomputed, not trusted.

Order: a seed's `baselines` first (they warm-start the pair into the cache and measure T0, which
ThinkPrune's limits scale with), then its `DUET` (whose mean M tokens set the cap of the budget-forcing
row "at DUET's tokens", and whose mean λ is the −LPS constant), then the rest, in parallel.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from duetlm.errors import DuetError
from duetlm.lab.demo import DemoConfig, Row

BASELINES = "baselines"
GRID_VERSION = 2  # bump when a unit's result changes meaning (its cache entries are then recomputed)
# Bump when `baselines` gains or changes a method: only the baselines units are recomputed, and the
# trained variants stay cached as long as what they take from them (T0) is unchanged.
BASELINES_VERSION = 3


@dataclass(frozen=True)
class Variant:
    """One trained run: the trainer's mode and schedule, and overrides of the demo's RL config.
    `needs`: the units of the same seed whose results it uses (besides `baselines`)."""

    name: str
    table: str  # "table1" | "ablation" | "global"
    mode: str = "duet"
    schedule: str = "joint"
    objective: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    needs: tuple[str, ...] = ()


CONSTANT = {"lambda_schedule": "constant"}  # λ_init filled in from DUET's run (`objective_for`)
VARIANTS: list[Variant] = [
    Variant("DUET", "table1", note="mu_baseline per_prompt, adaptive λ, grpo advantages"),
    Variant("single-model", "table1", mode="single", note="M alone, r − λL/B, adaptive λ"),
    Variant("ThinkPrune", "table1", mode="thinkprune", note="limits scaled to the lab (T0 → B)"),
    Variant("L-GRPO", "table1", mode="lgrpo"),
    Variant("DUET −MU", "ablation", objective={"mu_baseline": "none"}),
    Variant("DUET −LPS", "ablation", objective=CONSTANT, note="λ ≡ mean λ of DUET's run", needs=("DUET",)),
    Variant("DUET −MU −LPS", "ablation", objective={"mu_baseline": "none", **CONSTANT}, needs=("DUET",)),
    Variant("DUET frozen m", "ablation", schedule="frozen_small"),
    Variant("DUET [per_rollout]", "ablation", objective={"mu_baseline": "per_rollout"}),
    Variant("DUET global [per_prompt]", "global", grpo={"advantage": "global"}),
    Variant(
        "DUET global [per_rollout]",
        "global",
        objective={"mu_baseline": "per_rollout"},
        grpo={"advantage": "global"},
    ),
    Variant("DUET global −MU", "global", objective={"mu_baseline": "none"}, grpo={"advantage": "global"}),
]
BY_NAME = {v.name: v for v in VARIANTS}


TRUNCATION_FRACTIONS = (0.4, 0.6, 0.8)


def truncation_name(fraction: float) -> str:
    """Table 1's budget-forcing row at `fraction` × T0 (M's mean thinking tokens before RL)."""
    return f"truncation {fraction:g}×T0"


def parse_seeds(text: str) -> list[int]:
    """`"0,1,2"` -> [0, 1, 2]; a clear error for an empty or malformed list."""
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p.lstrip("-").isdigit() for p in parts):
        raise DuetError(f"--seeds {text!r}: give comma-separated whole numbers, e.g. --seeds 0,1,2")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise DuetError(f"--seeds {text!r}: a seed appears twice")
    return seeds


def parse_variants(text: str | None) -> list[Variant]:
    """Comma-separated variant names (None: all); an unknown name lists the valid ones."""
    if text is None:
        return list(VARIANTS)
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in BY_NAME]
    if unknown or not wanted:
        raise DuetError(f"unknown variant(s) {unknown or [text]}; valid: {', '.join(BY_NAME)}")
    for w in list(wanted):  # a variant's dependencies run too
        wanted += [n for n in BY_NAME[w].needs if n not in wanted]
    return [v for v in VARIANTS if v.name in wanted]


@dataclass(frozen=True)
class Unit:
    """One cached piece of the grid: `name` is `baselines` or a variant's name."""

    name: str
    seed: int

    @property
    def needs(self) -> tuple[str, ...]:
        return () if self.name == BASELINES else (BASELINES, *BY_NAME[self.name].needs)

    def folder(self, work: Path) -> Path:
        slug = self.name.replace(" ", "_").replace("[", "").replace("]", "").replace("−", "-")
        return work / f"seed{self.seed}" / slug


@dataclass(frozen=True)
class GridSpec:
    """What every unit of one grid shares (the part of its cache key that is not the unit itself)."""

    task: str
    steps: int
    quick: bool
    config: dict[str, Any]  # the DemoConfig (without seed and RL steps) as JSON
    cache: str = ""  # the warm-start cache root (where, not what: not part of the key)

    def demo_config(self, seed: int) -> DemoConfig:
        cfg = DemoConfig.model_validate(self.config)
        cfg.seed, cfg.rl.steps = seed, self.steps
        return cfg


def unit_key(spec: GridSpec, unit: Unit, inputs: dict[str, Any]) -> str:
    """Hash of everything a unit's result depends on: the grid's config, the unit, the results of the
    units it uses, and the grid's version."""
    shared = {k: v for k, v in asdict(spec).items() if k != "cache"}
    payload = {"version": GRID_VERSION, "spec": shared, "unit": asdict(unit), "inputs": inputs}
    if unit.name == BASELINES:
        payload["baselines_version"] = BASELINES_VERSION
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def load_result(path: Path, key: str) -> dict[str, Any] | None:
    """A finished unit's result, or None when absent, unreadable, or from other inputs (recompute)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key or not isinstance(data.get("methods"), dict):
        return None
    return data


def save_result(path: Path, data: dict[str, Any]) -> None:
    """Written to a temporary file, then renamed: a killed worker never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Inputs a unit takes from the units it needs


def inputs_for(unit: Unit, done: dict[Unit, dict[str, Any]]) -> dict[str, Any]:
    """What a unit uses of the results it needs: T0 (baselines); DUET's mean M tokens and mean λ."""
    if unit.name == BASELINES:
        return {}
    base = done[Unit(BASELINES, unit.seed)]
    inputs: dict[str, Any] = {"T0": base["T0"]}
    if "DUET" in BY_NAME[unit.name].needs:
        duet = done[Unit("DUET", unit.seed)]
        inputs["duet_lambda"] = duet["mean_lambda"]
    return inputs


def thinkprune_objective(t0: float, budget: float, steps: int, cap: int) -> dict[str, int]:
    """ThinkPrune's schedule scaled to the lab (paper: 8000 → 1000 tokens, −1000 every 20 of 150 steps).

    The paper starts above the original model's length (8000 against 4,000-7,000 tokens) and ends at
    1000 = B; here: start at 1.2 × T0 (capped at the rollout length), the floor at the lab's B, seven
    equal decrements like the paper's, one every steps·20/150 steps.
    """
    start = min(cap, math.ceil(1.2 * t0))
    floor = min(start, round(budget))
    return {
        "thinkprune_start": start,
        "thinkprune_floor": floor,
        "thinkprune_step": max(1, math.ceil((start - floor) / 7)),
        "thinkprune_every": max(1, round(steps * 20 / 150)),
    }


def objective_for(v: Variant, cfg: DemoConfig, inputs: dict[str, Any]) -> dict[str, Any]:
    """The variant's objective overrides with the values taken from other units filled in."""
    objective = dict(v.objective)
    if v.mode == "thinkprune":
        cap = cfg.rl.rollout.large.max_new_tokens
        objective.update(thinkprune_objective(inputs["T0"], cfg.rl.objective.budget, cfg.rl.steps, cap))
    if objective.get("lambda_schedule") == "constant":
        # −LPS: a constant nonzero λ, the mean of the adaptive run's λ over its steps (the paper does
        # not state its constant; this one charges the same on average as DUET's schedule did).
        objective["lambda_init"] = max(inputs["duet_lambda"], 1e-3)
    return objective


# --------------------------------------------------------------------------------------------------
# Scheduling


def plan(variants: list[Variant], seeds: list[int]) -> list[Unit]:
    """Every unit of the grid, in an order that respects `Unit.needs`."""
    units = [Unit(BASELINES, s) for s in seeds]
    units += [Unit(v.name, s) for v in variants if not v.needs for s in seeds]
    units += [Unit(v.name, s) for v in variants if v.needs for s in seeds]
    return units


def run_grid(
    spec: GridSpec,
    units: list[Unit],
    work: Path,
    jobs: int,
    run_unit: Callable[[GridSpec, Unit, dict[str, Any], Path], dict[str, Any]],
    on_done: Callable[[Unit, dict[str, Any], bool], None],
) -> dict[Unit, dict[str, Any]]:
    """Run every unit not already cached, up to `jobs` at once in worker processes (spawned: each
    sets its own torch threads), a unit once the units it needs are done. `on_done(unit, result,
    cached)` after each."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from multiprocessing import get_context

    done: dict[Unit, dict[str, Any]] = {}
    pending = list(units)
    running: dict[Any, tuple[Unit, str]] = {}

    def ready(u: Unit) -> bool:
        return all(Unit(n, u.seed) in done for n in u.needs)

    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        while pending or running:
            for u in [u for u in pending if ready(u)]:
                inputs = inputs_for(u, done)
                key = unit_key(spec, u, inputs)
                cached = load_result(u.folder(work) / "result.json", key)
                pending.remove(u)
                if cached is not None:
                    done[u] = cached
                    on_done(u, cached, True)
                elif len(running) < jobs:
                    running[pool.submit(_worker, run_unit, spec, u, inputs, work, key)] = (u, key)
                else:
                    pending.insert(0, u)
                    break
            if not running:
                if pending and not any(ready(u) for u in pending):
                    raise DuetError(f"grid stuck: {[asdict(u) for u in pending]} wait for units that failed")
                continue
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                u, _key = running.pop(fut)
                done[u] = fut.result()
                on_done(u, done[u], False)
    return done


def _worker(
    run_unit: Callable[[GridSpec, Unit, dict[str, Any], Path], dict[str, Any]],
    spec: GridSpec,
    unit: Unit,
    inputs: dict[str, Any],
    work: Path,
    key: str,
) -> dict[str, Any]:
    import shutil

    # A unit is all or nothing: what an interrupted or untrusted earlier attempt left is removed.
    shutil.rmtree(unit.folder(work), ignore_errors=True)
    t0 = time.perf_counter()
    result = run_unit(spec, unit, inputs, unit.folder(work))
    result.update(key=key, unit=unit.name, seed=unit.seed, inputs=inputs, unit_s=time.perf_counter() - t0)
    save_result(unit.folder(work) / "result.json", result)
    return result


def row_json(row: Row, extra: dict[str, Any]) -> dict[str, Any]:
    return {**row.to_json(), **extra}
