"""The lab's `mix` family: mixed chain lengths, m limited by its answer cap, the minimal sufficient
signal, M's early-stopping warm-start traces, and `duetlm lab properties` end to end (toy sizes).

The measured properties at full size (m alone, m given the minimal signal, M) are in the slow test at
the bottom and in the issue's note."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from duetlm.errors import DataError, DuetError
from duetlm.grading import grade
from duetlm.lab import load_problems, task_spec
from duetlm.lab.task import (
    MIX_TASK,
    Chain,
    TaskSpec,
    answer_text,
    chains,
    minimal_signal,
    parse_question,
    sample_chain,
    small_steps,
    stop_early,
    verbose_blocks,
)
from duetlm.lab.warmstart import large_example, missing_words, small_target_capped

MIX = TaskSpec(**MIX_TASK)


def test_mix_spec_and_validation():
    assert task_spec("mix") == MIX and list(MIX.lengths) == [2, 3, 4, 5, 6]
    assert list(TaskSpec().lengths) == [6]  # the classic task: one length
    # 10 tokens: three steps of three words, then the box
    assert small_steps(MIX) == 3 and small_steps(TaskSpec(**{**MIX_TASK, "small_cap": 9})) == 2
    assert small_steps(TaskSpec(**{**MIX_TASK, "style": "merged"})) == 4  # two words a step
    assert small_steps(TaskSpec()) == 0
    for bad, field in (
        ({"min_steps": 7}, "min_steps"),
        ({"small_cap": 0}, "small_cap"),
        ({"p_stop": 1.0}, "p_stop"),
    ):
        with pytest.raises(ValueError, match=field):
            TaskSpec(**{**MIX_TASK, **bad})
    TaskSpec(steps=1, min_steps=1)  # a mixed family may hold one-step chains


def test_mix_lengths_are_drawn_uniformly_and_the_classic_draw_is_unchanged():
    counts = Counter(c.steps for c in chains(MIX, 2000, seed=5))
    assert set(counts) == {2, 3, 4, 5, 6}
    assert all(330 <= n <= 470 for n in counts.values()), counts  # 400 each expected
    # The classic family draws no length: the same rng calls, so today's problems are unchanged.
    rng_a, rng_b = random.Random(3), random.Random(3)
    classic = sample_chain(rng_a, TaskSpec())
    ops = []
    for _ in range(6):
        op = rng_b.choice(("+", "-", "*"))
        ops.append((op, rng_b.choice(TaskSpec().operand_digits(op))))
    assert classic == Chain(rng_b.randrange(10), tuple(ops), 10, "split")


def test_mix_problems_load_as_a_data_source():
    test, train = load_problems("mix", "test", limit=200), load_problems("mix", "train", limit=400)
    assert not {p.question for p in test} & {p.question for p in train}
    assert {parse_question(p.question).steps for p in test} == {2, 3, 4, 5, 6}
    assert all(int(p.answer) == parse_question(p.question).answer for p in test)
    with pytest.raises(DataError, match="mix"):
        task_spec("mixed")


def test_minimal_signal_is_empty_where_m_can_do_it_alone():
    short = Chain(7, (("+", 4), ("*", 7), ("-", 2)), 10, "split")
    assert minimal_signal(short, MIX) == ""  # k = 3: m writes all three steps itself
    long = Chain(7, (("+", 4), ("*", 7), ("-", 2), ("+", 1), ("*", 3)), 10, "split")
    assert minimal_signal(long, MIX) == "S1 +4 1 S2 *7 7"  # m writes S3..S5 (9 words) and the box
    assert minimal_signal(long, TaskSpec()) == long.necessary_trace(4)  # classic: m finishes one step
    # m given the minimal signal and writing its own steps reaches the answer within its cap
    for c in chains(MIX, 200, seed=6):
        z = minimal_signal(c, MIX)
        own = c.necessary_trace().split()[len(z.split()) :]
        assert len(own) + 1 <= MIX.small_cap
        assert len(z.split()) == 3 * max(0, c.steps - 3)


def test_missing_words_by_hand():
    c = Chain(7, (("+", 4), ("*", 7), ("-", 2)), 10, "split")
    blocks = [["start", "at", "7"], ["hmm", "S1", "+4", "1", "so", "1"], ["S2", "*7", "7"], ["S3", "-2", "5"]]
    assert missing_words(blocks, c, 0) == c.necessary_trace().split()
    assert missing_words(blocks, c, 4) == c.necessary_trace().split()  # cut inside the hesitation
    assert missing_words(blocks, c, 5) == ["+4", "1", "S2", "*7", "7", "S3", "-2", "5"]  # cut inside S1
    assert missing_words(blocks, c, 9) == ["S2", "*7", "7", "S3", "-2", "5"]  # cut in S1's filler
    assert missing_words(blocks, c, 14) == ["5"]
    assert missing_words(blocks, c, 15) == []


def test_m_targets_stay_within_its_cap_and_complete_the_chain():
    rng = random.Random(7)
    kinds = Counter()
    for c in chains(MIX, 600, seed=8):
        signal, target = small_target_capped(rng, c, MIX)
        words = target.split()
        assert words[-1] == answer_text(c.answer) and len(words) <= MIX.small_cap
        assert grade(target, c.problem("p")) == 1.0
        own = words[:-1]
        if own:  # m's own words finish the necessary trace the signal started
            necessary = c.necessary_trace().split()
            assert necessary[len(necessary) - len(own) :] == own
        kinds["none" if signal is None else "signal"] += 1
        if signal is None:
            # alone, m writes the whole chain where it fits (k <= 3) and guesses at once otherwise
            assert (len(own) == 3 * c.steps) == (c.steps <= 3), (c.steps, target)
    assert 0.1 < kinds["none"] / 600 < 0.3


def test_m_examples_use_the_capped_targets(tiny_tokenizer):
    from duetlm.lab.recipes import build_tokenizer
    from duetlm.lab.warmstart import small_example

    tok = build_tokenizer(MIX)
    rng = random.Random(9)
    c = Chain(7, (("+", 4), ("*", 7)), 10, "split")
    completions = {small_example(tok, rng, c, MIX)[1] for _ in range(50)}
    # with no signal at all m writes the two-step chain itself
    assert any(x.endswith("S1 +4 1 S2 *7 7 \\boxed{7}") for x in completions), completions


def test_some_warm_start_traces_of_m_stop_early():
    rng = random.Random(10)
    full = stopped = 0
    for c in chains(MIX, 1000, seed=11):
        blocks = verbose_blocks(rng, c, MIX)
        kept = stop_early(rng, blocks, MIX)
        assert kept == blocks[: len(kept)] and len(kept) >= 1
        full += len(kept) == len(blocks)
        stopped += len(kept) < len(blocks)
    assert 0.15 < stopped / 1000 < 0.25  # p_stop = 0.2
    classic = TaskSpec()
    a, b = random.Random(1), random.Random(1)
    c = chains(classic, 1, seed=2)[0]
    assert stop_early(a, verbose_blocks(a, c, classic), classic) == verbose_blocks(b, c, classic)
    assert a.random() == b.random()  # no draw at p_stop = 0


def test_m_warm_start_example_keeps_the_answer_after_an_early_stop(tiny_tokenizer):
    from duetlm.lab.recipes import build_tokenizer

    tok = build_tokenizer(MIX)
    rng = random.Random(12)
    c = chains(MIX, 1, seed=13)[0]
    for _ in range(20):
        _, completion = large_example(tok, rng, c, MIX)
        assert completion.endswith(answer_text(c.answer))


def test_task_config_names_the_families():
    from duetlm.lab.demo import quick_config, task_config

    mix = task_config("mix")
    assert mix.task.spec() == MIX
    assert mix.eval.max_answer_tokens == mix.rl.rollout.small.max_new_tokens == MIX.small_cap
    assert quick_config("mix").eval.max_answer_tokens == MIX.small_cap
    with pytest.raises(DuetError, match="valid: chain, mix"):
        task_config("sudoku")


def test_lab_properties_quick_end_to_end(tmp_path):
    from typer.testing import CliRunner

    from duetlm.cli import app

    out = tmp_path / "props"
    env = {"DUETLM_CACHE": str(tmp_path / "cache")}
    r = CliRunner().invoke(app, ["lab", "properties", "--quick", "--output", str(out)], env=env)
    assert r.exit_code == 0, r.output
    data = json.loads((out / "properties.json").read_text())
    rows = {row["k"]: row for row in data["rows"]}
    assert set(rows) <= {0, 2, 3, 4, 5, 6} and 0 in rows
    assert rows[0]["problems"] == 24 == sum(row["problems"] for k, row in rows.items() if k)
    for k, row in rows.items():
        if k:
            assert row["minimal_words"] == 3 * max(0, k - 3) and row["necessary_words"] == 3 * k
    assert data["small_steps"] == 3 and data["caps"]["answer"] == 10
    assert "m + minimal z" in r.output
    bad = CliRunner().invoke(app, ["lab", "properties", "--quick", "--task", "sudoku"], env=env)
    assert bad.exit_code != 0 and "valid: chain, mix" in bad.output


@pytest.mark.slow
def test_mix_properties_at_full_size(tmp_path):
    """The properties the lab issue asks of the `mix` family, measured on the warm-started pair (seed 0,
    300 test problems, greedy; about 15 minutes here from an empty cache, seconds from a warm one).
    Measured 2026-12-07: M alone 0.983, m alone 0.507 (1.000 at k = 2, 3; 0.12-0.17 at k >= 4; 0.487
    over lengths equally weighted), m given
    the minimal signal 1.000, M's thinking 20 words where 6 are necessary (k = 2)."""
    import os
    from pathlib import Path

    from duetlm.lab.demo import task_config
    from duetlm.lab.properties import measure
    from duetlm.models import cache_dir

    cache = Path(os.environ["DUETLM_CACHE"]) if "DUETLM_CACHE" in os.environ else cache_dir()
    rows, _ = measure(task_config("mix"), cache, lambda s: None)
    by_k = {r.k: r for r in rows}
    whole = by_k.pop(0)
    assert whole.large_accuracy >= 0.95  # M alone solves the task
    # The paper's regime, m alone at 0.35-0.50, over the family's uniform lengths: the mean of the
    # per-length accuracies (0.487 measured). The 300 test problems hold 42% of k <= 3 against the
    # family's 40%, so their plain mean reads 0.507.
    balanced = sum(r.small_alone for r in by_k.values()) / len(by_k)
    assert 0.35 <= balanced <= 0.50
    assert by_k[2].small_alone >= 0.95 and by_k[6].small_alone <= 0.25  # easy alone; near chance long
    assert whole.small_minimal >= 0.9  # m given only what it cannot produce itself
    assert all(r.minimal_words < r.necessary_words for r in by_k.values() if r.k > 1)
    assert all(r.large_think_tokens >= 2 * r.necessary_words for r in by_k.values())  # verbose everywhere


def test_quick_demo_runs_on_the_mix_family(tmp_path):
    from typer.testing import CliRunner

    from duetlm.cli import app

    env = {"DUETLM_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["demo", "--quick", "--task", "mix", "--output", str(out)], env=env)
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["task"]["min_steps"] == 2 and res["config"]["eval"]["max_answer_tokens"] == 10
    assert res["config"]["rl"]["objective"]["budget"] == 6.0
    # m answers within its 10-token cap everywhere it answers
    records = [json.loads(x) for x in (out / "eval" / "warm" / "results.jsonl").read_text().splitlines()]
    assert max(x["small_tokens"] for x in records) <= 10
