"""Load test of `duetlm serve`: continuous batching (optionally with bulk admission), windowed batching and
batching off, side by side.

For each mode, starts `duetlm serve` in its own process on 127.0.0.1 (an ephemeral port), sends
`--requests` chat completions with `--concurrency` in flight (httpx, asyncio), and prints: requests
answered / lost (a lost request is any that did not come back 200 with a signal and an answer),
p50 / p99 latency, throughput, and the batching per stage (from `/health`: for windowed batching the
engine calls and requests per call, for continuous batching the decode steps and rows per step). Then
the ratios of each mode to batching off, and continuous to windowed. Greedy decoding by default, so all
modes do the same work per request.

By default M and m are tiny random Qwen3 / Llama models built on the spot (their outputs are
nonsense, their cost is real); `--large` / `--small` take any model spec (`smollm2-135m`, a directory,
a hub id). Client and server share this machine's CPUs: on a busy machine the figures are noisy.

    python benchmarks/serve_load.py                      # 200 requests, concurrency 16, tiny models
    python benchmarks/serve_load.py --large smollm2-135m --small smollm2-135m --requests 64
    python benchmarks/serve_load.py --stream             # SSE: also when the first signal / answer text came
    python benchmarks/serve_load.py --modes continuous --baseline-rev 542fa3f   # this tree against a commit
    .venv-vllm/bin/python benchmarks/serve_load.py --engine vllm --modes continuous,window  # vLLM async vs offline

`--baseline-rev REV` runs every mode twice in the same command, the second time on the package as it
was at REV (a `git worktree` of it, imported through PYTHONPATH, same virtualenv), and prints the
ratios this tree / REV.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def tiny_models(root: Path) -> tuple[str, str]:
    """A tiny M (Qwen3, 4 layers, hidden 128) and m (Llama, 2 layers, hidden 64), saved under `root`."""
    from duetlm.models import SAMPLE_CORPUS, save_pretrained, tiny_model, train_tokenizer

    tok = train_tokenizer(SAMPLE_CORPUS, vocab_size=320)
    large = tiny_model(tok, arch="qwen3", hidden_size=128, num_layers=4, num_heads=4, seed=1)
    small = tiny_model(tok, arch="llama", hidden_size=64, num_layers=2, num_heads=2, seed=2)
    return str(save_pretrained(large, tok, root / "M")), str(save_pretrained(small, tok, root / "m"))


class Server:
    """`duetlm serve` in a subprocess; `url` is read from uvicorn's start-up line."""

    def __init__(self, args: list[str], threads: int, src: Path | None = None) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        if src is not None:  # another revision's package, ahead of the installed one
            env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
        cmd = [sys.executable, "-m", "duetlm.cli", "serve", "--port", "0", *args]
        self.proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        )
        self.log: list[str] = []
        self._url: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while not self._url:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise SystemExit("duetlm serve did not start:\n" + "".join(self.log[-30:]))
            time.sleep(0.05)
        self.url = self._url[0]

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            found = re.search(r"running on (http://\S+)", line)
            if found:
                self._url.append(found.group(1))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # an engine call still running: no need to wait for it
            self.proc.kill()
            self.proc.wait()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


@dataclass
class LoadResult:
    ok: int
    lost: int
    latencies: list[float]
    wall_s: float
    stages: dict[str, dict[str, float]]
    first_signal: list[float]  # --stream: seconds to the first reasoning_content delta
    first_answer: list[float]  # --stream: seconds to the first content delta

    def pct(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall_s


def questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"What is {rng.randint(1, 999)} + {rng.randint(1, 999)}? Explain briefly." for _ in range(n)]


async def streamed(client: httpx.AsyncClient, body: dict, t0: float, firsts: dict[str, list[float]]) -> bool:
    """One SSE request; records when the first signal and answer deltas came. True if it completed."""
    first: dict[str, float] = {}
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        if r.status_code != 200:
            return False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                for key, t in first.items():
                    firsts[key].append(t)
                return True
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return False
            delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
            for key, field in (("signal", "reasoning_content"), ("answer", "content")):
                if delta.get(field) and key not in first:
                    first[key] = time.perf_counter() - t0
    return False


