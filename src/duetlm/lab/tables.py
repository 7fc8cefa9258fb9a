"""`duetlm lab tables`: the paper's Table 1 and ablations on a lab task over seeds, from the cached grid
(`lab/grid.py`, `lab/units.py`): each cell mean ± std over seeds, a compute column beside M tokens, a
per-chain-length breakdown with the minimal sufficient signal, the Pareto plot with seed error bars,
signal length against chain length, and per-variant training curves.

    duetlm lab tables --task mix --seeds 0,1,2 --jobs 2 --output docs/results/mix
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duetlm.lab.grid import (
    BASELINES,
    TRUNCATION_FRACTIONS,
    VARIANTS,
    GridSpec,
    Unit,
    Variant,
    plan,
    run_grid,
    truncation_name,
)

TITLES = {
    "table1": "Table 1: methods (test problems, greedy)",
    "ablation": "Ablations (paper §4.2.4-4.2.5, Figures 6 and 7), per-prompt GRPO advantages",
    "global": "The `global` advantage estimator (algorithm.md §2.1)",
}
BASELINE_ORDER = ["original", "m alone", "m alone answering at once", "prompt", "DUET (untrained pair)"]
STATS = ("accuracy", "large_tokens", "small_tokens", "compute_mflop", "ipt")


@dataclass
class Cell:
    """One statistic of one method over seeds."""

    values: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else float("nan")

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def fmt(self, digits: int) -> str:
        if not self.values:
            return "—"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def aggregate(done: dict[Unit, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """method -> {stat: Cell over seeds, "seeds": [...], "by_k": {k: {stat: Cell}}, "unit": name}."""
    out: dict[str, dict[str, Any]] = {}
    for unit, result in sorted(done.items(), key=lambda kv: (kv[0].seed, kv[0].name)):
        for name, m in result["methods"].items():
            agg = out.setdefault(
                name, {"unit": unit.name, "seeds": [], "by_k": {}, **{s: Cell([]) for s in STATS}}
            )
            agg["seeds"].append(unit.seed)
            for s in STATS:
                if m.get(s) is not None:
                    agg[s].values.append(float(m[s]))
            for k, row in m["by_k"].items():
                cells = agg["by_k"].setdefault(int(k), {})
                for key, value in row.items():
                    cells.setdefault(key, Cell([])).values.append(float(value))
    return out


def order(agg: dict[str, dict[str, Any]], variants: list[Variant]) -> dict[str, list[str]]:
    """The methods of each table, in the paper's order."""
    table1 = [m for m in BASELINE_ORDER if m in agg]
    table1 += [m for m in map(truncation_name, TRUNCATION_FRACTIONS) if m in agg]
    table1 += [m for m in ("truncation at DUET's tokens",) if m in agg]
    tables = {"table1": table1, "ablation": [], "global": []}
    for v in variants:
        if v.name in agg:
            tables[v.table].append(v.name)
    return tables


def _verdict(a: Cell, b: Cell, higher: bool = True) -> str:
    """`a` above `b` (below, with `higher=False`) by more than the larger of their seed spreads:
    reproduced; the other way by more than it: reversed; else within the spread."""
    diff = (a.mean - b.mean) * (1 if higher else -1)
    spread = max(a.std, b.std)
    return "reproduced" if diff > spread else "reversed" if -diff > spread else "within the spread"


