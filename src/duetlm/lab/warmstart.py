"""Supervised warm start of the lab's M and m (the "cold start" before RL), and its cache.

- M learns problem -> verbose thinking -> answer, in the chat-and-thinking format of real reasoning
  models: `protocol.large_prompt(tok, x)` + `<think>\\n{trace}\\n</think>\\n\\n\\boxed{v}<|im_end|>`
  (the template leaves the thinking block to the model, as Qwen3's does).
- m learns (problem, signal) -> answer: `protocol.small_prompt(tok, x, z)` + `\\boxed{v}<|im_end|>`, with
  z none, full, cut after step n-1 (m then writes the last step itself before its box), or cut at a
  random word, over traces of random verbosity (the signals M will hand it before, during and after
  RL); the loss also covers the signal's words (`small_example`).

`sft` is a plain loop: fresh problems every step (no epochs, nothing to overfit), loss on the
assistant tokens only, AdamW, linear warm-up then cosine decay (the prototype spiked and forgot without
decay; cpu-facts.md), bf16 autocast where the CPU has bf16 units (about 2x there; emulated bf16 elsewhere is 14x slower).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from pydantic import Field

from duetlm import protocol
from duetlm.config import Strict
from duetlm.lab.task import (
    Chain,
    TaskSpec,
    answer_text,
    sample_chain,
    stop_early,
    trace_style,
    verbose_blocks,
)
from duetlm.models import resolve_autocast

Example = tuple[str, str]  # (prompt, completion): loss on the completion only


class SFTConfig(Strict):
    """One warm-start run."""

    steps: int = Field(400, ge=1, description="optimizer steps")
    batch_size: int = Field(32, ge=1, description="examples per step")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr x this")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    bf16: bool | Literal["auto"] = Field(
        "auto",
        description="bf16 autocast for forward/backward (weights stay fp32); auto: where the CPU computes "
        "bf16 natively (AVX512-BF16 / AMX), since emulated bf16 is many times slower",
    )


def large_completion(trace: str, value: int) -> str:
    return f"{protocol.THINK_OPEN}\n{trace}\n{protocol.THINK_CLOSE}\n\n{answer_text(value)}"


def large_example(tok: Any, rng: random.Random, chain: Chain, spec: TaskSpec) -> Example:
    """M's example: verbose thinking (sometimes stopped early, `TaskSpec.p_stop`), then the answer."""
    blocks = stop_early(rng, verbose_blocks(rng, chain, trace_style(rng, spec)), spec)
    trace = " ".join(w for b in blocks for w in b)
    return protocol.large_prompt(tok, chain.question()), large_completion(trace, chain.answer)


def small_target(
    rng: random.Random, chain: Chain, spec: TaskSpec, p_none: float = 0.15
) -> tuple[str | None, str]:
    """(signal, m's answer) for one of m's warm-start examples.

    The signal is what M may hand m before, during and after RL: none, or a trace (concise, or of
    random verbosity) that is complete, stops after step n-1, or is cut at a random word. m's answer:
    `\\boxed{v}` when the signal is complete or lacks an earlier value (then v is m's best guess); when
    it holds the value after step n-1 but not the last one, m first writes the missing words of the last
    step (`S6 *4 8 \\boxed{8}`): the division of labour, m finishing the one easy step itself.
    """
    answer = answer_text(chain.answer)
    if rng.random() < p_none:
        return None, answer
    if rng.random() < 0.3:
        loose = replace(spec, p_open=0.0, p_restate=0.0, p_check=0.0, p_hesitate=0.0)
    else:
        loose = replace(
            spec,
            p_open=rng.random() * 0.9,
            p_restate=rng.random() * 0.9,
            p_check=rng.random() * 0.9,
            p_hesitate=rng.random() * 0.9,
        )
    blocks = verbose_blocks(rng, chain, loose)
    words = [w for b in blocks for w in b]
    n = chain.steps
    starts = []  # where the necessary words of each step begin in `words`
    offset = 0
    for i, block in enumerate(blocks):
        if i:
            starts.append(offset + block.index(f"S{i}"))
        offset += len(block)
    width = len(chain.step_words(n))
    end_prev, end_last = starts[n - 2] + width, starts[n - 1] + width
    r = rng.random()
    if r < 0.35:
        keep = len(words)
    elif r < 0.75:
        keep = len(words) - len(blocks[-1])  # through step n-1 and its filler
    else:
        keep = rng.randrange(len(words) + 1)
    signal = " ".join(words[:keep])
    if end_prev <= keep < end_last:
        finish = chain.step_words(n)[max(0, keep - starts[n - 1]) :]
        return signal, " ".join([*finish, answer])
    return signal, answer


def _loose(rng: random.Random, spec: TaskSpec) -> TaskSpec:
    """The verbosity of a signal m may receive: concise (30%), or each filler probability uniform in
    [0, 0.9) (what M hands m before, during and after RL)."""
    if rng.random() < 0.3:
        return replace(spec, p_open=0.0, p_restate=0.0, p_check=0.0, p_hesitate=0.0)
    return replace(
        spec,
        p_open=rng.random() * 0.9,
        p_restate=rng.random() * 0.9,
        p_check=rng.random() * 0.9,
        p_hesitate=rng.random() * 0.9,
    )