async def load(
    url: str, qs: list[str], concurrency: int, model: str, stream: bool = False, temperature: float = 0.0
) -> tuple[int, int, list[float], float, dict[str, list[float]]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    firsts: dict[str, list[float]] = {"signal": [], "answer": []}
    lost = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(q: str) -> None:
            nonlocal lost
            async with gate:
                t0 = time.perf_counter()
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": q}],
                    "temperature": temperature,
                }
                if stream:
                    try:
                        done = await streamed(client, body, t0, firsts)
                    except (httpx.HTTPError, ValueError, KeyError):
                        done = False
                    if done:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        lost += 1
                    return
                try:
                    r = await client.post("/v1/chat/completions", json=body)
                    message = r.json()["choices"][0]["message"] if r.status_code == 200 else None
                except (httpx.HTTPError, ValueError, KeyError):
                    message = None
                if message is None or "reasoning_content" not in message or message.get("content") is None:
                    lost += 1
                    return
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(q) for q in qs))
        wall = time.perf_counter() - t0
    return len(latencies), lost, latencies, wall, firsts


def run_mode(serve_args: list[str], args: argparse.Namespace, src: Path | None = None) -> LoadResult:
    server = Server(serve_args, args.threads, src)
    try:
        # Warm-up (first-call allocations), not counted; the stage counters are read as differences.
        asyncio.run(load(server.url, questions(2, seed=99), 2, "duet"))
        before = httpx.get(server.url + "/health").json()["stages"]
        ok, lost, latencies, wall, firsts = asyncio.run(
            load(
                server.url, questions(args.requests), args.concurrency, "duet", args.stream, args.temperature
            )
        )
        after = httpx.get(server.url + "/health").json()["stages"]
    finally:
        server.close()
    stages = {}
    for name in after:
        if "calls" in after[name]:  # windowed: engine calls and requests per call
            calls = after[name]["calls"] - before[name]["calls"]
            reqs = after[name]["requests"] - before[name]["requests"]
            stages[name] = {"calls": calls, "mean_batch": reqs / calls if calls else 0.0}
        else:  # continuous: decode steps and live rows per step (M and m share a batcher if one model)
            stages[name] = {
                "calls": after[name]["steps"] - before[name]["steps"],
                "mean_batch": after[name]["mean_batch"],
            }
    return LoadResult(ok, lost, latencies, wall, stages, firsts["signal"], firsts["answer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", help="M (default: a tiny Qwen3 built on the spot)")
    parser.add_argument("--small", help="m (default: a tiny Llama built on the spot)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument(
        "--modes",
        default="continuous,window,off",
        help="of continuous, bulk, window, off (bulk: continuous, "
        "new requests admitted per --admit-ratio / --admit-max-wait)",
    )
    parser.add_argument(
        "--admit-ratio", type=float, default=1.0, help="bulk: join once waiting >= r x running"
    )
    parser.add_argument("--admit-max-wait", type=int, default=16, help="bulk: ... or after this many steps")
    parser.add_argument("--signal-tokens", type=int, default=32, help="M's thinking cap")
    parser.add_argument("--answer-tokens", type=int, default=32, help="m's answer cap")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy, both modes do the same work"
    )
    parser.add_argument(
        "--stream", action="store_true", help="SSE requests; also time the first signal and answer deltas"
    )
    parser.add_argument("--baseline-rev", help="also run each mode on the package at this git revision")
    parser.add_argument(
        "--engine",
        choices=("hf", "vllm"),
        default="hf",
        help="vllm (from .venv-vllm): continuous = vLLM's async engine, window = its offline engine",
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    large, small = args.large, args.small
    if large is None or small is None:
        tiny_large, tiny_small = tiny_models(Path(tmp.name))
        large, small = large or tiny_large, small or tiny_small
    common = ["--large", large, "--small", small, "--device", "cpu", "--max-queue", str(4 * args.concurrency)]
    common += ["--max-signal-tokens", str(args.signal_tokens), "--max-answer-tokens", str(args.answer_tokens)]
    common += ["--engine", args.engine]
    batch = ["--max-batch", str(args.max_batch)]
    all_modes = {
        "continuous": (f"continuous (B={args.max_batch})", common + batch + ["--batching", "continuous"]),
        "bulk": (
            f"bulk (r={args.admit_ratio:g}, w={args.admit_max_wait})",
            common
            + batch
            + ["--batching", "continuous", "--admit-ratio", str(args.admit_ratio)]
            + ["--admit-max-wait", str(args.admit_max_wait)],
        ),
        "window": (
            f"windowed (B={args.max_batch}, W={args.window_ms:g} ms)",
            common + batch + ["--batching", "window", "--batch-window-ms", str(args.window_ms)],
        ),
        "off": (
            "batching off (B=1)",
            common + ["--max-batch", "1", "--batching", "window", "--batch-window-ms", "0"],
        ),
    }
    modes = dict(all_modes[m] for m in args.modes.split(","))
    print(
        f"duetlm serve load: {args.requests} requests, concurrency {args.concurrency}, M={large}, m={small}, "
        f"signal<={args.signal_tokens}, answer<={args.answer_tokens} tokens, temperature {args.temperature:g}, {args.threads} torch threads, engine {args.engine}"
        + (", streamed (SSE)" if args.stream else "")
    )
    baseline_src = None
    if args.baseline_rev:
        repo = Path(__file__).resolve().parents[1]
        tree = Path(tmp.name) / "baseline"
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), args.baseline_rev], check=True, capture_output=True)  # fmt: skip
        baseline_src = tree / "src"
    results = {}
    try:
        for name, serve_args in modes.items():
            results[name] = run_mode(serve_args, args)
            print(f"  done: {name}", flush=True)
            if baseline_src is not None:
                results[f"{name} @{args.baseline_rev}"] = run_mode(serve_args, args, baseline_src)
                print(f"  done: {name} @{args.baseline_rev}", flush=True)
    finally:
        if baseline_src is not None:
            repo = Path(__file__).resolve().parents[1]
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(baseline_src.parent)], check=False)  # fmt: skip
        tmp.cleanup()

    names = list(results)
    rows = [
        ("answered", lambda r: f"{r.ok}"),
        ("lost", lambda r: f"{r.lost}"),
        ("p50 latency (s)", lambda r: f"{r.pct(0.5):.3f}"),
        ("p99 latency (s)", lambda r: f"{r.pct(0.99):.3f}"),
        *(
            [
                ("p50 first signal delta (s)", lambda r: f"{percentile(r.first_signal, 0.5):.3f}"),
                ("p50 first answer delta (s)", lambda r: f"{percentile(r.first_answer, 0.5):.3f}"),
            ]
            if args.stream
            else []
        ),
        ("mean latency (s)", lambda r: f"{statistics.fmean(r.latencies):.3f}" if r.latencies else "nan"),
        ("throughput (req/s)", lambda r: f"{r.throughput:.2f}"),
        ("wall (s)", lambda r: f"{r.wall_s:.1f}"),
        ("M calls / steps", lambda r: f"{r.stages['large']['calls']}"),
        ("M batch / rows per step", lambda r: f"{r.stages['large']['mean_batch']:.2f}"),
        ("m calls / steps", lambda r: f"{r.stages['small']['calls']}"),
        ("m batch / rows per step", lambda r: f"{r.stages['small']['mean_batch']:.2f}"),
    ]
    width = max(len(n) for n in names) + 2
    print(f"\n{'':28}" + "".join(f"{n:>{width}}" for n in names))
    for label, fmt in rows:
        print(f"{label:28}" + "".join(f"{fmt(results[n]):>{width}}" for n in names))
    print()
    chosen = args.modes.split(",")
    pairs = [("continuous", "off"), ("window", "off"), ("continuous", "window")]
    pairs += [("bulk", "continuous"), ("bulk", "window")]
    for a, b in pairs:
        if a in chosen and b in chosen:
            x, y = results[all_modes[a][0]], results[all_modes[b][0]]
            print(
                f"{a} / {b}: throughput x{x.throughput / y.throughput:.2f}, "
                f"p50 latency x{x.pct(0.5) / y.pct(0.5):.2f}, p99 latency x{x.pct(0.99) / y.pct(0.99):.2f}"
            )
    if args.baseline_rev:
        for name in modes:
            x, y = results[name], results[f"{name} @{args.baseline_rev}"]
            print(
                f"{name}: this tree / {args.baseline_rev}: throughput x{x.throughput / y.throughput:.2f}, "
                f"p50 latency x{x.pct(0.5) / y.pct(0.5):.2f}, p99 latency x{x.pct(0.99) / y.pct(0.99):.2f}"
            )
    lost = {n: r.lost for n, r in results.items() if r.lost}
    if lost:
        raise SystemExit(f"lost requests: {lost}")


if __name__ == "__main__":
    main()
