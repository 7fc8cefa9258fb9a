"""One single-model GRPO step: duetlm's `single` mode against TRL's `GRPOTrainer`, side by side.

Both train the same tiny random Qwen3 model (fp32, CPU, one process, the same torch thread count) on
the same templated prompts, and each step does the same work:

- generation: `--prompts` prompts x `--n` samples, temperature 1, exactly `--tokens` new tokens per
  sample. Forced length, so the token counts are equal: TRL gets `min_new_tokens = max_new_tokens`
  (its EOS is suppressed), duetlm gets a copy of the model directory whose tokenizer and generation
  config name no EOS (nothing stops a sample before its limit). Both print their mean completion
  length, which must be `--tokens`.
- reward: the same function, `duetlm.grading.grade` of the text after the thinking block, per sample.
- update: one PPO epoch, one optimizer step (AdamW, lr 1e-6, grad clip 1.0) over the whole generation
  batch in micro-batches of `--micro` sequences (TRL: per_device_train_batch_size = micro,
  gradient_accumulation_steps = steps_per_generation = prompts x n / micro; duetlm:
  optim.micro_batch_size = micro, optim.mini_batches = 1). No reference model (TRL beta 0, duetlm
  kl_coef 0), π_old from the generation pass (TRL: detached log-probs, since generation and update are
  aligned; duetlm: the engine's log-probs), token-mean loss (TRL loss_type dapo).
  TRL's settings for CPU (cpu-facts.md): use_vllm=False, use_cpu=True, bf16=False, beta=0.0.

A step is timed from its start to the end of its optimizer step (TRL: `on_step_begin` to `on_step_end`
callbacks; duetlm: `DuetTrainer.train_step`), after one warm-up step per run. Runs alternate
(duetlm, TRL, TRL, duetlm, ...) so slow periods of a shared machine hit both; the medians over all
measured steps and their ratio are printed.

    pip install -e '.[bench]'               # trl==1.16.0
    python benchmarks/grpo_step.py           # 8 prompts x 4 samples x 32 tokens, 3 repeats x 3 steps
    python benchmarks/grpo_step.py --prompts 4 --n 8 --tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data" / "arith.jsonl"


def build_models(root: Path, hidden: int, layers: int) -> tuple[Path, Path]:
    """One random Qwen3 model, saved twice: as is (TRL) and with no EOS anywhere (duetlm)."""
    from transformers.utils import logging as hf_logging

    from duetlm.models import save_pretrained, tiny_corpus, tiny_model, train_tokenizer

    hf_logging.disable_progress_bar()
    tok = train_tokenizer(tiny_corpus(0), vocab_size=384)
    model = tiny_model(
        tok, arch="qwen3", hidden_size=hidden, num_layers=layers, num_heads=max(hidden // 32, 1), seed=1
    )
    normal = save_pretrained(model, tok, root / "trl")
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    tok.eos_token = None
    return normal, save_pretrained(model, tok, root / "duetlm")


def load_problems() -> list:
    from duetlm.problems import load_problems as load

    return load(str(DATA))


def answer_reward(texts: list[str], problems: list) -> list[float]:
    """The reward both frameworks use: r(x, y) of the answer after the thinking block."""
    from duetlm import protocol
    from duetlm.grading import grade

    return [grade(protocol.split_response(t)[1], p) for t, p in zip(texts, problems, strict=True)]


# --------------------------------------------------------------------------------------------------
# duetlm


def duetlm_run(model_dir: Path, run_dir: Path, args: argparse.Namespace) -> tuple[list[float], float]:
    """Seconds of each measured step, and the mean completion length."""
    from duetlm.config import TrainConfig, build_config
    from duetlm.train import DuetTrainer

    cfg = build_config(
        TrainConfig,
        {
            "mode": "single",
            "seed": 0,
            "large": {"path": str(model_dir), "device": "cpu"},
            "data": {"source": str(DATA)},
            "rollout": {
                "batch_size": args.prompts,
                "n": args.n,
                "large": {"temperature": 1.0, "max_new_tokens": args.tokens},
                "engine_batch_size": args.prompts * args.n,
            },
            "objective": {"kl_coef": 0.0, "budget": 1000},
            "grpo": {"loss_agg": "token-mean"},
            "optim": {"lr_large": 1e-6, "micro_batch_size": args.micro, "mini_batches": 1, "grad_clip": 1.0},
            "run": {"steps": 10_000, "dir": str(run_dir), "grading_workers": 1, "threads": args.threads},
            "logging": {"tensorboard": False, "progress": "off", "sample_every": 0, "val_every": 0},
        },
    )
    trainer = DuetTrainer(cfg)
    trainer.setup()
    times, lengths = [], []
    for k in range(1 + args.steps):
        t0 = time.perf_counter()
        outcome = trainer.train_step(trainer.step + 1)
        elapsed = time.perf_counter() - t0
        trainer.step += 1
        if k:
            times.append(elapsed)
            lengths.append(outcome.metrics["tokens/large_mean"])
    return times, statistics.mean(lengths)


# --------------------------------------------------------------------------------------------------
# TRL


def trl_run(model_dir: Path, out_dir: Path, args: argparse.Namespace) -> tuple[list[float], float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from duetlm import protocol

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    problems = load_problems()
    by_id = {p.id: p for p in problems}
    # The exact prompt strings duetlm builds (protocol.large_prompt), so both see the same tokens.
    dataset = Dataset.from_list(
        [{"prompt": protocol.large_prompt(tok, p.question), "pid": p.id} for p in problems]
    )

    def reward(completions: list[str], pid: list[str], **_: object) -> list[float]:
        return answer_reward(completions, [by_id[i] for i in pid])

    reward.__name__ = "answer_reward"
    accumulation = args.prompts * args.n // args.micro
    config = GRPOConfig(
        output_dir=str(out_dir),
        use_cpu=True,
        use_vllm=False,
        bf16=False,
        beta=0.0,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        num_generations=args.n,
        per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_iterations=1,
        max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens},
        temperature=1.0,
        loss_type="dapo",
        max_steps=1 + args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    starts: list[float] = []
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: object, **k: object) -> None:
            starts.append(time.perf_counter())

        def on_step_end(self, *a: object, **k: object) -> None:
            times.append(time.perf_counter() - starts[-1])

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)  # its per-step log dicts would bury the timings
    trainer.train()
    torch.set_num_threads(args.threads)  # in case the Trainer changed it
    lengths = [
        e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e
    ]
    return times[1:], statistics.mean(lengths[1:] or lengths)


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt (the GRPO group)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per sample (forced)")
    parser.add_argument("--micro", type=int, default=8, help="sequences per forward/backward")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per run (after 1 warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for both")
    parser.add_argument("--json", type=Path, help="also write every step time here")
    args = parser.parse_args()
    if (args.prompts * args.n) % args.micro:
        parser.error("--micro must divide prompts x n (both frameworks then run whole micro-batches)")

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    results: dict[str, list[float]] = {"duetlm": [], "trl": []}
    lengths: dict[str, list[float]] = {"duetlm": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trl_dir, duet_dir = build_models(root, args.hidden, args.layers)
        runners = {
            "duetlm": lambda r: duetlm_run(duet_dir, root / f"duet-{r}", args),
            "trl": lambda r: trl_run(trl_dir, root / f"trl-{r}", args),
        }
        for r in range(args.repeats):
            order = ("duetlm", "trl") if r % 2 == 0 else ("trl", "duetlm")
            for name in order:
                times, length = runners[name](r)
                results[name] += times
                lengths[name].append(length)
                print(
                    f"repeat {r + 1} {name:<7} "
                    + " ".join(f"{t:.3f}" for t in times)
                    + f" s/step (mean length {length:.1f})",
                    flush=True,
                )
    med = {k: statistics.median(v) for k, v in results.items()}
    load = os.getloadavg()[0]
    print(
        f"\nsingle-model GRPO step: {args.prompts} prompts x {args.n} samples x {args.tokens} tokens, "
        f"micro-batch {args.micro}, Qwen3 hidden {args.hidden} x {args.layers} layers, fp32, CPU, "
        f"{args.threads} thread(s); median of {len(results['trl'])} steps each; load average {load:.1f}"
    )
    for name in ("duetlm", "trl"):
        print(f"{name:<7} {med[name]:.3f} s/step   completion length {statistics.mean(lengths[name]):.1f}")
    print(f"ratio duetlm / TRL: {med['duetlm'] / med['trl']:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "seconds": results, "load": load})
        )


if __name__ == "__main__":
    main()
