"""The lab's procedural task: chained modular arithmetic, built so that DUET has something to learn.

A problem is a start digit and `steps` operations (`+d`, `-d`, `*d`) applied in order, modulo `modulus`.
Two ways of writing it (`TaskSpec.style`):

    merged   question  "7 S1+4 S2*7 S3-2 S4*3 S5+9 S6*3"
             necessary "S1 1 S2 7 S3 5 S4 5 S5 4 S6 2"          (step name, value after the step)
    split    question  "7 S1 +4 S2 *7 S3 -2 S4 *3 S5 +9 S6 *3"
             necessary "S1 +4 1 S2 *7 7 ... S6 *3 2"            (step name, operand copied, value)
    answer   "\\boxed{2}"

Why it has the properties DUET needs (measured figures in the README's demo section):
- A ~1M-parameter model cannot chain `steps` lookups in one forward pass, so m alone is near the
  "guess from the last operation" rate, while M writing the values out one per step gets them right:
  M needs its chain of thought.
- One step is easy: given the value after step n-1, m finishes the last step itself. So the shortest
  sufficient signal is shorter than M's full reasoning: real division of labour.
- M's warm-start traces are verbose the way reasoning models are (`verbose_blocks`): a restatement of
  the start, and around every step a restatement of the value, a re-check and hesitations of random
  length, so a much shorter sufficient signal exists; the filler is spread evenly, so cutting the trace
  early loses steps (naive truncation fails).
- Every step names itself ("S3"), so finding the operand of step i is a match against the question,
  not a count of operators (the count is what kept a prototype's warm start near chance for minutes).
- Difficulty is `steps` (and `modulus`).

The second family, `mix` (`TaskSpec.min_steps`, `small_cap`, `p_stop`), is where DUET's own claims can
show or fail (`lab/properties.py` measures what follows):
- mixed difficulty: each problem's chain length k is drawn uniformly from `min_steps..steps`;
- m's limit is a budget asymmetry, like the paper's (m's 2,048-token answer cap against M's 16,384 of
  thinking): m may write `small_cap` tokens, room for `small_steps(spec)` steps of its own reasoning in
  the lab's step format before its `\boxed{}`. m is taught to reason itself as far as that cap allows
  (`warmstart.small_target_capped`), so m alone solves the short chains and guesses on the long ones,
  and the shortest sufficient signal (`minimal_signal`) stops `small_steps` steps before the end:
  empty where m can do the whole problem alone;
- M's warm-start traces are verbose on every problem, the short ones included, and a share `p_stop`
  of them stops after a random earlier step (then guesses), so RL has shorter stops to find.

All words are whitespace-separated, so the word-level tokenizer (`duetlm.models.train_tokenizer(kind=
"word")`) gives one token per word.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

from duetlm.errors import DataError
from duetlm.problems import Problem

OPS = ("+", "-", "*")
STYLES = ("merged", "split")
# Filler words of the verbose traces, listed once: the tokenizer's vocabulary must hold every word.
FILLER_WORDS = ("start", "at", "so", "check", "hmm", "wait", "ok")
HESITATIONS = ("hmm", "wait", "ok")
# The `mix` family (module docstring): chain lengths 2..6; m's 10-token answer cap holds 3 of its own
# steps (3 words each) and the box, so m alone solves k <= 3 (2 of the 5 lengths) and guesses above.
MIX_TASK = {"steps": 6, "min_steps": 2, "small_cap": 10, "p_stop": 0.2}
_NUMBER = re.compile(r"^\d+$")


@dataclass(frozen=True)
class TaskSpec:
    """The task family. `steps`: operations per problem (difficulty). `style`: how steps are written
    (module docstring). Verbosity of M's warm-start traces: `p_open` (restate the start), `p_restate`
    (`so v` after a step), `p_check` (`check S_i v`), `p_hesitate` (`hmm`, then geometric(`p_more`) more of
    `hmm`/`wait`/`ok`, before a step). `p_terse`: the share of traces written tersely, each filler
    probability drawn uniformly below its default (reasoning models are sometimes brief too; without
    such traces M's arithmetic faltered once RL had stripped the filler it always saw).

    Mixed difficulty (the `mix` family, module docstring): `min_steps` (chain lengths `min_steps..steps`),
    `small_cap` (m's answer cap in tokens, the budget that limits m's own reasoning; None: the classic
    rule, m taught to finish the last step only), `p_stop` (share of M's warm-start traces that stop after
    a random earlier step).

    Greedy decoding follows every choice made with probability above 1/2, so the defaults make the
    warm-started M's greedy trace about the longest one (`hmm S_i op v so v check S_i v` per step),
    while sampled traces are shorter on average."""

    steps: int = 6
    modulus: int = 10
    style: str = "split"
    p_open: float = 0.8
    p_restate: float = 0.7
    p_check: float = 0.6
    p_hesitate: float = 0.6
    p_more: float = 0.35
    p_terse: float = 0.25
    min_steps: int | None = None
    small_cap: int | None = None
    p_stop: float = 0.0

    def __post_init__(self) -> None:
        if self.min_steps is None and self.steps < 2:
            raise ValueError(f"steps must be >= 2 (m finishes the last one), got {self.steps}")
        if self.min_steps is not None and not 1 <= self.min_steps <= self.steps:
            raise ValueError(f"min_steps must be in [1, steps={self.steps}], got {self.min_steps}")
        if self.small_cap is not None and self.small_cap < 1:
            raise ValueError(f"small_cap (m's answer cap, tokens) must be >= 1, got {self.small_cap}")
        if not 0.0 <= self.p_stop < 1.0:
            raise ValueError(f"p_stop must be in [0, 1), got {self.p_stop}")
        if not 3 <= self.modulus <= 100:
            raise ValueError(f"modulus must be in [3, 100], got {self.modulus}")
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}; use one of {', '.join(STYLES)}")
        for name in ("p_open", "p_restate", "p_check", "p_hesitate", "p_more", "p_terse"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}")

    @property
    def lengths(self) -> range:
        """The chain lengths k of the family (one length unless `min_steps` mixes them)."""
        return range(self.steps if self.min_steps is None else self.min_steps, self.steps + 1)

    @property
    def words_per_step(self) -> int:
        """Necessary words of one step: name and value (merged), name, operand and value (split)."""
        return 2 if self.style == "merged" else 3

    def operand_digits(self, op: str) -> range:
        # No identity steps (+0, -0, *1) and no *0, which would erase the chain: every step matters.
        return range(2, self.modulus) if op == "*" else range(1, self.modulus)

    def operands(self) -> list[str]:
        return [f"{op}{d}" for op in OPS for d in self.operand_digits(op)]

    def vocabulary(self) -> list[str]:
        """Every word a question, a trace or an answer of this task can contain."""
        names = [f"S{i}" for i in range(1, self.steps + 1)]
        if self.style == "merged":
            operands = [f"{name}{o}" for name in names for o in self.operands()]
        else:
            operands = self.operands()
        numbers = [str(v) for v in range(self.modulus)]
        answers = [answer_text(v) for v in range(self.modulus)]
        return numbers + names + operands + answers + list(FILLER_WORDS)


@dataclass(frozen=True)
class Chain:
    """One problem: `start`, then `ops[i] = (op, d)` applied in order modulo `modulus`."""

    start: int
    ops: tuple[tuple[str, int], ...]
    modulus: int = 10
    style: str = "merged"

    @property
    def steps(self) -> int:
        return len(self.ops)

    def values(self) -> list[int]:
        """v_1..v_n: the value after each step (the intermediate results M must write out)."""
        out, v = [], self.start
        for op, d in self.ops:
            v = (v + d) if op == "+" else (v - d) if op == "-" else (v * d)
            v %= self.modulus
            out.append(v)
        return out

    @property
    def answer(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        sep = "" if self.style == "merged" else " "
        return " ".join([str(self.start)] + [f"S{i}{sep}{op}{d}" for i, (op, d) in enumerate(self.ops, 1)])

    def step_words(self, i: int) -> list[str]:
        """The necessary words of step i (1-based): its name, (split style) its operand, its value."""
        op, d = self.ops[i - 1]
        value = str(self.values()[i - 1])
        return [f"S{i}", value] if self.style == "merged" else [f"S{i}", f"{op}{d}", value]

    def necessary_trace(self, upto: int | None = None) -> str:
        """The steps 1..`upto` (default: all) with no filler: the shortest complete reasoning."""
        k = self.steps if upto is None else upto
        return " ".join(w for i in range(1, k + 1) for w in self.step_words(i))

    def problem(self, pid: str) -> Problem:
        return Problem(id=pid, question=self.question(), answer=str(self.answer), kind="math", source="lab")


def answer_text(value: int) -> str:
    """The final answer as the grader reads it (`duetlm.grading` takes the last `\\boxed{}`)."""
    return f"\\boxed{{{value}}}"


def parse_question(question: str, modulus: int = 10) -> Chain:
    """The `Chain` a question of either style describes; a `DataError` names the word that does not fit."""
    words = question.split()
    if not words or not _NUMBER.match(words[0]):
        raise DataError(f"lab question {question!r}: expected a start number first, got {words[:1]}")
    style = (
        "split" if len(words) > 1 and _NUMBER.match(words[1][1:] if words[1][:1] == "S" else "") else "merged"
    )
    pattern = re.compile(r"^S(\d+)([+\-*])(\d+)$")
    body = words[1:]
    if style == "split":
        if len(body) % 2:
            raise DataError(f"lab question {question!r}: step {body[-1]!r} has no operand")
        body = [a + b for a, b in zip(body[::2], body[1::2], strict=True)]
    ops = []
    for i, word in enumerate(body, 1):
        m = pattern.match(word)
        if m is None or int(m.group(1)) != i:
            raise DataError(f"lab question {question!r}: {word!r} is not step S{i} with an operand")
        ops.append((m.group(2), int(m.group(3))))
    if not ops:
        raise DataError(f"lab question {question!r}: no steps")
    return Chain(int(words[0]), tuple(ops), modulus, style)


def small_steps(spec: TaskSpec) -> int:
    """How many steps m can write itself within its answer cap (`small_cap` tokens, one of them the
    `\\boxed{}`), in the lab's step format; 0 without a cap."""
    if spec.small_cap is None:
        return 0
    return max(0, spec.small_cap - 1) // spec.words_per_step


def minimal_signal(chain: Chain, spec: TaskSpec) -> str:
    """The shortest sufficient signal for `chain` (the lab's physical limit): M's necessary trace
    through the step from which m, writing its own steps within `spec.small_cap`, reaches the answer.
    Empty where m can solve the whole chain alone. Without a cap: every step but the last (m finishes
    one step, the classic task's division of labour)."""
    mine = small_steps(spec) if spec.small_cap is not None else 1
    return chain.necessary_trace(max(0, chain.steps - mine))


def sample_chain(rng: random.Random, spec: TaskSpec) -> Chain:
    ops = []
    # A mixed family draws k first; the classic one draws nothing here (its problems stay as they were).
    k = spec.steps if spec.min_steps is None else rng.randint(spec.min_steps, spec.steps)
    for _ in range(k):
        op = rng.choice(OPS)
        ops.append((op, rng.choice(spec.operand_digits(op))))
    return Chain(rng.randrange(spec.modulus), tuple(ops), spec.modulus, spec.style)


def chains(spec: TaskSpec, count: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Chain]:
    """`count` distinct problems, reproducible from `seed`, none whose question is in `exclude` (so a
    held-out set never overlaps training)."""
    space = sum(spec.modulus * len(spec.operands()) ** k for k in spec.lengths)
    if count > space // 2:
        raise ValueError(f"asked for {count} distinct problems from a family of {space}")
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out: list[Chain] = []
    while len(out) < count:
        c = sample_chain(rng, spec)
        if c.question() not in seen:
            seen.add(c.question())
            out.append(c)
    return out


def problems(spec: TaskSpec, count: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """`count` lab problems as `duetlm.problems.Problem` records (numeric answer, `source="lab"`)."""
    return [c.problem(f"lab-{seed}-{i}") for i, c in enumerate(chains(spec, count, seed, exclude))]


def _hesitation(rng: random.Random, spec: TaskSpec) -> Iterator[str]:
    if rng.random() < spec.p_hesitate:
        yield "hmm"
        while rng.random() < spec.p_more:
            yield rng.choice(HESITATIONS)


def verbose_blocks(rng: random.Random, chain: Chain, spec: TaskSpec) -> list[list[str]]:
    """M's warm-start thinking as blocks of words: block 0 restates the start (or is empty); block i
    holds step i, with hesitations of random length before it, a restatement and a re-check after.

    Every number the filler repeats is the current value, so the last number written is always the
    value the next step starts from (the trace stays consistent for a reader that skims it).
    """
    blocks: list[list[str]] = [["start", "at", str(chain.start)] if rng.random() < spec.p_open else []]
    for i, v in enumerate(chain.values(), 1):
        words = list(_hesitation(rng, spec)) + chain.step_words(i)
        if rng.random() < spec.p_restate:
            words += ["so", str(v)]
        if rng.random() < spec.p_check:
            words += ["check", f"S{i}", str(v)]
        blocks.append(words)
    return blocks


def stop_early(rng: random.Random, blocks: list[list[str]], spec: TaskSpec) -> list[list[str]]:
    """With probability `p_stop`, M's warm-start thinking stops after a random earlier step (0 to k-1
    steps kept, with their filler): the shorter stops RL may find. `blocks` unchanged otherwise."""
    if spec.p_stop <= 0.0 or rng.random() >= spec.p_stop:
        return blocks
    return blocks[: 1 + rng.randrange(len(blocks) - 1)]


def trace_style(rng: random.Random, spec: TaskSpec) -> TaskSpec:
    """The verbosity of one warm-start trace of M: `spec` itself, or (with probability `p_terse`) each
    filler probability drawn uniformly below its value in `spec`."""
    if rng.random() >= spec.p_terse:
        return spec
    return replace(
        spec,
        p_open=rng.random() * spec.p_open,
        p_restate=rng.random() * spec.p_restate,
        p_check=rng.random() * spec.p_check,
        p_hesitate=rng.random() * spec.p_hesitate,
    )


def verbose_trace(rng: random.Random, chain: Chain, spec: TaskSpec) -> str:
    """M's warm-start thinking (`verbose_blocks` joined)."""
    return " ".join(w for block in verbose_blocks(rng, chain, spec) for w in block)
