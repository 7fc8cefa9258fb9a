"""`duetlm` as a user runs it: a real subprocess, real (tiny) models."""

import json
import os
import subprocess
import sys

import pytest


def duetlm(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(
        [sys.executable, "-m", "duetlm.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_help_lists_commands():
    r = duetlm("--help")
    assert r.returncode == 0
    assert "infer" in r.stdout


def test_infer_two_tiny_models(tiny_dir, tiny_llama_dir):
    r = duetlm(
        "infer",
        "--large",
        str(tiny_dir),
        "--small",
        str(tiny_llama_dir),
        "--question",
        "What is 12 + 7?",
        "--max-signal-tokens",
        "8",
        "--max-answer-tokens",
        "8",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"signal", "signal_complete", "answer", "large_tokens", "small_tokens"} <= out.keys()
    assert 1 <= out["large_tokens"] <= 8 and 1 <= out["small_tokens"] <= 8
    assert isinstance(out["signal_complete"], bool)


def test_infer_smollm2_both_roles():
    r = duetlm(
        "infer",
        "--large",
        "smollm2-135m",
        "--small",
        "smollm2-135m",
        "--question",
        "What is 12 + 7?",
        "--max-signal-tokens",
        "24",
        "--max-answer-tokens",
        "24",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["large_tokens"] > 0 and out["small_tokens"] > 0 and out["answer"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--large", "/no/such/model", "--small", "x", "--question", "hi"], "model not found"),
        (["--large", "missing.gguf", "--small", "x", "--question", "hi"], "GGUF file not found"),
        (["--large", "smollm2-135m", "--small", "smollm2-135m", "--question", "  "], "question is empty"),
    ],
)
def test_bad_input_is_one_line(args, message):
    r = duetlm("infer", *args)
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error:") and message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
