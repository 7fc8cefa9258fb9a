"""A request's n choices in `ContinuousBatcher`: one shared prefill against n separate ones.

`duetlm serve` submits each of a request's n choices as its own batcher request, all with M's one
prompt. Admitted together, equal prompts are prefilled once and the KV cache is copied to each row
(`ContinuousBatcher._admit`). This times an admission of `--n` requests, first with one prompt (shared:
1 prefill row) and then with `--n` different prompts of the same length (what n choices cost without
sharing: `--n` prefill rows), each request generating `--new-tokens` tokens, so the time is mostly
prefill. Both run in one process on one model; the median of `--repeats` alternating runs is shown.

    python benchmarks/shared_prefill.py                                # SmolLM2-135M, 256-token prompt, n 8
    python benchmarks/shared_prefill.py --model tiny --prompt-tokens 64
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def admit_and_finish(batcher, prompts: list[list[int]], sampling) -> float:
    """Seconds from submitting `prompts` together until all are done."""
    start = time.perf_counter()
    futures = [batcher.submit(p, sampling) for p in prompts]
    for f in futures:
        f.result()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny, or any load_model spec")
    ap.add_argument("--n", type=int, default=8, help="choices per request")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).parent))  # benchmarks/continuous.py builds the model
    from continuous import build_model

    from duetlm.engines.base import SamplingParams
    from duetlm.engines.continuous import ContinuousBatcher
    from duetlm.models import SAMPLE_CORPUS

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_model(args.model, "128,4,4", Path(tmp), "cpu", "float32")
    # Random corpus tokens: n + 1 prompts that are surely different from each other.
    corpus = engine.tokenizer.encode(" ".join(SAMPLE_CORPUS), add_special_tokens=False)
    one, *distinct = (random.Random(i).choices(corpus, k=args.prompt_tokens) for i in range(args.n + 1))
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    names = ("shared (1 prompt)", f"separate ({args.n} prompts)")
    times: dict[str, list[float]] = {name: [] for name in names}
    rows: dict[str, int] = dict.fromkeys(names, 0)
    with ContinuousBatcher(engine, max_batch=args.n) as batcher:
        admit_and_finish(batcher, [one] * args.n, sp)  # warm-up
        admit_and_finish(batcher, distinct, sp)
        for _ in range(args.repeats):
            for name, prompts in zip(names, ([one] * args.n, distinct), strict=True):
                before = batcher.stats.prefill_rows
                times[name].append(admit_and_finish(batcher, prompts, sp))
                rows[name] += batcher.stats.prefill_rows - before
    print(
        f"model {args.model}, {args.n} requests of {args.prompt_tokens} prompt tokens admitted together, "
        f"{args.new_tokens} new token(s) each, {args.threads} threads, median of {args.repeats}"
    )
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:<22} {t * 1000:9.1f} ms, {rows[name] / args.repeats:.1f} prefill rows per run")
    shared, separate = med.values()
    print(f"shared / separate: time x{shared / separate:.2f}")


if __name__ == "__main__":
    main()
