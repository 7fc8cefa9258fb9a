"""The paper's Table 1 and ablations (Figures 6 and 7), reproduced on the lab task.

    python benchmarks/lab_tables.py --output docs/results --steps 40 --seed 0

Reuses `duetlm demo`'s pieces (`duetlm.lab.demo`): the same task, the same held-out test problems, the
same cached warm-started M and m, `evaluate` (which is `duetlm eval`'s `run_eval` with engines in
memory) and `train_config` + `DuetTrainer` (the project's trainer). Every trained variant starts from
the same warm-started pair and trains for `--steps` steps; variants run one after another in this
process. After each variant `results.json`, `tables.md` and `pareto.png` are rewritten, so an
interrupted run still leaves the variants that finished.

Inference-only rows (warm-started pair, greedy): m alone, original M, prompt-based (the paper's concise
instruction), budget forcing at three caps (0.4, 0.6 and 0.8 of the original M's mean tokens, the
lab's analogue of 3072/4096/8192 against a few thousand tokens), DUET with the untrained pair.

Trained rows: DUET; single-model; ThinkPrune (its limits scaled to the lab, see `thinkprune_objective`);
L-GRPO; the ablations −MU (mu_baseline none), −LPS (λ constant), −MU −LPS, frozen m; DUET with
mu_baseline per_rollout as well as per_prompt; and the `global` advantage estimator (algorithm.md §2.1).

Run files (per-sample eval records, trainer metrics) go under `--work`; only summaries go to `--output`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duetlm.lab.demo import (
    DemoConfig,
    Row,
    build_data,
    evaluate,
    plot_pareto,
    quick_config,
    read_curves,
    train_config,
    warm_start,
)


@dataclass
class Variant:
    """One trained run: the trainer's mode/schedule and overrides of the demo's RL config."""

    name: str
    table: str  # "table1" | "ablation" | "global"
    mode: str = "duet"
    schedule: str = "joint"
    objective: dict[str, Any] = field(default_factory=dict)
    grpo: dict[str, Any] = field(default_factory=dict)
    note: str = ""


# −LPS: λ held at this value (the demo's adaptive λ ranges over [0, 0.3]; the paper does not state
# the constant it used).
CONSTANT_LAMBDA = 0.1

VARIANTS: list[Variant] = [
    Variant("DUET", "table1", note="mu_baseline per_prompt (the demo's setting), adaptive λ, grpo"),
    Variant("single-model", "table1", mode="single", note="M alone, r − λL/B, adaptive λ"),
    Variant("ThinkPrune", "table1", mode="thinkprune", note="limits scaled to the lab"),
    Variant("L-GRPO", "table1", mode="lgrpo"),
    Variant("DUET −MU", "ablation", objective={"mu_baseline": "none"}),
    Variant(
        "DUET −LPS",
        "ablation",
        objective={"lambda_schedule": "constant", "lambda_init": CONSTANT_LAMBDA},
        note=f"λ constant at {CONSTANT_LAMBDA}",
    ),
    Variant(
        "DUET −MU −LPS",
        "ablation",
        objective={"mu_baseline": "none", "lambda_schedule": "constant", "lambda_init": CONSTANT_LAMBDA},
    ),
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


def trainer_config(
    cfg: DemoConfig, ws: Any, run_dir: Path, v: Variant, extra_objective: dict[str, Any]
) -> Any:
    """The demo's DUET TrainConfig with the variant's mode, schedule and overrides (validated again)."""
    from duetlm.config import TrainConfig
    from duetlm.modes import MODES

    d = train_config(cfg, ws, run_dir).model_dump()
    d["mode"], d["schedule"] = v.mode, v.schedule
    d["objective"].update({**v.objective, **extra_objective})
    d["grpo"].update(v.grpo)
    if not MODES[v.mode].uses_small:
        d["small"] = None
    return TrainConfig.model_validate(d)


def fmt_table(rows: list[Row], extra: dict[str, dict[str, Any]]) -> str:
    head = "| method | weights | accuracy | M tokens | m tokens | IPT | eval s | train steps | train s |\n"
    head += "|---|---|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in rows:
        e = extra.get(r.method, {})
        lines.append(
            f"| {r.method} | {r.models} | {r.accuracy:.3f} | {r.large_tokens:.1f} | {r.small_tokens:.1f} | "
            f"{'—' if r.ipt is None else f'{r.ipt:.1f}'} | {r.seconds:.1f} | {e.get('steps', '')} | "
            f"{'' if 'train_s' not in e else round(e['train_s'])} |"
        )
    return head + "\n".join(lines) + "\n"


TITLES = {
    "table1": "Table 1: methods (test problems, greedy)",
    "ablation": "Ablations (Figures 6 and 7), per-prompt GRPO advantages",
    "global": "The `global` advantage estimator (algorithm.md §2.1)",
}


def render_markdown(
    header: str,
    rows: list[Row],
    extra: dict[str, dict[str, Any]],
    tables: dict[str, list[str]],
    missing: list[str],
) -> str:
    by = {r.method: r for r in rows}
    md = [f"# {header}\n"]
    for key, title in TITLES.items():
        md.append(f"\n## {title}\n\n" + fmt_table([by[m] for m in tables[key] if m in by], extra))
    if missing:
        md.append(f"\nNot run: {', '.join(missing)}\n")
    return "".join(md)


def merge(parts: list[Path], out: Path) -> dict[str, Any]:
    """One set of tables from several runs of this script (variants split over processes)."""
    loaded = [json.loads((p / "results.json").read_text()) for p in parts]
    rows: list[Row] = []
    extra: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[str]] = {k: [] for k in TITLES}
    fields = ("method", "accuracy", "large_tokens", "small_tokens", "seconds", "models")
    for res in loaded:
        for name, m in res["methods"].items():
            if name not in {r.method for r in rows}:
                rows.append(Row(*(m[f] for f in fields)))
                extra[name] = {k: v for k, v in m.items() if k not in fields and k != "ipt"}
        for key in TITLES:
            tables[key] += [n for n in res["tables"][key] if n not in tables[key]]
    missing = [v.name for v in VARIANTS if v.name not in extra]
    first = next(res for res in loaded if res.get("T0") is not None)
    steps = sorted({res["steps_per_variant"] for res in loaded})
    header = f"Lab tables (seed {first['seed']}, {'/'.join(map(str, steps))} RL steps per trained variant)"
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables.md").write_text(render_markdown(header, rows, extra, tables, missing))
    # Table 1's rows only: the ablations sit on top of DUET's point and would hide the labels.
    table1 = set(tables["table1"]) - {"small"}
    plot_pareto([r for r in rows if r.method in table1], out / "pareto.png")
    merged = {
        **{k: first[k] for k in ("seed", "T0", "truncation_caps", "thinkprune", "constant_lambda", "config")},
        "parts": [
            {
                "dir": str(p),
                "command": r["command"],
                "wall_clock_s": r["wall_clock_s"],
                "steps": r["steps_per_variant"],
            }
            for p, r in zip(parts, loaded, strict=True)
        ],
        "methods": {r.method: {**r.to_json(), **extra.get(r.method, {})} for r in rows},
        "tables": tables,
        "missing": missing,
    }
    (out / "results.json").write_text(json.dumps(merged, indent=2, ensure_ascii=False) + "\n")
    return merged


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="docs/results", help="tables, plot, results.json")
    ap.add_argument("--work", default="runs/lab-tables", help="run files (eval records, trainer runs)")
    ap.add_argument("--steps", type=int, default=40, help="RL steps per trained variant")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="warm-start cache root (default: duetlm's cache dir)")
    ap.add_argument("--only", default=None, help="comma-separated variant names to train (default: all)")
    ap.add_argument(
        "--no-baselines",
        action="store_true",
        help="skip the inference-only rows (to split variants over runs)",
    )
    ap.add_argument("--quick", action="store_true", help="the demo's toy sizes (smoke test)")
    ap.add_argument(
        "--merge", nargs="+", default=None, help="merge these runs' outputs into --output, then stop"
    )
    args = ap.parse_args(argv)
    if args.merge:
        merge([Path(p) for p in args.merge], Path(args.output))
        print((Path(args.output) / "tables.md").read_text())
        return 0

    import torch
    from transformers.utils import logging as hf_logging

    from duetlm.engines.hf import HFEngine
    from duetlm.models import cache_dir, load_model
    from duetlm.train import DuetTrainer

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    cfg = quick_config() if args.quick else DemoConfig()
    cfg.seed = args.seed
    cfg.rl.steps = args.steps
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out, work = Path(args.output), Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    variants = VARIANTS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",")]
        unknown = [w for w in wanted if w not in {v.name for v in VARIANTS}]
        if unknown:
            ap.error(f"unknown variant(s) {unknown}; valid: {[v.name for v in VARIANTS]}")
        variants = [v for v in VARIANTS if v.name in wanted]
    say = lambda s: print(s, flush=True)  # noqa: E731

    data = build_data(cfg)
    ws = warm_start(cfg, data, Path(args.cache) if args.cache else cache_dir(), say)

    def engine(path: Path) -> Any:
        model, tok = load_model(str(path), dtype="float32", device="cpu")
        return HFEngine(model, tok, max_batch_size=cfg.eval.batch_size)

    large0, small0 = engine(ws.large_dir), engine(ws.small_dir)
    rows: list[Row] = []
    extra: dict[str, dict[str, Any]] = {}
    tables: dict[str, list[str]] = {"table1": [], "ablation": [], "global": []}
    missing: list[str] = [v.name for v in VARIANTS]  # until trained

    t0: float | None = None
    caps: list[int] = []
    tp: dict[str, int] = {}
    if args.no_baselines:
        if any(v.mode == "thinkprune" for v in variants):
            ap.error("ThinkPrune's limits are scaled to the original M's tokens: run it with the baselines")
    else:
        say("inference-only baselines on the warm-started pair")
        base = evaluate(work / "eval" / "warm", cfg, large0, small0, data.test, ["small", "original"])
        t0 = next(r for r in base if r.method == "original").large_tokens
        caps = sorted({max(1, round(f * t0)) for f in (0.4, 0.6, 0.8)})
        base += evaluate(
            work / "eval" / "warm2",
            cfg,
            large0,
            small0,
            data.test,
            ["prompt", "duet"] + [f"truncation:{t}" for t in caps],
            rename={"duet": "DUET (untrained pair)"},
        )
        rows += base
        tables["table1"] += [r.method for r in base]
        rollout_cap = cfg.rl.rollout.large.max_new_tokens
        tp = thinkprune_objective(t0, cfg.rl.objective.budget, args.steps, rollout_cap)

    def write() -> None:
        header = f"Lab tables (seed {cfg.seed}, {args.steps} RL steps per trained variant)"
        (out / "tables.md").write_text(render_markdown(header, rows, extra, tables, missing))
        if rows:
            plot_pareto([r for r in rows if r.method != "small"], out / "pareto.png")
        results = {
            "command": " ".join(["python", *sys.argv]),
            "seed": cfg.seed,
            "steps_per_variant": args.steps,
            "threads": cfg.threads,
            "T0": t0,
            "truncation_caps": caps,
            "thinkprune": tp,
            "constant_lambda": CONSTANT_LAMBDA,
            "warm_start": {"large": str(ws.large_dir), "small": str(ws.small_dir), "cached": ws.cached},
            "methods": {r.method: {**r.to_json(), **extra.get(r.method, {})} for r in rows},
            "tables": tables,
            "missing": missing,
            "wall_clock_s": time.perf_counter() - start,
            "config": cfg.model_dump(mode="json"),
        }
        (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    write()
    for v in variants:
        say(f"=== {v.name}: training {args.steps} steps ({v.mode}, {v.schedule}, {v.objective}, {v.grpo})")
        run_dir = work / "train" / v.name.replace(" ", "_").replace("[", "").replace("]", "")
        tc = trainer_config(cfg, ws, run_dir, v, tp if v.mode == "thinkprune" else {})
        trainer = DuetTrainer(tc, train_problems=data.train, val_problems=data.val)
        t = time.perf_counter()
        trained = trainer.train()
        train_s = time.perf_counter() - t
        if trained.stop_signum is not None:
            say(f"{v.name}: stopped by signal; stopping")
            break
        large1 = trainer.policies["large"].engine
        small1 = trainer.policies["small"].engine if "small" in trainer.policies else small0
        for e in (large1, small1):
            e.max_batch_size = cfg.eval.batch_size
        for p in trainer.policies.values():
            p.model.eval()
        method = "duet" if v.mode == "duet" else "original"
        (r,) = evaluate(
            work / "eval" / run_dir.name,
            cfg,
            large1,
            small1,
            data.test,
            [method],
            rename={method: v.name},
            models="trained",
        )
        curves = read_curves(run_dir)
        lam = curves.get("lambda") or []
        extra[v.name] = {
            "steps": trainer.step,
            "train_s": train_s,
            "final_lambda": lam[-1][1] if lam else None,
            "note": v.note,
            "curves": curves,
        }
        rows.append(r)
        tables[v.table].append(v.name)
        missing.remove(v.name)
        if v.name == "DUET":  # naive truncation of the original M capped at DUET's mean M tokens
            b = max(1, round(r.large_tokens))
            if f"truncation:{b}" not in {x.method for x in rows}:
                (rt,) = evaluate(
                    work / "eval" / f"truncation-{b}", cfg, large0, small0, data.test, [f"truncation:{b}"]
                )
                rows.append(rt)
                tables["table1"].append(rt.method)
        say(
            f"{v.name}: accuracy {r.accuracy:.3f}, M tokens {r.large_tokens:.1f}, train {train_s:.0f}s, "
            f"wall-clock so far {time.perf_counter() - start:.0f}s"
        )
        write()
        del trainer, large1, small1
        gc.collect()
    write()
    print((out / "tables.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