def claims(agg: dict[str, dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(claim, the paper's numbers, ours, verdict) for each claim of the paper the grid can test;
    "not run" where a method it needs is missing."""

    def cell(m: str, s: str) -> str:
        return f"{agg[m][s].mean:.3f} ± {agg[m][s].std:.3f}"

    rows = []

    def claim(text: str, paper: str, need: tuple[str, ...], judge: Any) -> None:
        if not all(m in agg for m in need):
            rows.append((text, paper, "—", "not run"))
        else:
            rows.append((text, paper, *judge()))

    paper_acc = {
        "single-model": "0.88 vs 0.82",
        "ThinkPrune": "0.88 vs 0.87",
        "L-GRPO": "0.88 vs 0.92 (not claimed)",
    }
    for other, paper in (
        ("single-model", "0.489 vs 0.390"),
        ("ThinkPrune", "0.489 vs 0.162"),
        ("L-GRPO", "0.489 vs 0.162"),
    ):
        claim(f"DUET's IPT above {other}'s", f"AMC23 IPT {paper}", ("DUET", other),
              lambda o=other: (f"{cell('DUET', 'ipt')} vs {cell(o, 'ipt')}", _verdict(agg["DUET"]["ipt"], agg[o]["ipt"])))  # fmt: skip
        claim(f"DUET's accuracy at least {other}'s", f"AMC23 {paper_acc[other]}", ("DUET", other),
              lambda o=other: (f"{cell('DUET', 'accuracy')} vs {cell(o, 'accuracy')}",
                               _verdict(agg[o]["accuracy"], agg["DUET"]["accuracy"], higher=False)))  # fmt: skip
    claim("DUET keeps the original M's accuracy with fewer M tokens", "AMC23 0.88 at 1800 vs 0.90 at 6948",
          ("DUET", "original"), lambda: (f"{cell('DUET', 'accuracy')} at {agg['DUET']['large_tokens'].mean:.1f} vs "
          f"{cell('original', 'accuracy')} at {agg['original']['large_tokens'].mean:.1f}",
          "reproduced" if agg["DUET"]["accuracy"].mean >= agg["original"]["accuracy"].mean - 0.02
          and agg["DUET"]["large_tokens"].mean <= 0.4 * agg["original"]["large_tokens"].mean else "not reproduced"))  # fmt: skip
    claim("budget forcing at DUET's tokens falls below DUET", "truncation degrades (Table 1)",
          ("DUET", "truncation at DUET's tokens"), lambda: (f"{cell('truncation at DUET' + chr(39) + 's tokens', 'accuracy')} vs "
          f"{cell('DUET', 'accuracy')}", _verdict(agg["DUET"]["accuracy"], agg["truncation at DUET's tokens"]["accuracy"])))  # fmt: skip
    claim("−MU lowers accuracy", "0.85 → 0.67", ("DUET", "DUET −MU"),
          lambda: (f"{cell('DUET −MU', 'accuracy')} vs {cell('DUET', 'accuracy')}", _verdict(agg["DUET"]["accuracy"], agg["DUET −MU"]["accuracy"])))  # fmt: skip
    claim("−LPS close to DUET", "0.82 vs 0.85", ("DUET", "DUET −LPS"), lambda: (
        f"{cell('DUET −LPS', 'accuracy')} vs {cell('DUET', 'accuracy')}",
        "reproduced" if abs(agg["DUET −LPS"]["accuracy"].mean - agg["DUET"]["accuracy"].mean)
        <= max(0.05, agg["DUET −LPS"]["accuracy"].std, agg["DUET"]["accuracy"].std) else "not reproduced"))  # fmt: skip
    claim("−MU −LPS collapses to empty signals", "0.27 at 0 tokens", ("DUET", "DUET −MU −LPS"), lambda: (
        f"{cell('DUET −MU −LPS', 'accuracy')} at {agg['DUET −MU −LPS']['large_tokens'].mean:.1f} tokens",
        "reproduced" if agg["DUET −MU −LPS"]["large_tokens"].mean <= 0.2 * agg["DUET"]["large_tokens"].mean
        and agg["DUET −MU −LPS"]["accuracy"].mean < agg["DUET"]["accuracy"].mean else "not reproduced"))  # fmt: skip
    claim("jointly trained m above a frozen m", "Figure 6: DUET's curve above Fix m", ("DUET", "DUET frozen m"),
          lambda: (f"IPT {cell('DUET', 'ipt')} vs {cell('DUET frozen m', 'ipt')}", _verdict(agg["DUET"]["ipt"], agg["DUET frozen m"]["ipt"])))  # fmt: skip
    return rows


def render_claims(agg: dict[str, dict[str, Any]]) -> str:
    head = "\n## Claims of the paper\n\n| claim | paper | ours (mean ± std over seeds) | verdict |\n|---|---|---|---|\n"
    return head + "\n".join(f"| {c} | {p} | {o} | {v} |" for c, p, o, v in claims(agg)) + "\n"


def render_markdown(header: list[str], agg: dict[str, dict[str, Any]], tables: dict[str, list[str]]) -> str:
    md = ["# " + header[0] + "\n", *[line + "\n" for line in header[1:]]]
    cols = "| method | seeds | accuracy | M tokens | m tokens | compute (MFLOP) | IPT |\n|---|---:|---:|---:|---:|---:|---:|\n"
    for key, title in TITLES.items():
        if not tables[key]:
            continue
        lines = [
            f"| {m} | {len(agg[m]['seeds'])} | {agg[m]['accuracy'].fmt(3)} | {agg[m]['large_tokens'].fmt(1)} | "
            f"{agg[m]['small_tokens'].fmt(1)} | {agg[m]['compute_mflop'].fmt(1)} | {agg[m]['ipt'].fmt(1)} |"
            for m in tables[key]
        ]
        md.append(f"\n## {title}\n\n" + cols + "\n".join(lines) + "\n")
    md.append(render_claims(agg))
    md.append(by_length(agg, [m for key in TITLES for m in tables[key]]))
    return "".join(md)


def by_length(agg: dict[str, dict[str, Any]], methods: list[str]) -> str:
    """Accuracy / M tokens / signal words per chain length k, with the minimal sufficient signal."""
    ks = sorted({k for m in methods for k in agg[m]["by_k"]})
    if len(ks) < 2:
        return ""
    head = "| method | " + " | ".join(f"k = {k}" for k in ks) + " |\n|---|" + "---:|" * len(ks) + "\n"
    any_m = next(m for m in methods if agg[m]["by_k"])
    minimal = (
        "| minimal sufficient signal (words) | "
        + " | ".join(f"{agg[any_m]['by_k'][k]['minimal_words'].mean:.1f}" for k in ks)
        + " |"
    )
    lines = [minimal]
    for m in methods:
        cells = []
        for k in ks:
            c = agg[m]["by_k"].get(k)
            cells.append(
                "—"
                if c is None
                else f"{c['accuracy'].mean:.2f} / {c['large_tokens'].mean:.1f} / {c['signal_words'].mean:.1f}"
            )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    intro = "\n## Per chain length: accuracy / M tokens / signal words (mean over seeds)\n\n"
    return intro + head + "\n".join(lines) + "\n"


def plot_pareto(agg: dict[str, dict[str, Any]], methods: list[str], path: Path) -> None:
    """Accuracy against M tokens, every method, error bars one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for m in methods:
        a = agg[m]
        if not a["large_tokens"].values or a["large_tokens"].mean == 0:
            continue
        marker = "*" if m.startswith("DUET") else "o"
        ax.errorbar(a["large_tokens"].mean, a["accuracy"].mean, xerr=a["large_tokens"].std, yerr=a["accuracy"].std,
                    fmt=marker, ms=9 if marker == "*" else 5, capsize=2, label=m)  # fmt: skip
    ax.set_xlabel("M tokens per problem (greedy)")
    ax.set_ylabel("accuracy (test problems)")
    ax.set_ylim(-0.05, 1.08)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_signal_lengths(agg: dict[str, dict[str, Any]], methods: list[str], path: Path) -> bool:
    """M's thinking (words) against chain length per method, with the minimal-sufficient-signal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({k for m in methods for k in agg[m]["by_k"]})
    if len(ks) < 2:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        pts = [(k, c["signal_words"].mean) for k, c in sorted(agg[m]["by_k"].items())]
        if any(y > 0 for _, y in pts):
            ax.plot([k for k, _ in pts], [y for _, y in pts], "o-", ms=3, label=m)
    any_m = next(m for m in methods if agg[m]["by_k"])
    ax.plot(
        ks,
        [agg[any_m]["by_k"][k]["minimal_words"].mean for k in ks],
        "k--",
        lw=2,
        label="minimal sufficient signal",
    )
    ax.set_xlabel("chain length k")
    ax.set_ylabel("M's signal / thinking (words)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


CURVE_KEYS = (("lambda", "λ"), ("tokens/large_mean", "M tokens"), ("success/guided", "guided success"),
              ("success/unguided", "unguided success"))  # fmt: skip


def plot_curves(done: dict[Unit, dict[str, Any]], path: Path) -> None:
    """Per variant (seeds averaged step by step): λ, M tokens, guided and unguided success."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVE_KEYS), figsize=(4 * len(CURVE_KEYS), 3.4))
    names = [v.name for v in VARIANTS if any(u.name == v.name for u in done)]
    for ax, (key, label) in zip(axes, CURVE_KEYS, strict=True):
        for name in names:
            per_step: dict[int, list[float]] = {}
            for u, r in done.items():
                if u.name == name:
                    for step, value in r.get("curves", {}).get(key, []):
                        per_step.setdefault(int(step), []).append(float(value))
            if per_step:
                steps = sorted(per_step)
                ax.plot(steps, [statistics.fmean(per_step[s]) for s in steps], lw=1, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    out: Path,
    done: dict[Unit, dict[str, Any]],
    variants: list[Variant],
    header: list[str],
    meta: dict[str, Any],
) -> dict[str, Any]:
    """tables.md, results.json (every unit's result and the aggregates) and the three plots."""
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(done)
    tables = order(agg, variants)
    (out / "tables.md").write_text(render_markdown(header, agg, tables))
    methods = [m for key in TITLES for m in tables[key]]
    plot_pareto(agg, methods, out / "pareto.png")
    plot_signal_lengths(agg, methods, out / "signal_lengths.png")
    if any(u.name != BASELINES for u in done):
        plot_curves(done, out / "curves.png")
    summary = {
        name: {
            "seeds": a["seeds"],
            **{s: {"mean": a[s].mean, "std": a[s].std, "values": a[s].values} for s in STATS},
        }
        for name, a in agg.items()
    }
    units = [
        {"unit": u.name, "seed": u.seed, **{k: v for k, v in r.items() if k != "curves"}}
        for u, r in done.items()
    ]
    results = {**meta, "tables": tables, "summary": summary, "units": units}
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False, default=str) + "\n")
    return results


def lab_tables(spec: GridSpec, seeds: list[int], variants: list[Variant], jobs: int, work: Path, out: Path,
               command: str) -> dict[str, Any]:  # fmt: skip
    """Run (or load from `work`) every unit of the grid, then write `out`. Progress: a bar over units."""
    from tqdm import tqdm

    from duetlm.lab.units import run_unit

    start = time.perf_counter()
    units = plan(variants, seeds)
    fresh: list[str] = []
    bar = tqdm(total=len(units), desc="lab tables", unit="run", file=sys.stderr, dynamic_ncols=True)

    def on_done(u: Unit, result: dict[str, Any], cached: bool) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{u.name} seed {u.seed}{' (cached)' if cached else ''}")
        if not cached:
            fresh.append(f"{u.name}@{u.seed}")

    with bar:
        done = run_grid(spec, units, work, jobs, run_unit, on_done)
    wall = time.perf_counter() - start
    header = [
        f"Lab tables: task `{spec.task}`, seeds {', '.join(map(str, seeds))}, {spec.steps} RL steps per trained variant",
        f"Command: `{command}`; wall-clock {wall:.0f} s with {jobs} worker(s) ({len(fresh)} of {len(units)} runs computed, the rest cached).",
        "Each cell: mean ± std over seeds. Compute: 2 × parameters × generated tokens, M and m together, per problem.",
    ]
    meta = {"command": command, "task": spec.task, "seeds": seeds, "steps": spec.steps, "jobs": jobs,
            "wall_clock_s": wall, "computed": fresh, "config": spec.config}  # fmt: skip
    return write_outputs(out, done, variants, header, meta)
