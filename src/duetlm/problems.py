"""Problems: the x of the paper. `Problem` is the one record every stage passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["math", "choice"]


@dataclass(frozen=True)
class Problem:
    """One problem x with its gold answer.

    `kind="math"`: `answer` is a LaTeX / plain expression graded by math-verify.
    `kind="choice"`: `answer` is a letter ("A".."Z") and `choices` holds the option texts in order.
    """

    id: str
    question: str
    answer: str
    kind: Kind = "math"
    choices: tuple[str, ...] = field(default_factory=tuple)
    source: str = ""
