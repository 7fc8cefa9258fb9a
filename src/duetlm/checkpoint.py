"""Checkpoints of a training run: written atomically, found by `--resume auto`, pruned to the last K.

Layout (one directory per checkpoint, named by the number of completed steps):

    run_dir/checkpoints/step_000010/
        large/              M as a normal Hugging Face directory (safetensors + tokenizer); with LoRA, the
                            adapter merged into the base weights (loadable by `from_pretrained` and vLLM)
        large_adapter/      with LoRA only: the adapter itself (what a resume loads, on top of the base)
        small/, small_adapter/   the same for m (absent when the mode has no m)
        trainer_state.pt    step, data cursor, λ, optimizer states, RNG states, guard-rail counters
        config.yaml         the resolved config of the run that wrote it
        COMPLETE            written last, inside the temporary directory

A checkpoint is written into `checkpoints/.tmp-step_000010/` and renamed to its final name only after
COMPLETE is in it, so a crash mid-write leaves a `.tmp-` directory (removed at the next start) and
never a directory that looks complete. `latest_checkpoint` considers only directories with COMPLETE.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step_(\d{6,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, path), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and (child / COMPLETE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of `run_dir`, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete `.tmp-*` directories left by a crash during a write; returns what was removed."""
    root = checkpoints_dir(run_dir)
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-"):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """A fresh temporary directory to write the checkpoint of `step` into."""
    tmp = checkpoints_dir(run_dir) / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_checkpoint(tmp: Path, step: int, keep_last: int, keep_steps: Iterable[int] = ()) -> Path:
    """Mark `tmp` complete, rename it to its final name, then prune to the newest `keep_last` (and
    the steps in `keep_steps`)."""
    (tmp / COMPLETE).write_text(f"{step}\n")
    with open(tmp / COMPLETE, "rb+") as fh:
        os.fsync(fh.fileno())
    final = tmp.parent / checkpoint_name(step)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    prune_checkpoints(final.parent.parent, keep_last, keep_steps)
    return final


def prune_checkpoints(run_dir: str | Path, keep_last: int, keep_steps: Iterable[int] = ()) -> list[Path]:
    """Delete all complete checkpoints but the newest `keep_last` and those of the steps in
    `keep_steps` (the ones a paper evaluates); returns what was deleted."""
    found = list_checkpoints(run_dir)
    kept = set(keep_steps)
    doomed = [path for step, path in found[: max(len(found) - keep_last, 0)] if step not in kept]
    for path in doomed:
        # Rename first, so a crash during rmtree leaves a `.tmp-` directory, not a half-deleted
        # directory that still carries COMPLETE.
        trash = path.with_name(f".tmp-deleting-{path.name}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


# --------------------------------------------------------------------------------------------------
# RNG states: saved with plain types only, so `torch.load(weights_only=True)` reads them back.


def rng_state() -> dict[str, Any]:
    """Every global random stream: python, numpy, torch CPU and (when present) CUDA."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": [
            np_kind,
            torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            np_pos,
            np_has_gauss,
            np_gauss,
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, tuple | list) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def save_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(state, path / STATE_FILE)


def load_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint (tensors and plain types only: no pickled code runs)."""
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
