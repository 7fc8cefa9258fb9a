"""`duetlm` as a user runs it: a real subprocess, real (tiny) models."""

import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner


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


# -- options generated from the configs ----------------------------------------------------------------


def _help_text(command: str) -> str:
    """`duetlm COMMAND --help` as one line of words (the box drawing and the wrapping taken out)."""
    env = dict(os.environ, COLUMNS="200", TERMINAL_WIDTH="200")
    r = subprocess.run(
        [sys.executable, "-m", "duetlm.cli", command, "--help"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 0, r.stderr
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.stdout).split())


def _config(command: str):
    from duetlm.evaluate import EvalConfig
    from duetlm.serve import ServeConfig

    return {"eval": EvalConfig, "serve": ServeConfig}[command]


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_help_shows_every_config_field_with_its_help_and_default(command):
    from duetlm.cli_options import flag

    text = _help_text(command)
    for name, info in _config(command).model_fields.items():
        assert re.search(rf"(?<![\w-]){re.escape(flag(name))}(?![\w-])", text), f"{flag(name)} is missing"
        assert info.description, f"{name} has no description"
        assert " ".join(info.description.split()) in text, f"{flag(name)}: help text missing"
        if not info.is_required() and info.default is not None:
            assert f"[default: {info.default}]" in text, f"{flag(name)}: default missing"


def test_serve_flags_reach_the_config(monkeypatch):
    import duetlm.serve.app
    from duetlm.cli import app
    from duetlm.serve import ServeConfig

    seen = []
    monkeypatch.setattr(duetlm.serve.app, "run_server", seen.append)
    args = ["serve", "--large", "M", "--small", "m", "--max-batch", "3", "--batching", "window"]
    result = CliRunner().invoke(app, args, env={"DUETLM_SERVE_API_KEY": "k"})
    assert result.exit_code == 0, result.output
    assert seen == [ServeConfig(large="M", small="m", max_batch=3, batching="window", api_key="k")]


def test_eval_flags_reach_the_config(monkeypatch):
    import duetlm.evaluate
    from duetlm.cli import app
    from duetlm.errors import DuetError
    from duetlm.evaluate import EvalConfig

    seen = []

    def run_eval(cfg, progress):
        seen.append((cfg, progress))
        raise DuetError("stop here")

    monkeypatch.setattr(duetlm.evaluate, "run_eval", run_eval)
    args = ["eval", "--large", "M", "--benchmarks", "a,b", "--benchmarks", "c", "--methods", "duet,small"]
    args += ["--output", "out", "--max-signal-tokens", "7", "--limit", "2", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "stop here" in result.output
    expected = EvalConfig(
        large="M",
        benchmarks=["a", "b", "c"],
        methods=["duet", "small"],
        output="out",
        max_signal_tokens=7,
        limit=2,
    )
    assert seen == [(expected, False)]
