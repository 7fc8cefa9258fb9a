"""Seconds per warm-start step of the lab's M and m at 1 and 2 torch threads, side by side.

`duetlm demo` defaults to `threads: 1`. This shows what a second thread buys on the machine at hand:
each configuration runs `--steps` SFT steps (after `--warmup` untimed ones) on the demo's own models
and batches, the configurations interleaved round by round so that a change in the machine's load hits
all of them alike; it prints the median seconds per step and the ratio to 1 thread.

    python benchmarks/lab_warmstart.py                 # M and m, 1 and 2 threads, 3 rounds of 10 steps
    python benchmarks/lab_warmstart.py --rounds 5 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from duetlm.lab.demo import DemoConfig
from duetlm.lab.recipes import build_model, build_tokenizer
from duetlm.lab.warmstart import SFTConfig, example_stream, large_example, sft, small_example


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()

    cfg = DemoConfig()
    spec = cfg.task.spec()
    tok = build_tokenizer(spec)
    roles = {
        "M": (cfg.large, cfg.warm_large, large_example),
        "m": (cfg.small, cfg.warm_small, small_example),
    }
    setups = {}
    for role, (recipe, warm, make) in roles.items():
        for threads in args.threads:
            model = build_model(tok, recipe, seed=0)
            stream = example_stream(tok, make, spec, seed=0)
            setups[(role, threads)] = (model, stream, warm)
    times: dict[tuple[str, int], list[float]] = {key: [] for key in setups}
    for _ in range(args.rounds):
        for (role, threads), (model, stream, warm) in setups.items():
            torch.set_num_threads(threads)
            run = SFTConfig(**{**warm.model_dump(), "steps": args.warmup + args.steps})
            logs = sft(model, tok, stream, run)
            t = [
                b.seconds - a.seconds
                for a, b in zip(logs[args.warmup :], logs[args.warmup + 1 :], strict=False)
            ]
            times[(role, threads)] += t
    for role in roles:
        base = statistics.median(times[(role, args.threads[0])])
        for threads in args.threads:
            med = statistics.median(times[(role, threads)])
            print(
                f"{role}: {threads} thread(s) {med:.3f} s/step "
                f"(batch {roles[role][1].batch_size}), x{base / med:.2f} vs {args.threads[0]}",
                flush=True,
            )
    print(f"measured {time.strftime('%H:%M:%S')}; on a shared machine rerun and compare")


if __name__ == "__main__":
    main()
