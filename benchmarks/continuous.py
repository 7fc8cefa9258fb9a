"""Continuous against windowed batching: the same seeded Poisson arrival trace replayed through each.

Modes, all over one `HFEngine` and the same model:
- `windowed`: what `duetlm serve --batching window` does (`duetlm.serve.batching.WindowBatcher`). A
  batch opens with the first waiting request, closes after `--window-ms` or at `--max-batch` requests,
  and its requests run as one `HFEngine.generate_ids` call per sampling key (serve batches only
  requests with equal `SamplingParams`; here requests differ in `max_new_tokens`, so a window holds
  several keys, run one after another). The next batch waits until this one is done.
- `windowed-1call`: the same windows, but each runs as one call decoded to the window's longest
  `max_new_tokens`, each output cut to its own length (a stronger baseline than serve's: no per-key
  split; same tokens under greedy decoding).
- `continuous`: `ContinuousBatcher` (requests join and leave the running batch at step boundaries).

Greedy decoding; a random model never emits EOS in these lengths, so every request generates exactly
its `max_new_tokens` in every mode (the script checks that all modes return the same tokens: they do
in fp32; in bf16 the batch's make-up changes the rounding, so a few greedy outputs differ, as they do
between `HFEngine` batched and alone — measured on an H100: 11/16 and 10/16 identical to alone for
HFEngine batched and continuous in bf16, 16/16 for both in fp32).
Latency is completion minus arrival; TTFT is the first generated token minus arrival: from `on_token`
for continuous, and for the windowed modes from `HFEngine.generate_ids(on_token=...)` where the engine
has it (else the batch's end, which is what a non-streaming client sees). Throughput is requests (and
generated tokens) over the span from the first arrival to the last completion. With `--repeats` the
modes take turns and the table shows medians. Ratios are continuous over each windowed mode.

The default model is a tiny random Qwen3 (hidden 128, 4 layers, 320-token vocabulary; its cost is
real, its text nonsense); `--model smollm2-135m` (or any spec `load_model` takes) for a real one.
The offered load is `--rate` requests/s; pick it so the engine is busy (the default is for the tiny
model on 2 CPU threads). CPU timings on a shared machine are noisy: compare ratios from one run.

    python benchmarks/continuous.py                                 # 200 requests, tiny model
    python benchmarks/continuous.py --model smollm2-135m --requests 40 --rate 1 --max-new 8,32
"""

from __future__ import annotations

import argparse
import inspect
import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class Request:
    arrival: float  # seconds after the trace starts
    prompt_ids: list[int]
    sampling: object  # SamplingParams
    first: float = float("nan")  # first generated token, seconds after the trace starts
    done: float = float("nan")
    token_ids: list[int] = field(default_factory=list)


def make_trace(tokenizer, n: int, rate: float, max_new: tuple[int, int], seed: int) -> list[Request]:
    """`n` requests with exponential inter-arrival times (mean 1/rate), prompts of varied lengths
    (1-3 corpus sentences, cut at a random point) and `max_new_tokens` uniform in `max_new`."""
    from duetlm.engines.base import SamplingParams
    from duetlm.models import SAMPLE_CORPUS

    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        text = " ".join(rng.choice(SAMPLE_CORPUS) for _ in range(rng.randint(1, 3)))
        ids = tokenizer.encode(text, add_special_tokens=False)[: rng.randint(4, 120)]
        sp = SamplingParams(temperature=0.0, max_new_tokens=rng.randint(*max_new))
        out.append(Request(t, ids, sp))
    return out


def replay(trace: list[Request], submit: Callable[[Request], None], t0: float) -> None:
    """Call `submit(req)` at each request's arrival time (seconds after `t0`, a perf_counter)."""
    for req in trace:
        delay = t0 + req.arrival - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        submit(req)


def run_continuous(engine, trace: list[Request], max_batch: int) -> None:
    from duetlm.engines.continuous import ContinuousBatcher

    with ContinuousBatcher(engine, max_batch=max_batch) as batcher:
        futures = []
        t0 = time.perf_counter()

        def submit(req: Request) -> None:
            def on_token(tok: int) -> None:
                if not req.token_ids:
                    req.first = time.perf_counter() - t0
                req.token_ids.append(tok)

            fut = batcher.submit(req.prompt_ids, req.sampling, on_token)
            fut.add_done_callback(lambda _f: setattr(req, "done", time.perf_counter() - t0))
            futures.append(fut)

        replay(trace, submit, t0)
        for f in futures:
            f.result()


def run_windowed(engine, trace: list[Request], max_batch: int, window_s: float, one_call: bool) -> None:
    """The serve-style windowed batcher in a worker thread (see the module docstring)."""
    streams = "on_token" in inspect.signature(engine.generate_ids).parameters
    waiting: queue.Queue[Request | None] = queue.Queue()
    t0 = time.perf_counter()

    def call(batch: list[Request], sp) -> None:
        def on_token(row: int, tok: int) -> None:
            if batch[row].first != batch[row].first:  # nan: the row's first token
                batch[row].first = time.perf_counter() - t0

        kwargs = {"on_token": on_token} if streams else {}
        gens = engine.generate_ids([r.prompt_ids for r in batch], sp, **kwargs)
        end = time.perf_counter() - t0
        for r, (g,) in zip(batch, gens, strict=True):
            r.token_ids = g.token_ids[: r.sampling.max_new_tokens]
            r.done = end
            if not streams:
                r.first = end

    def worker() -> None:
        while True:
            first = waiting.get()
            if first is None:
                return
            batch, deadline = [first], time.perf_counter() + window_s
            while len(batch) < max_batch:
                try:
                    nxt = waiting.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    waiting.put(None)
                    break
                batch.append(nxt)
            if one_call:
                longest = max(r.sampling.max_new_tokens for r in batch)
                call(batch, replace(batch[0].sampling, max_new_tokens=longest))
            else:
                groups: dict[object, list[Request]] = {}
                for r in batch:
                    groups.setdefault(r.sampling, []).append(r)
                for sp, group in groups.items():
                    call(group, sp)

    thread = threading.Thread(target=worker)
    thread.start()
    replay(trace, waiting.put, t0)
    waiting.put(None)
    thread.join()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summarise(trace: list[Request]) -> dict[str, float]:
    span = max(r.done for r in trace) - min(r.arrival for r in trace)
    lat = [r.done - r.arrival for r in trace]
    ttft = [r.first - r.arrival for r in trace]
    toks = sum(len(r.token_ids) for r in trace)
    return {
        "req/s": len(trace) / span,
        "tok/s": toks / span,
        "lat p50": pct(lat, 0.5),
        "lat p99": pct(lat, 0.99),
        "ttft p50": pct(ttft, 0.5),
        "ttft p99": pct(ttft, 0.99),
        "span": span,
        "mean lat": statistics.fmean(lat),
    }


