"""A short CUDA check for a GPU machine: the tiny DUET config trains on CUDA with bf16, resumes, and the
HF engine's decode loop is timed against `model.generate` on the same model and prompts.

Part 1 (trainer): builds the tiny M and m (`duetlm init-tiny`), trains `configs/tiny.yaml` on CUDA with
bf16 autocast for 4 steps, resumes the run to 6 steps (`--resume auto`), and prints each step's loss,
reward, λ and seconds from `metrics.jsonl`; it fails if a value is not finite or the resumed run did not
continue at step 5.

Part 2 (engine throughput): a Qwen3-0.6B-shaped model (28 layers, hidden 1024, the real Qwen3 vocabulary
of 151,936 tokens; random weights, since the hub is out of reach — speed does not depend on the weights)
in bf16 decodes greedily `--new-tokens` tokens for batches of 1, 16 and 64 prompts; `HFEngine.generate_ids`
(duetlm's rollout loop: log-probs on, finished rows dropped) against `model.generate` (transformers,
`min_new_tokens` = `max_new_tokens` so both decode the same number of tokens), each after a warm-up,
taking turns. It prints tokens per second and the ratio.

    python benchmarks/cuda_check.py                 # both parts
    python benchmarks/cuda_check.py --skip-train --new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def duetlm(*args: str, cwd: Path) -> None:
    """Run the duetlm CLI in a subprocess (the user's own command line)."""
    cmd = [sys.executable, "-c", "from duetlm.cli import app; app()", *args]
    print("$ duetlm " + " ".join(args), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def train_check(work: Path, device: str) -> None:
    (work / "configs" / "data").mkdir(parents=True)
    for name in ("configs/tiny.yaml", "configs/data/arith.jsonl"):
        (work / name).write_bytes((ROOT / name).read_bytes())
    duetlm("init-tiny", "runs/tiny-models", cwd=work)
    common = [
        "--config", "configs/tiny.yaml",
        "--set", f"large.device={device}", "--set", f"small.device={device}",
        "--set", "optim.autocast=bf16", "--set", "run.save_every=2",
    ]  # fmt: skip
    t0 = time.perf_counter()
    duetlm("train", *common, "--set", "run.steps=4", cwd=work)
    t1 = time.perf_counter()
    duetlm("train", *common, "--set", "run.steps=6", "--resume", "auto", cwd=work)
    t2 = time.perf_counter()
    rows = [json.loads(line) for line in (work / "runs/tiny/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r and "large/loss" in r]
    keys = ["step", "large/loss", "small/loss", "large/grad_norm", "reward/large", "lambda", "time/step_s"]
    print(f"\ntrain: 4 steps in {t1 - t0:.1f} s, resume to 6 in {t2 - t1:.1f} s (process start included)")
    print(" | ".join(keys))
    for r in steps:
        print(" | ".join(f"{r.get(k, float('nan')):.4g}" if k != "step" else str(r[k]) for k in keys))
    bad = [
        (r["step"], k, v)
        for r in steps
        for k, v in r.items()
        if isinstance(v, float) and not math.isfinite(v)
    ]
    assert not bad, f"non-finite metrics: {bad[:5]}"
    seen = [r["step"] for r in steps]
    assert seen and max(seen) == 6 and 5 in seen, f"steps logged: {seen}"
    # Where a step's time goes (mean over the steps after the first, which pays CUDA's start-up).
    later = [r for r in steps if r["step"] > 1]
    phases = sorted(k for k in later[0] if k.startswith("time/") and k != "time/step_s")
    print("phase seconds per step (mean of steps 2-6): " + ", ".join(
        f"{k.removeprefix('time/').removesuffix('_s')} {sum(r[k] for r in later) / len(later):.3f}" for k in phases
    ))  # fmt: skip
    cfg = work / "runs/tiny/config.yaml"
    print(f"resolved config written: {cfg.exists()}; steps logged: {seen}")


def engine_check(new_tokens: int, batches: list[int], device: str, repeats: int = 2) -> None:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from duetlm.engines.base import SamplingParams
    from duetlm.engines.hf import HFEngine
    from duetlm.models import qwen3_tokenizer

    tok = qwen3_tokenizer()
    cfg = Qwen3Config(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
        tie_word_embeddings=True, eos_token_id=151645, pad_token_id=151643,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(device, torch.bfloat16).eval()
    print(f"\nmodel: Qwen3-0.6B shape, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, bf16")
    engine = HFEngine(model, tok, max_batch_size=256)
    engine.eos_ids = frozenset()  # random weights: decode exactly new_tokens, like min_new_tokens below
    question = "Solve for x: 2x + 3 = 11. Show the steps briefly, then give the answer."
    base = tok.encode(question, add_special_tokens=False)
    sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, logprobs=True)

    def run_engine(prompts: list[list[int]]) -> int:
        out = engine.generate_ids(prompts, sp)
        return sum(g.num_tokens for gs in out for g in gs)

    def run_generate(prompts: list[list[int]]) -> int:
        ids = torch.tensor(prompts, device=device)
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=151643,
        )  # fmt: skip
        return (out.shape[1] - ids.shape[1]) * ids.shape[0]

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn, prompts) -> float:
        sync()
        t = time.perf_counter()
        n = fn(prompts)
        sync()
        return n / (time.perf_counter() - t)

    print("batch | duetlm HFEngine tok/s | model.generate tok/s | ratio")
    for b in batches:
        prompts = [base[:-1] + [base[-1] + (i % 7)] for i in range(b)]  # same length, distinct rows
        run_engine(prompts[:2])
        run_generate(prompts[:2])
        eng, hf = [], []
        for _ in range(repeats):
            eng.append(timed(run_engine, prompts))
            hf.append(timed(run_generate, prompts))
        e, h = max(eng), max(hf)
        print(f"{b} | {e:.0f} | {h:.0f} | x{e / h:.2f}", flush=True)
    if device.startswith("cuda"):
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per engine and batch (best kept)")
    parser.add_argument("--device", default="cuda", help="cuda (the point); cpu only to try the script")
    args = parser.parse_args()
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO CUDA'}")  # fmt: skip
    if not args.skip_train:
        with tempfile.TemporaryDirectory() as tmp:
            train_check(Path(tmp), args.device)
    if not args.skip_engine:
        engine_check(args.new_tokens, [int(b) for b in args.batches.split(",")], args.device, args.repeats)


if __name__ == "__main__":
    main()
