"""Shared fixtures: tiny real models and tokenizers built locally (no hub, no mocks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from duetlm.config import TrainConfig
    from duetlm.problems import Problem

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# Ten real problems with numeric answers (written here, not copied from a dataset).
ARITHMETIC = [
    ("What is 2 + 3?", "5"),
    ("What is 7 * 6?", "42"),
    ("What is 10 - 4?", "6"),
    ("What is 9 + 9?", "18"),
    ("What is 12 / 4?", "3"),
    ("What is 5 * 5?", "25"),
    ("What is 100 - 1?", "99"),
    ("What is 8 + 13?", "21"),
    ("What is 3 * 11?", "33"),
    ("What is 64 / 8?", "8"),
]


def arithmetic_problems(n: int = len(ARITHMETIC), prefix: str = "t") -> list[Problem]:
    """The first `n` of `ARITHMETIC` as `Problem`s with ids `{prefix}0`, `{prefix}1`, ... (source "test")."""
    from duetlm.problems import Problem

    return [
        Problem(id=f"{prefix}{i}", question=q, answer=a, source="test")
        for i, (q, a) in enumerate(ARITHMETIC[:n])
    ]


def tiny_train_config(
    tmp_path: Path, large_dir: Path, small_dir: Path, *layers: dict[str, Any], **sections: Any
) -> TrainConfig:
    """The trainer tests' DUET `TrainConfig`: 2 prompts × 2 rollouts × 2 answers of m, 8-token outputs of
    M and 6 of m, 2 steps with a checkpoint each, the run in `tmp_path / "run"`, problems read from
    `tmp_path / "problems.jsonl"` (unless the test hands them to the trainer).

    Each of `layers` (a dict of sections), then `sections`, overrides it in turn, one level deep: a dict
    updates the keys of that section (adding the section if it is new), any other value replaces it.
    """
    from duetlm.config import TrainConfig, build_config

    data: dict[str, Any] = {
        "mode": "duet",
        "seed": 3,
        "large": {"path": str(large_dir), "device": "cpu"},
        "small": {"path": str(small_dir), "device": "cpu"},
        "data": {"source": str(tmp_path / "problems.jsonl")},
        "rollout": {
            "batch_size": 2,
            "n": 2,
            "n_small": 2,
            "large": {"max_new_tokens": 8},
            "small": {"max_new_tokens": 6},
        },
        "objective": {"budget": 4, "kl_coef": 0.0, "lambda_step_size": 0.1, "mu_baseline": "per_rollout"},
        "optim": {"lr_large": 1e-3, "lr_small": 1e-3, "micro_batch_size": 4},
        "run": {
            "steps": 2,
            "dir": str(tmp_path / "run"),
            "save_every": 1,
            "grading_workers": 1,
            "threads": 1,
        },
        "logging": {"tensorboard": False, "progress": "off", "sample_every": 1, "val_every": 0},
    }
    for layer in (*layers, sections):
        for key, value in layer.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config(TrainConfig, data)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from duetlm.models import SAMPLE_CORPUS, train_tokenizer

    return train_tokenizer(SAMPLE_CORPUS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Qwen3 model directory (M in the tests)."""
    from duetlm.models import save_pretrained, tiny_model

    model = tiny_model(tiny_tokenizer, arch="qwen3", hidden_size=64, num_layers=2, num_heads=4, seed=1)
    return save_pretrained(model, tiny_tokenizer, tmp_path_factory.mktemp("models") / "tiny-qwen3")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A saved tiny Llama model directory (m in the tests)."""
    from duetlm.models import save_pretrained, tiny_model

    model = tiny_model(tiny_tokenizer, arch="llama", hidden_size=32, num_layers=2, num_heads=2, seed=2)
    return save_pretrained(model, tiny_tokenizer, tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_engine(tiny_dir):
    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model

    model, tok = load_model(str(tiny_dir), device="cpu")
    return HFEngine(model, tok)


@pytest.fixture(scope="session")
def tiny_small_engine(tiny_llama_dir):
    """m's engine in the tests: the tiny Llama (a different architecture and size from M)."""
    from duetlm.engines.hf import HFEngine
    from duetlm.models import load_model

    model, tok = load_model(str(tiny_llama_dir), device="cpu")
    return HFEngine(model, tok)


@pytest.fixture(scope="session")
def make_pipeline(tiny_engine, tiny_small_engine):
    """Build a pipeline of the tiny M and m: `make_pipeline(signal_tokens, answer_tokens, **sampling)`
    (greedy unless `temperature`/`seed` say otherwise)."""
    from duetlm.engines.base import SamplingParams
    from duetlm.pipeline import DuetPipeline

    def make(signal_tokens: int = 9, answer_tokens: int = 5, **sampling) -> DuetPipeline:
        sampling = {"temperature": 0.0, **sampling}
        return DuetPipeline(
            tiny_engine,
            tiny_small_engine,
            large_sampling=SamplingParams(max_new_tokens=signal_tokens, **sampling),
            small_sampling=SamplingParams(max_new_tokens=answer_tokens, **sampling),
        )

    return make


def start_cli_server(args: list[str], timeout: float = 240.0, env: dict[str, str] | None = None):
    """`python -m duetlm.cli serve ARGS --port 0` in its own process: (process, its URL read from
    uvicorn's start-up line, the stderr lines so far, kept up to date). Fails the test if it does not
    start."""
    import os
    import re
    import subprocess
    import sys
    import threading
    import time

    cmd = [sys.executable, "-m", "duetlm.cli", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    found: list[str] = []
    log: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"running on (http://\S+)", line)
            if m:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not found:
        proc.kill()
        pytest.fail(f"duetlm serve {' '.join(args)} did not start:\n" + "".join(log))
    return proc, found[0], log
