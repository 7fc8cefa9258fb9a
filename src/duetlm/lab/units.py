"""What one unit of `duetlm lab tables` does (`lab/grid.py` schedules and caches them): a seed's
inference-only baselines on the warm-started pair, or one trained variant, each scored on the test
problems through `duetlm eval`'s `run_eval`, with a per-chain-length breakdown and the compute column
(2 × parameters × generated tokens, M and m together; the forward-pass cost of decoding)."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from duetlm.lab.demo import (
    DemoConfig,
    Row,
    build_data,
    engines_for,
    evaluate,
    read_curves,
    train_config,
    warm_start,
)
from duetlm.lab.grid import (
    BASELINES,
    BY_NAME,
    TRUNCATION_FRACTIONS,
    GridSpec,
    Unit,
    Variant,
    objective_for,
    truncation_name,
)
from duetlm.lab.task import minimal_signal, parse_question


def run_unit(spec: GridSpec, unit: Unit, inputs: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run one unit in this process (a grid worker) and return its result (`grid._worker` saves it)."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = spec.demo_config(unit.seed)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    ws = warm_start(cfg, data, Path(spec.cache), lambda s: None)
    params = {role: ws.info[role]["params"] for role in ("large", "small")}
    ctx = Context(cfg, data, params, folder)
    if unit.name == BASELINES:
        return baselines(ctx, *engines_for(cfg, ws))
    return variant(ctx, BY_NAME[unit.name], inputs, ws)


class Context:
    """What every evaluation of one unit shares."""

    def __init__(self, cfg: DemoConfig, data: Any, params: dict[str, int], folder: Path) -> None:
        self.cfg, self.data, self.params, self.folder = cfg, data, params, folder
        spec = cfg.task.spec()
        self.k = {p.id: parse_question(p.question, spec.modulus).steps for p in data.test}
        self.minimal = {
            p.id: len(minimal_signal(parse_question(p.question, spec.modulus), spec).split())
            for p in data.test
        }

    def score(
        self, name: str, large: Any, small: Any, methods: list[str], **kw: Any
    ) -> dict[str, dict[str, Any]]:
        """`evaluate` into `folder/eval/<name>`, each method's row with compute and per-length breakdown."""
        out = self.folder / "eval" / name
        rows = evaluate(out, self.cfg, large, small, self.data.test, methods, **kw)
        records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line]
        rename = kw.get("rename") or {}
        return {
            r.method: self.describe(
                r, [x for x in records if rename.get(x["method"], x["method"]) == r.method]
            )
            for r in rows
        }

    def describe(self, row: Row, records: list[dict[str, Any]]) -> dict[str, Any]:
        by_k: dict[int, list[dict[str, Any]]] = {}
        for rec in records:
            by_k.setdefault(self.k[rec["problem_id"]], []).append(rec)
        mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
        compute = 2 * (self.params["large"] * row.large_tokens + self.params["small"] * row.small_tokens)
        return {
            **row.to_json(),
            "compute_mflop": compute / 1e6,
            "by_k": {
                str(k): {
                    "problems": len(rs),
                    "accuracy": mean([r["correct"] for r in rs]),
                    "large_tokens": mean([r["large_tokens"] for r in rs]),
                    "signal_words": mean([len(r["signal"].split()) for r in rs]),
                    "minimal_words": mean([self.minimal[r["problem_id"]] for r in rs]),
                }
                for k, rs in sorted(by_k.items())
            },
        }


AT_ONCE = "m alone answering at once"


def baselines(ctx: Context, large0: Any, small0: Any) -> dict[str, Any]:
    """m alone (as it was taught: on `mix`, reasoning itself within its cap), m alone answering at
    once, the original M, budget forcing at 0.4 / 0.6 / 0.8 × T0, prompt-based, DUET untrained."""
    methods = ctx.score("warm", large0, small0, ["small", "original"], rename={"small": "m alone"})
    methods |= ctx.score("at-once", large0, small0, ["small-at-once"], rename={"small-at-once": AT_ONCE})
    t0 = methods["original"]["large_tokens"]
    # Named by the fraction, not the cap: T0 (so the cap) differs by a token between seeds, and a row
    # must hold the same method on every seed to be averaged.
    caps = {truncation_name(f): max(1, round(f * t0)) for f in TRUNCATION_FRACTIONS}
    more = ["prompt", "duet", *sorted({f"truncation:{t}" for t in caps.values()})]
    scored = ctx.score("warm2", large0, small0, more, rename={"duet": "DUET (untrained pair)"})
    methods |= {m: r for m, r in scored.items() if not m.startswith("truncation:")}
    methods |= {name: {**scored[f"truncation:{t}"], "cap": t} for name, t in caps.items()}
    return {"methods": methods, "T0": t0, "truncation_caps": caps, "params": ctx.params}


def variant(ctx: Context, v: Variant, inputs: dict[str, Any], ws: Any) -> dict[str, Any]:
    """Train the variant from the warm start and score the trained weights (DUET's pipeline, or M alone
    for the single-model modes); DUET also scores budget forcing capped at its own mean M tokens."""
    from duetlm.config import TrainConfig
    from duetlm.modes import MODES
    from duetlm.train import DuetTrainer

    cfg = ctx.cfg
    run_dir = ctx.folder / "train"
    d = train_config(cfg, ws, run_dir).model_dump()
    d["mode"], d["schedule"] = v.mode, v.schedule
    objective = objective_for(v, cfg, inputs)
    d["objective"].update(objective)
    d["grpo"].update(v.grpo)
    if not MODES[v.mode].uses_small:
        d["small"] = None
    trainer = DuetTrainer(
        TrainConfig.model_validate(d), train_problems=ctx.data.train, val_problems=ctx.data.val
    )
    t = time.perf_counter()
    trained = trainer.train()
    train_s = time.perf_counter() - t
    if trained.stop_signum is not None:
        raise SystemExit(128 + trained.stop_signum)  # stopped: nothing is saved, the unit reruns
    large0, small0 = engines_for(cfg, ws)
    large1 = trainer.policies["large"].engine
    small1 = trainer.policies["small"].engine if "small" in trainer.policies else small0
    for policy in trainer.policies.values():
        policy.model.eval()
        policy.engine.max_batch_size = cfg.eval.batch_size
    method = "duet" if MODES[v.mode].uses_small else "original"
    methods = ctx.score("trained", large1, small1, [method], rename={method: v.name}, models="trained")
    curves = read_curves(run_dir)
    lam = [x for _, x in curves.get("lambda", [])]
    if v.name == "DUET":
        cap = max(1, round(methods[v.name]["large_tokens"]))
        methods |= ctx.score(
            "truncation",
            large0,
            small0,
            [f"truncation:{cap}"],
            rename={f"truncation:{cap}": "truncation at DUET's tokens"},
        )
    del trainer, large1, small1
    gc.collect()
    return {
        "methods": methods,
        "train_s": train_s,
        "steps": cfg.rl.steps,
        "objective": objective,
        "mean_lambda": sum(lam) / len(lam) if lam else 0.0,
        "curves": curves,
        "params": ctx.params,
    }