def build_model(spec: str, shape: str, folder: Path, device: str, dtype: str):
    """An `HFEngine` over `spec`; `tiny` is a random Qwen3 of `shape` (hidden,layers,heads[,kv,ffn])."""
    from duetlm.engines.hf import HFEngine
    from duetlm.models import SAMPLE_CORPUS, load_model, save_pretrained, tiny_model, train_tokenizer

    if spec == "tiny":
        hidden, layers, heads, *rest = (int(x) for x in shape.split(","))
        tok = train_tokenizer(SAMPLE_CORPUS, vocab_size=320)
        model = tiny_model(
            tok,
            arch="qwen3",
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=rest[0] if rest else None,
            intermediate_size=rest[1] if len(rest) > 1 else None,
            seed=1,
        )
        spec = str(save_pretrained(model, tok, folder / "tiny"))
    model, tok = load_model(spec, dtype=dtype, device=device)
    return HFEngine(model, tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, smollm2-135m, or any load_model spec")
    ap.add_argument(
        "--shape",
        default="128,4,4",
        help="tiny model: hidden,layers,heads[,kv_heads,ffn] (Qwen3-0.6B: 1024,28,16,8,3072)",
    )
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rate", type=float, default=100.0, help="offered load, requests per second")
    ap.add_argument("--max-new", default="8,64", help="max_new_tokens range, lo,hi (uniform)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--window-ms", type=float, default=5.0)
    ap.add_argument("--modes", default="windowed,windowed-1call,continuous")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable on a shared 2-core machine)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="replays per mode, taking turns; medians")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    lo, hi = (int(x) for x in args.max_new.split(","))
    modes = args.modes.split(",")
    runners = {
        "windowed": lambda e, t: run_windowed(e, t, args.max_batch, args.window_ms / 1000, one_call=False),
        "windowed-1call": lambda e, t: run_windowed(
            e, t, args.max_batch, args.window_ms / 1000, one_call=True
        ),
        "continuous": lambda e, t: run_continuous(e, t, args.max_batch),
    }
    unknown = [m for m in modes if m not in runners]
    if unknown:
        sys.exit(f"unknown mode {unknown[0]!r}; valid: {', '.join(runners)}")
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_model(args.model, args.shape, Path(tmp), args.device, args.dtype)
    streams = "on_token" in inspect.signature(engine.generate_ids).parameters
    print(
        f"model {args.model}{f' ({args.shape})' if args.model == 'tiny' else ''} on {args.device} ({args.dtype}), {args.threads} threads; {args.requests} requests, "
        f"Poisson {args.rate}/s (seed {args.seed}), max_new_tokens U[{lo},{hi}], max_batch {args.max_batch}, "
        f"window {args.window_ms} ms; windowed TTFT from {'on_token' if streams else 'batch end'}",
        flush=True,
    )
    # Warm-up: every mode once on a short trace (allocator, kernels, lazy imports).
    for mode in modes:
        runners[mode](engine, make_trace(engine.tokenizer, 8, 1000.0, (2, 4), args.seed + 1))
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    outputs = {}
    for rep in range(args.repeats):  # the modes take turns, so machine noise hits them alike
        for mode in modes:
            trace = make_trace(engine.tokenizer, args.requests, args.rate, (lo, hi), args.seed)
            runners[mode](engine, trace)
            runs[mode].append(summarise(trace))
            outputs[mode] = [r.token_ids for r in trace]
            print(f"  repeat {rep + 1} {mode}: {runs[mode][-1]['req/s']:.1f} req/s", flush=True)
    results = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}

    cols = ["req/s", "tok/s", "lat p50", "lat p99", "ttft p50", "ttft p99"]
    print(f"\n{'mode':<16}" + "".join(f"{c:>10}" for c in cols))
    for mode, r in results.items():
        print(
            f"{mode:<16}"
            + "".join(f"{r[c]:>10.3f}" if c.startswith(("lat", "ttft")) else f"{r[c]:>10.1f}" for c in cols)
        )
    if "continuous" in results:
        for base in [m for m in results if m != "continuous"]:
            c, b = results["continuous"], results[base]
            print(
                f"continuous / {base}: throughput x{c['req/s'] / b['req/s']:.2f}, "
                f"latency p50 x{c['lat p50'] / b['lat p50']:.2f}, p99 x{c['lat p99'] / b['lat p99']:.2f}, "
                f"TTFT p50 x{c['ttft p50'] / b['ttft p50']:.3g}  (below 1 = continuous lower)"
            )
    same = all(o == outputs[modes[0]] for o in outputs.values())
    print(f"all modes returned the same tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
