"""benchmarks/lab_tables.py at the demo's toy sizes: the baselines, two trained variants, the files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lab_tables.py"


def _load():
    spec = importlib.util.spec_from_file_location("lab_tables", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lab_tables"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_lab_tables_quick(tmp_path):
    mod = _load()
    out = tmp_path / "out"
    rc = mod.main(
        [
            "--quick",
            "--steps",
            "1",
            "--only",
            "DUET,ThinkPrune",
            "--output",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--cache",
            str(tmp_path / "cache"),
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    methods = res["methods"]
    for name in ("original", "small", "prompt", "DUET (untrained pair)", "DUET", "ThinkPrune"):
        assert name in methods, name
    assert len(res["truncation_caps"]) == 3
    assert methods["DUET"]["steps"] == 1 and methods["DUET"]["models"] == "trained"
    # the variants not asked for are listed as missing, in results.json and in the tables
    assert "L-GRPO" in res["missing"] and "DUET" not in res["missing"]
    tables = (out / "tables.md").read_text()
    assert "| ThinkPrune | trained |" in tables and "Not run" in tables and "L-GRPO" in tables
    assert (out / "pareto.png").stat().st_size > 0
    # --merge: one set of tables from several runs' outputs (variants split over processes)
    assert mod.main(["--merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["methods"].keys() == methods.keys() and merged["missing"] == res["missing"]
    assert merged["parts"][0]["steps"] == 1


def test_thinkprune_limits_scale_like_the_paper():
    mod = _load()
    tp = mod.thinkprune_objective(t0=60.0, budget=22, steps=150, cap=96)
    # the paper's shape: above T0 at the start, the floor at B, seven decrements, one every 20 of 150 steps
    assert tp == {
        "thinkprune_start": 72,
        "thinkprune_floor": 22,
        "thinkprune_step": 8,
        "thinkprune_every": 20,
    }


def test_unknown_variant_is_refused(tmp_path):
    mod = _load()
    with pytest.raises(SystemExit):
        mod.main(["--only", "DUET,nonsense", "--output", str(tmp_path / "o"), "--work", str(tmp_path / "w")])
