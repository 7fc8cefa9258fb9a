"""Reproducible streams: every random choice of a run derives from (seed, step, role), so a resumed run
repeats an uninterrupted one. The data order (a seeded permutation per epoch, read through a stored
cursor), the held-out split, and each generation call's seed live here."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from duetlm import distributed
from duetlm.errors import DataError
from duetlm.problems import Problem, render_question


def derive_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed from (seed, *keys), stable across processes and Python versions."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_order(seed: int, epoch: int, size: int) -> list[int]:
    """The order of the training problems in `epoch`: a seeded permutation."""
    order = list(range(size))
    random.Random(derive_seed(seed, "data", epoch)).shuffle(order)
    return order


def batch_indices(seed: int, cursor: int, batch_size: int, size: int) -> list[int]:
    """Problems `cursor .. cursor + batch_size - 1` of the endless stream of seeded epochs."""
    out = []
    for pos in range(cursor, cursor + batch_size):
        epoch, offset = divmod(pos, size)
        out.append(epoch_order(seed, epoch, size)[offset])
    return out


def split_holdout(problems: list[Problem], size: int, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, validation): `size` problems held out by a seeded draw, the rest for training."""
    if size >= len(problems):
        raise DataError(
            f"data.val_size={size} leaves no training problems (the source has {len(problems)}); "
            "lower val_size or set data.val_source"
        )
    order = list(range(len(problems)))
    random.Random(derive_seed(seed, "holdout")).shuffle(order)
    held = set(order[:size])
    return [p for i, p in enumerate(problems) if i not in held], [problems[i] for i in sorted(held)]


@dataclass(frozen=True)
class StepBatch:
    """This process's prompts x of one step, and how they are cut into seeded generation calls.

    `lo`: the global index of the first prompt (data parallelism gives each rank a contiguous shard).
    `block`: prompts per generation call (`rollout.generation_block`; None: one call)."""

    problems: list[Problem]
    step: int
    seed: int
    lo: int = 0
    block: int | None = None

    @property
    def questions(self) -> list[str]:
        return [render_question(p) for p in self.problems]

    def calls(self) -> list[tuple[int, int, int]]:
        """The step's generation calls: (local first prompt, local end, global first prompt)."""
        blocks = distributed.generation_blocks(self.lo, self.lo + len(self.problems), self.block)
        return [(s - self.lo, e - self.lo, s) for s, e in blocks]

    def call_seed(self, role: str, start: int) -> int:
        """The seed of the call whose first prompt is `start` in the global batch: from
        (seed, step, role[, start]); the call at the start of the batch keeps (seed, step, role), the
        seed of single-process runs made before calls were split."""
        if start == 0:
            return derive_seed(self.seed, self.step, role)
        return derive_seed(self.seed, self.step, role, start)
