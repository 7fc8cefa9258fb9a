"""`duetlm lab tables --quick`: the grid over seeds at toy sizes, its outputs, and the cache: a rerun
redoes nothing, an extended grid computes only what is new, a killed run resumes, a corrupt entry is
recomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from duetlm.cli import app
from duetlm.errors import DuetError
from duetlm.lab.grid import parse_seeds, parse_variants, thinkprune_objective


def tables(root: Path, *args: str) -> dict:
    env = {"DUETLM_CACHE": str(root / "cache")}
    argv = ["lab", "tables", "--quick", "--steps", "1", "--output", str(root / "out"), *args]
    r = CliRunner().invoke(app, argv, env=env)
    assert r.exit_code == 0, r.output
    return json.loads((root / "out" / "results.json").read_text())


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("tables")
    first = tables(root, "--seeds", "0,1", "--variants", "DUET", "--jobs", "2")
    return root, first


def test_outputs_over_seeds(grid):
    root, res = grid
    assert res["seeds"] == [0, 1] and res["steps"] == 1 and res["task"] == "mix"
    assert sorted(res["computed"]) == ["DUET@0", "DUET@1", "baselines@0", "baselines@1"]
    summary = res["summary"]
    for name in (
        "original",
        "m alone",
        "m alone answering at once",
        "prompt",
        "DUET (untrained pair)",
        "DUET",
        "truncation at DUET's tokens",
    ):
        assert summary[name]["seeds"] == [0, 1], name
    for name in ("truncation 0.4×T0", "truncation 0.6×T0", "truncation 0.8×T0"):
        assert summary[name]["seeds"] == [0, 1], name  # one row per fraction, whatever each seed's T0
    duet = summary["DUET"]["accuracy"]
    assert duet["mean"] == pytest.approx(sum(duet["values"]) / 2) and len(duet["values"]) == 2
    # compute: 2 × parameters × generated tokens, M and m together
    unit = next(u for u in res["units"] if u["unit"] == "DUET" and u["seed"] == 0)
    row = unit["methods"]["DUET"]
    p = unit["params"]
    assert row["compute_mflop"] == pytest.approx(
        2 * (p["large"] * row["large_tokens"] + p["small"] * row["small_tokens"]) / 1e6
    )
    # the per-length breakdown adds up to the whole, and the minimal signal is 3 words per step past 3
    by_k = row["by_k"]
    assert sum(c["problems"] for c in by_k.values()) == 24
    assert sum(c["accuracy"] * c["problems"] for c in by_k.values()) / 24 == pytest.approx(row["accuracy"])
    assert all(c["minimal_words"] == 3 * max(0, int(k) - 3) for k, c in by_k.items())
    # answering at once, m has room for one boxed value only (the lab vocabulary cannot spell `\\boxed{`)
    at_once = next(u for u in res["units"] if u["unit"] == "baselines" and u["seed"] == 0)
    assert at_once["methods"]["m alone answering at once"]["small_tokens"] == 1  # the box is one word here
    md = (root / "out" / "tables.md").read_text()
    assert "| DUET | 2 |" in md and " ± " in md and "minimal sufficient signal" in md and "wall-clock" in md
    assert "## Claims of the paper" in md and "| −MU lowers accuracy | 0.85 → 0.67 | — | not run |" in md
    assert "| DUET keeps the original M's accuracy with fewer M tokens |" in md
    for png in ("pareto.png", "signal_lengths.png", "curves.png"):
        assert (root / "out" / png).stat().st_size > 0


def test_rerun_and_extension_use_the_cache(grid):
    root, _ = grid
    stamp = (root / "out" / "work" / "seed0" / "DUET" / "result.json").stat().st_mtime_ns
    again = tables(root, "--seeds", "0,1", "--variants", "DUET")
    assert again["computed"] == []
    # −LPS needs DUET (its λ is DUET's mean λ): only −LPS is new
    more = tables(root, "--seeds", "0", "--variants", "DUET −LPS")
    assert more["computed"] == ["DUET −LPS@0"]
    assert (root / "out" / "work" / "seed0" / "DUET" / "result.json").stat().st_mtime_ns == stamp
    lps = next(u for u in more["units"] if u["unit"] == "DUET −LPS")
    duet = next(u for u in more["units"] if u["unit"] == "DUET" and u["seed"] == 0)
    assert lps["objective"]["lambda_schedule"] == "constant"
    assert lps["objective"]["lambda_init"] == max(duet["mean_lambda"], 1e-3)


def test_a_corrupt_entry_is_recomputed(grid):
    root, _ = grid
    entry = root / "out" / "work" / "seed1" / "DUET" / "result.json"
    entry.write_text('{"key": "not this one", "methods": {"DUET": {"accuracy": 1.0}}}')
    res = tables(root, "--seeds", "0,1", "--variants", "DUET")
    assert res["computed"] == ["DUET@1"]
    entry.write_text("{ truncated")
    assert tables(root, "--seeds", "0,1", "--variants", "DUET")["computed"] == ["DUET@1"]


def test_a_killed_grid_resumes_without_redoing_finished_runs(tmp_path):
    env = {**os.environ, "DUETLM_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "duetlm.cli", "lab", "tables", "--quick", "--steps", "1", "--seeds", "0"]
    argv += ["--variants", "DUET,single-model", "--jobs", "1", "--output", str(out)]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first = out / "work" / "seed0" / "baselines" / "result.json"
    deadline = time.time() + 300
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: the grid and its worker
    proc.wait()
    assert first.exists()
    done_before = {p.parent.name for p in (out / "work" / "seed0").glob("*/result.json")}
    assert "baselines" in done_before
    stamp = first.stat().st_mtime_ns
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert "baselines@0" not in res["computed"]
    assert set(res["computed"]) == {f"{n}@0" for n in {"baselines", "DUET", "single-model"} - done_before}
    assert {"DUET", "single-model"} <= set(res["summary"])
    assert first.stat().st_mtime_ns == stamp


def test_bad_input_is_a_clear_error():
    for text in ("", "0,x", "1,,2"):
        with pytest.raises(DuetError, match="comma-separated whole numbers"):
            parse_seeds(text)
    with pytest.raises(DuetError, match="appears twice"):
        parse_seeds("1,1")
    assert parse_seeds(" 0, 1,2") == [0, 1, 2]
    with pytest.raises(DuetError, match="valid: DUET, single-model"):
        parse_variants("DUET,nonsense")
    assert [v.name for v in parse_variants("DUET −MU −LPS")] == ["DUET", "DUET −MU −LPS"]  # with its input
    r = CliRunner().invoke(app, ["lab", "tables", "--quick", "--task", "sudoku"])
    assert r.exit_code != 0 and "valid: chain, mix" in r.output
    r = CliRunner().invoke(app, ["lab", "tables", "--quick", "--seeds", ""])
    assert r.exit_code != 0 and "--seeds" in r.output


def test_thinkprune_limits_scale_like_the_paper():
    tp = thinkprune_objective(t0=60.0, budget=22, steps=150, cap=96)
    # the paper's shape: above T0 at the start, the floor at B, seven decrements, one every 20 of 150 steps
    assert tp == {
        "thinkprune_start": 72,
        "thinkprune_floor": 22,
        "thinkprune_step": 8,
        "thinkprune_every": 20,
    }