def missing_words(blocks: list[list[str]], chain: Chain, keep: int) -> list[str]:
    """The necessary words (`Chain.step_words`) that the first `keep` words of the trace `blocks`
    (`verbose_blocks`) do not yet hold: the rest of the step the cut falls in, then every later step."""
    offset = len(blocks[0])
    for i in range(1, chain.steps + 1):
        start = offset + blocks[i].index(f"S{i}")  # hesitations come first; they never name a step
        if keep < start + len(chain.step_words(i)):
            rest = chain.step_words(i)[max(0, keep - start) :]
            return rest + [w for j in range(i + 1, chain.steps + 1) for w in chain.step_words(j)]
        offset += len(blocks[i])
    return []


def small_target_capped(
    rng: random.Random, chain: Chain, spec: TaskSpec, p_none: float = 0.2
) -> tuple[str | None, str]:
    """(signal, m's answer) for the `mix` family, where m's answer cap `spec.small_cap` limits m: m's
    best shot within it. The signal is none, a complete trace, a trace stopped after a random step, or
    one cut at a random word (random verbosity). m's answer: the necessary words the signal lacks, then
    `\\boxed{v}`, when they fit within the cap; otherwise `\\boxed{v}` at once (m's best guess, since
    it cannot write the chain out)."""
    assert spec.small_cap is not None
    answer = answer_text(chain.answer)
    if rng.random() < p_none:
        signal, missing = None, chain.necessary_trace().split()
    else:
        blocks = verbose_blocks(rng, chain, _loose(rng, spec))
        words = [w for b in blocks for w in b]
        r = rng.random()
        if r < 0.3:
            keep = len(words)
        elif r < 0.8:  # stopped after step j (0..k-1), its filler included
            keep = sum(len(b) for b in blocks[: 1 + rng.randrange(chain.steps)])
        else:
            keep = rng.randrange(len(words) + 1)
        signal, missing = " ".join(words[:keep]), missing_words(blocks, chain, keep)
    if missing and len(missing) + 1 <= spec.small_cap:
        return signal, " ".join([*missing, answer])
    return signal, answer


def small_example(
    tok: Any, rng: random.Random, chain: Chain, spec: TaskSpec, signal_loss: bool = True
) -> Example:
    """m's example. `signal_loss`: the loss also covers the signal's words, so m learns each step's
    arithmetic from the whole trace rather than from one answer token (denser supervision: without it
    a 1M-parameter m stayed at chance after 400 steps, with it it copies complete signals after 250)."""
    target_of = small_target if spec.small_cap is None else small_target_capped
    signal, target = target_of(rng, chain, spec)
    prompt = protocol.small_prompt(tok, chain.question(), signal)
    if not signal_loss:
        return prompt, target
    block = protocol.thinking_block(signal or "")
    assert prompt.endswith(block)
    return prompt[: -len(block)], block + target


def example_stream(
    tok: Any,
    make: Callable[[Any, random.Random, Chain, TaskSpec], Example],
    spec: TaskSpec,
    seed: int,
    exclude: frozenset[str] = frozenset(),
) -> Callable[[int], list[Example]]:
    """`batch(k)`: k fresh examples from random problems (never one whose question is in `exclude`)."""
    rng = random.Random(seed)

    def batch(k: int) -> list[Example]:
        out = []
        while len(out) < k:
            chain = sample_chain(rng, spec)
            if chain.question() not in exclude:
                out.append(make(tok, rng, chain, spec))
        return out

    return batch


def collate(tok: Any, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, T); labels are -100 outside the
    completions, and every completion ends with the EOS token (`<|im_end|>`)."""
    rows = []
    for prompt, completion in examples:
        p = tok.encode(prompt, add_special_tokens=False)
        c = tok.encode(completion, add_special_tokens=False) + [tok.eos_token_id]
        rows.append((p, c))
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[r, :n] = torch.tensor(p + c)
        mask[r, :n] = 1
        labels[r, len(p) : n] = torch.tensor(c)
    return ids, mask, labels


def lr_factor(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up to 1, then cosine down to `min_lr_ratio` at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class SFTLog:
    step: int
    loss: float
    lr: float
    seconds: float


def sft(
    model: Any,
    tok: Any,
    batch: Callable[[int], list[Example]],
    cfg: SFTConfig,
    on_step: Callable[[SFTLog], None] | None = None,
) -> list[SFTLog]:
    """Supervised fine-tuning of `model` on `batch(cfg.batch_size)` for `cfg.steps` steps."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    logs: list[SFTLog] = []
    bf16 = resolve_autocast(cfg.bf16, "cpu")
    start = time.perf_counter()
    for step in range(cfg.steps):
        ids, mask, labels = collate(tok, batch(cfg.batch_size))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and ids.device.type == "cpu"):
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        # Next-token loss on the completion tokens only, in fp32.
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        log = SFTLog(step, loss.item(), sched.get_last_lr()[0], time.perf_counter() - start)
        logs.append(log)
        if on_step is not None:
            on_step(log)
    model.eval()
    return logs
