"""Every command block of the README runs as written, in the order written (issue: recipes must not rot).

Each command is classified by `RULES`: run in the default suite (fast), run in the slow suite at toy
sizes (the extra arguments say how), or skipped with the reason (a GPU, the Hub, the vLLM virtualenv).
A README command that no rule names fails `test_every_readme_command_is_classified`: add a rule. The
commands run in a scratch directory holding links to `configs/` (and `../shared` where it exists), so
`runs/...` paths land there and later commands see what earlier ones wrote, as a reader's would.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Rule:
    pattern: str
    action: str  # "fast" | "slow" | "skip"
    toy: str = ""  # arguments appended (a later option overrides the README's)
    why: str = ""


RULES = [
    Rule(r"bash scripts/install\.sh", "skip", why="CI itself installs from scratch and runs the tests"),
    Rule(r"bash scripts/install_vllm\.sh", "skip", why="the vLLM virtualenv: CI's vLLM stage runs it"),
    Rule(r"accelerate launch", "skip", why="needs GPUs"),
    Rule(r"vllm serve", "skip", why="needs vLLM on a GPU and the Hub"),
    Rule(r"duetlm serve --role large --large Qwen/", "skip", why="downloads Qwen3-4B (the GPU box)"),
    Rule(r"duetlm serve --large-url http://gpu-box", "skip", why="needs the GPU box of the line above"),
    Rule(r"duetlm serve --role small --small Qwen/", "skip", why="downloads Qwen3-0.6B (m's box)"),
    Rule(r"duetlm eval \.\.\. ", "skip", why="a pattern (`...`: the options of the block above)"),
    Rule(r"duetlm demo --quick$", "fast"),
    Rule(r"duetlm demo", "slow", toy="--quick", why="the full demo takes 10-20 minutes"),
    Rule(r"duetlm lab tables", "slow", toy="--quick --jobs 1", why="the grid takes an hour"),
    Rule(r"duetlm infer", "slow", why="loads SmolLM2-135M twice"),
    Rule(r"duetlm eval ", "slow", toy="--limit 1 --max-signal-tokens 16 --max-answer-tokens 8"),
    Rule(r"duetlm report", "slow"),
    Rule(r"duetlm data ", "fast"),
    Rule(r"duetlm init-tiny", "fast"),
    Rule(r"duetlm train", "fast"),
    Rule(r"torchrun ", "fast"),
    Rule(
        r"duetlm serve --large smollm2-135m",
        "slow",
        why="a server on SmolLM2, queried with the README's client",
    ),
]


def code_blocks(text: str) -> list[list[str]]:
    """The README's indented code blocks (four spaces after a blank line), their lines unindented."""
    blocks: list[list[str]] = []
    current: list[str] = []
    blank = True
    for line in text.splitlines():
        if line.startswith("    ") and (current or blank):
            current.append(line[4:])
        elif current:
            blocks.append(current)
            current = []
        blank = not line.strip()
    return [*blocks, current] if current else blocks


def commands(text: str) -> list[str]:
    """Shell commands of the code blocks, continuation lines joined, trailing `# comments` dropped;
    Python snippets and the architecture diagram are not commands."""
    found = []
    for block in code_blocks(text):
        if block[0].startswith(("from ", "import ")) or "──" in block[0]:
            continue
        joined = "\n".join(block).replace("\\\n", " ")
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                found.append(re.sub(r"\s+", " ", line))
    return found


def rule_for(command: str) -> Rule | None:
    return next((r for r in RULES if re.match(r.pattern, command)), None)


def python_snippets(text: str) -> list[str]:
    return ["\n".join(b) for b in code_blocks(text) if b[0].startswith(("from ", "import "))]


README = (ROOT / "README.md").read_text()


def test_every_readme_command_is_classified():
    cmds = commands(README)
    assert len(cmds) > 15  # the parser found the recipes
    unclassified = [c for c in cmds if rule_for(c) is None]
    assert not unclassified, f"add a rule to tests/test_readme.py for: {unclassified}"
    for c in cmds:
        rule = rule_for(c)
        assert rule.action != "skip" or rule.why, c


def test_the_architecture_table_names_every_module():
    table = README[README.index("## Architecture") :]
    package = ROOT / "src" / "duetlm"
    missing = [
        p.name
        for p in sorted(package.iterdir())
        if (p.suffix == ".py" and p.name != "__init__.py" and f"`{p.name}`" not in table)
        or (p.is_dir() and (p / "__init__.py").is_file() and f"`{p.name}/`" not in table)
    ]
    assert not missing, f"README's architecture table does not name: {missing}"


@pytest.fixture
def scratch(tmp_path):
    """A fresh reader's checkout for each test: links to configs/ and ../shared, its own runs/ and
    warm-start cache."""
    root = tmp_path
    work = root / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    if SHARED.is_dir():
        (root / "shared").symlink_to(SHARED)
    env = dict(
        os.environ,
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        DUETLM_CACHE=str(root / "cache"),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    env.pop("DUETLM_DATA_DIR", None)
    return work, env


def run(
    command: str, work: Path, env: dict[str, str], timeout: int = 600
) -> subprocess.CompletedProcess[str]:
    rule = rule_for(command)
    full = f"{command} {rule.toy}".strip()
    r = subprocess.run(
        ["bash", "-c", full], cwd=work, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"README command failed: {full}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, f"{full}\n{r.stderr[-4000:]}"
    return r


def _needs_shared(command: str) -> bool:
    return "../shared" in command and not SHARED.is_dir()


def test_fast_readme_commands_run_in_order(scratch):
    work, env = scratch
    ran = []
    for command in commands(README):
        if rule_for(command).action != "fast" or _needs_shared(command):
            continue
        r = run(command, work, env)
        ran.append(command)
        if command.startswith("torchrun"):
            assert r.stdout.count("checkpoint ") == 1, r.stdout  # rank 0 reports, once
    assert any(c.startswith("torchrun") for c in ran) and any(c.startswith("duetlm train") for c in ran)
    assert (work / "runs" / "demo-quick-seed0" / "table.md").is_file()  # where the README says


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_query(command: str, work: Path, env: dict[str, str]) -> None:
    """The serve recipe as written but on a free port, queried by the README's own client snippet."""
    port = _free_port()
    cmd = command.replace("--port 8000", f"--port {port}")
    server = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        import httpx

        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
        else:
            pytest.fail("the README's server never became healthy")
        for snippet in python_snippets(README):
            code = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            assert r.returncode == 0, f"README snippet failed:\n{code}\n{r.stderr[-3000:]}"
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.slow
def test_slow_readme_commands_run_in_order_at_toy_sizes(scratch):
    work, env = scratch
    for command in commands(README):
        rule = rule_for(command)
        if rule.action == "skip" or _needs_shared(command):
            continue
        if command.startswith("duetlm serve"):
            _serve_and_query(command, work, env)
        else:
            run(command, work, env, timeout=1800)
    shutil.rmtree(work / "runs", ignore_errors=True)
