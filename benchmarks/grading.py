"""Grading throughput: responses per second of `grade_many`, one worker against N, side by side.

The responses imitate a GRPO rollout batch over MATH-500 (4 per problem, each behind ~1.5 KB of
reasoning text):
  exact     the gold answer boxed verbatim                      (string fast path)
  variant   an equal answer spelled differently (`27.0`, `...~`)  (math-verify: parse + compare)
  wrong     another problem's answer                            (math-verify, mostly)
  none      a truncated response with an unclosed box           (extraction only)
Every run starts with empty caches (ours and math-verify's) and fresh helper processes, which a
warm-up batch of unrelated pairs starts outside the timing (their start-up time is printed on its
own), so each run does all its comparisons itself. Every run must return the same scores as the
first. CPU-seconds count this process and its helpers: on a shared machine the wall-clock rate
shows the speed-up only as far as free cores allow; the rate per CPU-second shows the overhead.

    python benchmarks/grading.py                          # MATH-500 from $DUETLM_DATA_DIR or ../shared/data
    python benchmarks/grading.py --limit 100 --workers 1,2,4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from duetlm import grading
from duetlm.problems import Problem, load_problems

REASONING = (
    "Let me set up the problem carefully. We have the given quantities and we need to combine them. "
    "First, simplify each part: expanding the product and collecting like terms gives a cleaner form. "
) * 8


def variant(answer: str) -> str:
    """An equal answer that is not the same string, so the string fast path cannot decide it."""
    if answer.lstrip("-").isdigit():
        return answer + ".0"
    return answer + "~"  # a LaTeX space


def cpu_seconds() -> float:
    """CPU time of this process and of its live helper processes (Linux /proc; else this process)."""
    total = sum(os.times()[:2])
    pool = grading._POOL
    if pool is not None:
        tick = os.sysconf("SC_CLK_TCK")
        for helper in list(pool._idle.queue):
            try:
                fields = Path(f"/proc/{helper.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def build_batch(problems: list[Problem]) -> tuple[list[str], list[Problem], list[str]]:
    responses, targets, kinds = [], [], []
    for i, p in enumerate(problems):
        other = problems[(i + 1) % len(problems)].answer
        for kind, text in (
            ("exact", f"{REASONING}\nSo the final answer is $\\boxed{{{p.answer}}}$."),
            ("variant", f"{REASONING}\nTherefore $\\boxed{{{variant(p.answer)}}}$."),
            ("wrong", f"{REASONING}\nThe answer is $\\boxed{{{other}}}$."),
            ("none", f"{REASONING}\nPutting it together, \\boxed{{\\frac{{3}}{{"),
        ):
            responses.append(text)
            targets.append(p)
            kinds.append(kind)
    return responses, targets, kinds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default="math500", help="problems (any load_problems source)")
    parser.add_argument(
        "--data-dir", default=None, help="offline mirror (default $DUETLM_DATA_DIR or ../shared/data)"
    )
    parser.add_argument("--limit", type=int, default=200, help="problems (4 responses each)")
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 2}", help="comma-separated worker counts")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count (the median is shown)")
    args = parser.parse_args()

    data_dir = args.data_dir or os.environ.get("DUETLM_DATA_DIR")
    if data_dir is None:
        data_dir = str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    problems = load_problems(args.source, limit=args.limit, data_dir=data_dir)
    responses, targets, kinds = build_batch(problems)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"{len(responses)} responses over {len(problems)} {args.source} problems; {os.cpu_count()} CPUs")

    warm_problems = [Problem(id=str(k), question="q", answer="\\frac{1}{2}") for k in range(64)]
    warm_responses = [f"\\boxed{{{k}.5}}" for k in range(64)]

    reference: list[float] | None = None
    rates: dict[int, tuple[float, float]] = {}
    for n in workers:
        seconds, cpu, warm_up = [], [], []
        for _ in range(args.repeats):
            # Fresh helpers and empty caches (ours and math-verify's) for every run; the helpers are
            # started by a warm-up batch of unrelated pairs, outside the timing.
            grading.close_helpers()
            start = time.perf_counter()
            grading.grade_many(warm_responses, warm_problems, workers=n)
            warm_up.append(time.perf_counter() - start)
            grading.clear_cache()
            start, start_cpu = time.perf_counter(), cpu_seconds()
            scores = grading.grade_many(responses, targets, workers=n)
            seconds.append(time.perf_counter() - start)
            cpu.append(cpu_seconds() - start_cpu)
            reference = reference or scores
            assert scores == reference, f"workers={n} disagrees with the first run"
        rates[n] = (len(responses) / statistics.median(seconds), len(responses) / statistics.median(cpu))
        print(f"workers={n}: warm-up (imports, {n - 1} helper starts) {statistics.median(warm_up):.2f} s")

    assert reference is not None
    by_kind = {
        k: [s for s, kk in zip(reference, kinds, strict=True) if kk == k] for k in dict.fromkeys(kinds)
    }
    print("accuracy by kind: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in by_kind.items()))
    base = rates[workers[0]][0]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f}; wall-clock rate, and rate per CPU-second (parent + helpers)")
    print(f"{'workers':>8} {'responses/s':>12} {'vs ' + str(workers[0]):>8} {'per CPU-s':>10}")
    for n, (rate, per_cpu) in rates.items():
        print(f"{n:>8} {rate:>12.1f} {rate / base:>7.2f}x {per_cpu:>10.1f}")


if __name__ == "__main__":
    main()
