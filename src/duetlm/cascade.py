"""The cascade's decision (the paper's future work, §6): m answers alone first, and M is asked for a
signal z only where m's confidence in that answer is below a threshold. Pure functions of m's
generations; `DuetPipeline.cascade` runs them.

Estimators, one dispatch table (`ESTIMATORS`), each mapping m's first answer (and, where it asks for
them, k extra sampled answers) to a confidence in [0, 1]:
- `logprob`: the probability of the least likely token of m's answer, exp(min_t log p(y_t)). The
  minimum, not the mean, because an answer is as wrong as its weakest token: a guessed final value is
  one or two uncertain tokens among a dozen certain ones (the box, the format, the steps m copies), and
  a mean over the whole answer dilutes it towards certainty.
- `consistency`: the share of k answers of m sampled at temperature 1 whose boxed answer is m's own
  (self-consistency as a confidence, Wang et al. 2023); m's own answer is its first, decoded as the
  pipeline decodes.
An answer with no `\\boxed{}` (`protocol.boxed_answer`) has confidence 0: m is unsure of it.

M is called when confidence < threshold; threshold 0 never calls M, threshold 1 always does (then the
cascade's signal and answer are DUET's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from duetlm import protocol
from duetlm.errors import DuetError

VOTE_TEMPERATURE = 1.0  # the `consistency` votes' temperature: m's own distribution, unsharpened


@dataclass(frozen=True)
class Estimator:
    """A confidence estimator: `votes` says whether it needs k sampled answers besides m's first."""

    summary: str
    confidence: Callable[[str, Sequence[float] | None, Sequence[str]], float]
    votes: bool = False


def min_token_prob(answer: str, logprobs: Sequence[float] | None, votes: Sequence[str] = ()) -> float:
    """`logprob`: exp of the smallest token log-probability of m's answer; 0 without a box."""
    if protocol.boxed_answer(answer) is None or not logprobs:
        return 0.0
    import math

    return math.exp(min(logprobs))


def agreement(answer: str, logprobs: Sequence[float] | None, votes: Sequence[str]) -> float:
    """`consistency`: the share of `votes` whose boxed answer equals that of `answer`; 0 without a box."""
    own = protocol.boxed_answer(answer)
    if own is None or not votes:
        return 0.0
    return sum(protocol.boxed_answer(v) == own for v in votes) / len(votes)


ESTIMATORS: dict[str, Estimator] = {
    "logprob": Estimator("probability of the least likely token of m's answer", min_token_prob),
    "consistency": Estimator(
        "share of k sampled answers of m that agree with its own", agreement, votes=True
    ),
}


@dataclass(frozen=True)
class CascadeSpec:
    """`estimator@threshold` or `consistency@k@threshold`: what `--methods cascade:...` names."""

    estimator: str
    threshold: float
    votes: int = 0

    @property
    def name(self) -> str:
        middle = f"@{self.votes}" if ESTIMATORS[self.estimator].votes else ""
        return f"{self.estimator}{middle}@{self.threshold:g}"


def parse_cascade(text: str) -> CascadeSpec:
    """`logprob@0.5`, `consistency@4@0.75` -> `CascadeSpec`, or an error listing what is valid."""
    usage = "logprob@T or consistency@K@T, T a threshold in [0, 1], K >= 2 sampled answers"
    parts = [p.strip() for p in text.split("@")]
    name = parts[0]
    if name not in ESTIMATORS:
        raise DuetError(f"unknown cascade estimator {name!r}; valid: {', '.join(ESTIMATORS)} ({usage})")
    wanted = 3 if ESTIMATORS[name].votes else 2
    if len(parts) != wanted:
        raise DuetError(f"cascade {text!r}: expected {usage}")
    try:
        threshold = float(parts[-1])
    except ValueError:
        raise DuetError(f"cascade {text!r}: the threshold {parts[-1]!r} is not a number ({usage})") from None
    if not 0.0 <= threshold <= 1.0:
        raise DuetError(f"cascade {text!r}: the threshold must be in [0, 1] (got {threshold:g})")
    votes = 0
    if wanted == 3:
        if not parts[1].isdigit() or int(parts[1]) < 2:
            raise DuetError(f"cascade {text!r}: K must be a whole number >= 2 (got {parts[1]!r}; {usage})")
        votes = int(parts[1])
    return CascadeSpec(name, threshold, votes)


def calls_large(confidence: float, threshold: float) -> bool:
    """Whether m asks M: its confidence is below the threshold (threshold 1: always)."""
    return threshold >= 1.0 or confidence < threshold
