"""The cascade against DUET, m alone and oracle routing on a lab task, over seeds (issue: cascade).

For each seed: the warm-started pair of the task family (`duetlm.lab.demo.warm_start`, loaded from the
cache that `duetlm lab tables` and `duetlm lab properties` fill), then `duetlm eval`'s `run_eval` on
the test problems, greedy, with DUET, m alone, oracle routing (from the same samples) and the cascade
at every threshold of a sweep. Each seed's run folder holds the evaluation's records, `table.md` and
`pareto.png`; the script prints a table over seeds (mean ± std) and writes it with `results.json`.

    python benchmarks/cascade_lab.py --task mix --seeds 0,1,2 --output docs/results/cascade
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

LOGPROB = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
CONSISTENCY = [0.5, 0.75, 1.0]
VOTES = 4


def methods() -> list[str]:
    out = ["duet", "small", "oracle-route"]
    out += [f"cascade:logprob@{t:g}" for t in LOGPROB]
    out += [f"cascade:consistency@{VOTES}@{t:g}" for t in CONSISTENCY]
    return out


def run_seed(task: str, seed: int, out: Path, cache: Path) -> dict[str, dict[str, float]]:
    from duetlm.evaluate import make_config, run_eval
    from duetlm.lab.demo import build_data, engines_for, task_config, warm_start

    cfg = task_config(task)
    cfg.seed = seed
    data = build_data(cfg)
    ws = warm_start(cfg, data, cache, lambda s: print(s, file=sys.stderr))
    large, small = engines_for(cfg, ws)
    ecfg = make_config(
        large=f"lab M ({task}, seed {seed}, warm start)",
        small=f"lab m ({task}, seed {seed}, warm start)",
        benchmarks=["lab"],
        methods=methods(),
        output=str(out / f"seed{seed}"),
        max_signal_tokens=cfg.eval.max_signal_tokens,
        max_answer_tokens=cfg.eval.max_answer_tokens,
        batch_size=cfg.eval.batch_size,
        seed=seed,
    )
    summary = run_eval(ecfg, large_engine=large, small_engine=small, problems={"lab": data.test})
    caught = called_where_m_wrong(out / f"seed{seed}")
    return {
        m.method: {
            "accuracy": m.accuracy,
            "large_tokens": m.large_tokens,
            "small_tokens": m.small_tokens,
            "large_call_rate": m.large_call_rate if m.large_call_rate is not None else float("nan"),
            "compute_mflop": (m.compute_flops or 0.0) / m.samples / 1e6,  # per problem, M and m
            "called_where_m_wrong": caught.get(m.method, float("nan")),
        }
        for m in summary.metrics
    }


def called_where_m_wrong(folder: Path) -> dict[str, float]:
    """Per routing method: the share of the problems m alone gets wrong on which it called M (the
    "do no harm" check: a cascade must not keep m's wrong answers)."""
    from duetlm.report import read_records

    records = read_records(folder / "results.jsonl")
    wrong = {r.problem_id for r in records if r.method == "small" and r.correct < 1}
    out: dict[str, float] = {}
    for method in {r.method for r in records if r.large_called is not None}:
        calls = [r.large_called for r in records if r.method == method and r.problem_id in wrong]
        out[method] = sum(calls) / len(calls) if calls else float("nan")
    return out


def cell(values: list[float], fmt: str) -> str:
    values = [v for v in values if v == v]  # NaN: not a routing method
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.fmean(values), fmt)} ± {format(sd, fmt)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mix")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--output", default="runs/cascade-lab")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "duetlm"))
    args = ap.parse_args()
    from duetlm.lab.grid import parse_seeds

    seeds = parse_seeds(args.seeds)
    out = Path(args.output)
    t0 = time.perf_counter()
    per_seed = {s: run_seed(args.task, s, out, Path(args.cache)) for s in seeds}
    wall = time.perf_counter() - t0
    # A rerun resumes from the records: the evaluations' own time is what every invocation spent.
    runs = [json.loads((out / f"seed{s}" / "run.json").read_text()).get("invocations", []) for s in seeds]
    eval_s = sum(i.get("wall_s", 0.0) for inv in runs for i in inv)
    order = list(per_seed[seeds[0]])
    stats = (
        "accuracy",
        "large_tokens",
        "small_tokens",
        "large_call_rate",
        "called_where_m_wrong",
        "compute_mflop",
    )
    fmts = (".3f", ".1f", ".1f", ".2f", ".2f", ".1f")
    lines = [
        f"# Cascade on the lab task `{args.task}`: seeds {args.seeds}, warm-started pair, greedy",
        "",
        f"Command: `python benchmarks/cascade_lab.py --task {args.task} --seeds {args.seeds} "
        f"--output {args.output}`; wall-clock {wall:.0f} s for this invocation, "
        f"{eval_s:.0f} s of evaluation in all (the sum over `seed*/run.json`; a rerun resumes from the records).",
        "",
        "| method | accuracy | M tokens | m tokens | M called | M called where m alone is wrong | compute per problem (MFLOP) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m in order:
        cells = [cell([per_seed[s][m][k] for s in seeds], f) for k, f in zip(stats, fmts, strict=True)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    (out / "tables.md").write_text(table)
    results = {"task": args.task, "seeds": seeds, "wall_s": wall, "per_seed": per_seed}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
