"""The lab: task generator, tokenizer, warm start, and `duetlm demo --quick` end to end."""

from __future__ import annotations

import functools
import json
import random
import re

import pytest
import torch

from duetlm import protocol
from duetlm.errors import DataError
from duetlm.grading import grade
from duetlm.lab import load_problems, task_spec
from duetlm.lab.recipes import ModelRecipe, build_model, build_tokenizer
from duetlm.lab.task import (
    Chain,
    TaskSpec,
    answer_text,
    chains,
    parse_question,
    verbose_blocks,
)
from duetlm.lab.warmstart import (
    SFTConfig,
    collate,
    example_stream,
    large_example,
    lr_factor,
    sft,
    small_example,
    small_target,
)

CHAIN = Chain(7, (("+", 4), ("*", 7), ("-", 2)), 10, "split")


def test_chain_values_by_hand():
    # 7+4=11->1; 1*7=7; 7-2=5
    assert CHAIN.values() == [1, 7, 5]
    assert CHAIN.answer == 5
    assert CHAIN.question() == "7 S1 +4 S2 *7 S3 -2"
    assert CHAIN.necessary_trace() == "S1 +4 1 S2 *7 7 S3 -2 5"
    assert CHAIN.necessary_trace(upto=2) == "S1 +4 1 S2 *7 7"
    merged = Chain(7, CHAIN.ops, 10, "merged")
    assert merged.question() == "7 S1+4 S2*7 S3-2"
    assert merged.necessary_trace() == "S1 1 S2 7 S3 5"
    assert Chain(3, (("-", 9), ("*", 4)), 10).values() == [4, 6]  # 3-9 = -6 -> 4 (mod 10)


@pytest.mark.parametrize("style", ["split", "merged"])
def test_parse_question_round_trips(style):
    spec = TaskSpec(style=style, steps=5)
    for c in chains(spec, 50, seed=1):
        assert parse_question(c.question()) == c


@pytest.mark.parametrize(
    ("question", "culprit"),
    [("", "start number"), ("x S1 +4", "start number"), ("7 S2 +4", "'S2+4'"), ("7 S1+4 S3*2", "'S3*2'")],
)
def test_bad_question_names_the_word(question, culprit):
    with pytest.raises(DataError, match=re.escape(culprit)):
        parse_question(question)


def test_task_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="steps"):
        TaskSpec(steps=1)
    with pytest.raises(ValueError, match="style"):
        TaskSpec(style="fancy")
    with pytest.raises(ValueError, match="p_check"):
        TaskSpec(p_check=1.0)


def test_verbose_trace_wraps_the_necessary_steps_in_filler():
    spec = TaskSpec()
    rng = random.Random(0)
    lengths = []
    for c in chains(spec, 200, seed=2):
        blocks = verbose_blocks(rng, c, spec)
        assert len(blocks) == spec.steps + 1
        for i, block in enumerate(blocks[1:], 1):
            # each step block holds the step's necessary words, in order, once
            step = c.step_words(i)
            at = block.index(step[0])
            assert block[at : at + len(step)] == step
        # every number the filler repeats is the value of the step it follows (or the start)
        words = [w for b in blocks for w in b]
        lengths.append(len(words))
        assert set(words) <= set(spec.vocabulary())
    necessary = 3 * spec.steps
    mean = sum(lengths) / len(lengths)
    assert mean > 2 * necessary, f"verbose traces should be far longer than the {necessary} necessary words"
    assert min(lengths) < max(lengths), "verbosity must vary"


def test_problem_sets_are_distinct_and_exclusive():
    spec = TaskSpec()
    a = chains(spec, 300, seed=3)
    assert len({c.question() for c in a}) == 300
    b = chains(spec, 300, seed=4, exclude=frozenset(c.question() for c in a))
    assert not {c.question() for c in a} & {c.question() for c in b}
    assert chains(spec, 5, seed=3) == a[:5]  # reproducible


def test_load_problems_splits_never_share_a_question():
    test = load_problems("chain", "test", limit=100)
    train = load_problems("chain", "train", limit=300)
    val = load_problems("chain", "validation", limit=50)
    qs = [{p.question for p in s} for s in (test, train, val)]
    assert not (qs[0] & qs[1]) and not (qs[0] & qs[2]) and not (qs[1] & qs[2])
    assert all(p.source == "lab" and p.kind == "math" for p in train)
    assert int(train[0].answer) == parse_question(train[0].question).answer
    assert task_spec("chain4-merged") == TaskSpec(steps=4, style="merged")
    with pytest.raises(DataError, match="unknown lab task"):
        load_problems("sudoku")
    with pytest.raises(DataError, match="no split 'dev'"):
        load_problems("chain", "dev")


def test_trainer_source_hook_reaches_the_lab():
    from duetlm.problems import load_source

    problems = load_source("lab:chain5", "validation", 7)
    assert len(problems) == 7 and problems[0].question.count("S") == 5


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TaskSpec())


def test_tokenizer_one_token_per_word_and_chat_format(tok):
    spec = TaskSpec()
    rng = random.Random(0)
    unk = tok.unk_token_id
    for c in chains(spec, 20, seed=5):
        prompt, completion = large_example(tok, rng, c, spec)
        # M's prompt is the chat template with thinking on: M opens <think> itself
        assert protocol.supports_thinking(tok)
        assert prompt.endswith("<|im_start|>assistant\n") and "<think>" not in prompt
        assert completion.startswith("<think>\n") and "\n</think>\n\n\\boxed{" in completion
        ids = tok.encode(prompt + completion, add_special_tokens=False)
        assert unk not in ids
        words = (prompt + completion).replace("<", " <").replace(">", "> ").split()
        assert len(ids) == len(words)
        # the answer format is graded correctly by the project's grader, wrong values are not
        assert grade(completion, c.problem("x")) == 1.0
        assert grade(answer_text((c.answer + 1) % 10), c.problem("x")) == 0.0


def test_small_targets_none_full_and_finish_the_last_step(tok):
    """m's warm-start examples: m answers directly when the signal is complete (or hopeless), and writes
    the missing last step itself when the signal holds the value after step n-1."""
    spec = TaskSpec()
    rng = random.Random(1)
    c = chains(spec, 1, seed=6)[0]
    n, values = spec.steps, c.values()
    box = answer_text(c.answer)
    kinds = {"none": 0, "complete": 0, "finish": 0, "guess": 0}
    for _ in range(400):
        z, target = small_target(rng, c, spec)
        if z is None:
            assert target == box
            kinds["none"] += 1
            continue
        words = z.split()
        assert " ".join(words) == z and set(words) <= set(spec.vocabulary())
        has = [f"S{i}" in words and c.step_words(i)[-1] in words[words.index(f"S{i}") :] for i in (n - 1, n)]
        done_last = f"S{n}" in words and len(words) > words.index(f"S{n}") + 2
        if done_last:
            assert target == box
            kinds["complete"] += 1
        elif has[0] and words[words.index(f"S{n - 1}") + 2] == str(values[n - 2]):
            # the value after step n-1 is there: m writes what is missing of the last step, then boxes
            assert target.endswith(" " + box) and target.split()[-2] == str(values[-1]), (z, target)
            assert " ".join(words[-2:] + target.split()[:-1]).endswith(" ".join(c.step_words(n)[-1:]))
            kinds["finish"] += 1
        else:
            assert target == box
            kinds["guess"] += 1
    assert all(v > 20 for v in kinds.values()), kinds
    prompt, completion = small_example(tok, rng, c, spec)
    assert completion.startswith("<think>\n") and completion.endswith("\\boxed{" + str(c.answer) + "}")
    assert prompt.endswith("<|im_start|>assistant\n")  # the signal's words are in the loss (signal_loss)
    prompt, completion = small_example(tok, rng, c, spec, signal_loss=False)
    assert "</think>" in prompt and "<think>" not in completion


def test_collate_masks_everything_but_the_completion(tok):
    examples = [("<|im_start|>user\n7 S1 +4<|im_end|>\n", "\\boxed{1}"), ("a", "\\boxed{2} ok ok")]
    ids, mask, labels = collate(tok, examples)
    # <|im_start|> user 7 S1 +4 <|im_end|> | \boxed{1} <|im_end|>   and   <unk> | \boxed{2} ok ok <|im_end|>
    assert ids.shape == mask.shape == labels.shape == (2, 8)
    eos = tok.eos_token_id
    first = tok.encode("\\boxed{1}", add_special_tokens=False)
    assert len(first) == 1
    assert labels[0].tolist() == [-100] * 6 + first + [eos]
    assert mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]  # right padding
    assert labels[1, 1:5].tolist() == tok.encode("\\boxed{2} ok ok", add_special_tokens=False) + [eos]
    assert labels[1, 5:].tolist() == [-100] * 3


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = SFTConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.55)  # cosine midpoint: (1 + 0.1) / 2
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_sft_learns_the_answer_format(tok):
    """A few steps of the warm start on a tiny m: the loss on the answer tokens falls clearly."""
    spec = TaskSpec()
    model = build_model(tok, ModelRecipe(hidden_size=32, num_layers=1, num_heads=2), seed=0)
    stream = example_stream(tok, functools.partial(small_example, signal_loss=False), spec, seed=0)
    logs = sft(model, tok, stream, SFTConfig(steps=40, batch_size=16, lr=1e-2, warmup_steps=4, bf16=False))
    first, last = sum(x.loss for x in logs[:5]) / 5, sum(x.loss for x in logs[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert not model.training
    # what it learned first is the answer format: m's answer opens with some \\boxed{v} or (when it
    # finishes the last step itself) the last step's name; 40 steps do not yet tell those cases apart
    qs = [c.question() for c in chains(spec, 16, seed=9)]
    ids, mask, _ = collate(tok, [(protocol.small_prompt(tok, q, None), "") for q in qs])
    last = mask.sum(1) - 2  # the position before the EOS that `collate` appends to the empty answer
    with torch.no_grad():
        probs = model(input_ids=ids, attention_mask=mask).logits.softmax(-1)  # (B, T, V)
    starts = [answer_text(v) for v in range(10)] + [f"S{spec.steps}"]
    valid = torch.tensor(tok.convert_tokens_to_ids(starts))
    mass = torch.stack([probs[r, last[r]][valid].sum() for r in range(16)])
    assert mass.mean() > 0.6, mass  # 11 of 95 tokens: 0.12 at random initialisation


# --------------------------------------------------------------------------------------------------
# duetlm demo --quick, end to end (the targets are checked by the full demo, not here)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from typer.testing import CliRunner

    from duetlm.cli import app

    root = tmp_path_factory.mktemp("demo")
    env = {"DUETLM_CACHE": str(root / "cache")}
    runner = CliRunner()
    first = runner.invoke(app, ["demo", "--quick", "--seed", "3", "--output", str(root / "run")], env=env)
    assert first.exit_code == 0, first.output
    results = json.loads((root / "run" / "results.json").read_text())
    # a second run reuses the warm start from the cache (and replaces its own earlier run directory)
    second = runner.invoke(
        app, ["demo", "--quick", "--seed", "3", "--output", str(root / "run"), "--set", "rl.steps=1"], env=env
    )
    assert second.exit_code == 0, second.output
    again = json.loads((root / "run" / "results.json").read_text())
    return root, results, first.output, again


def test_quick_demo_results_structure(quick_run):
    root, results, output, again = quick_run
    methods = results["methods"]
    expected = {"small", "original", "duet", "duet (warm start)", "small (trained m)", "truncation:8"}
    expected |= {"truncation-small:8", f"truncation:{results['duet_cap']}"}
    assert expected <= set(methods), set(methods)
    # Each row is the mean over the per-sample records of one evaluation the demo ran (the run directory
    # holds the second run's records).
    groups: dict[tuple[str, str], list[dict]] = {}
    for path in (root / "run" / "eval").glob("*/results.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            groups.setdefault((path.parent.name, rec["method"]), []).append(rec)
    means = {
        (
            round(sum(r["correct"] for r in g) / len(g), 4),
            round(sum(r["large_tokens"] for r in g) / len(g), 4),
        )
        for g in groups.values()
    }
    for name, m in again["methods"].items():
        assert (round(m["accuracy"], 4), round(m["large_tokens"], 4)) in means, name
        assert m["small_tokens"] >= 0 and m["seconds"] >= 0, name
        if name.startswith("small"):
            assert m["large_tokens"] == 0 and m["ipt"] is None, name
        else:
            assert m["large_tokens"] > 0, name
            assert m["ipt"] == pytest.approx(1000 * m["accuracy"] / m["large_tokens"]), name
        if name.startswith(("duet", "small", "truncation-small")):
            assert m["small_tokens"] > 0, name
    assert results["seed"] == 3 and results["config"]["seed"] == 3
    assert results["T0"] == methods["original"]["large_tokens"]
    assert set(results["targets"]) == {
        "wall_clock_le_900s",
        "original_accuracy_ge_0.85",
        "small_alone_le_0.40",
        "duet_tokens_le_0.40_T0",
        "duet_accuracy_ge_original_minus_0.02",
        "truncation_at_duet_tokens_le_duet_minus_0.10",
    }
    # The targets compare the rows above; those that hold at toy sizes (a tiny m cannot solve the task
    # alone; the whole quick demo takes seconds) are met.
    targets = results["targets"]
    assert targets["wall_clock_le_900s"]["met"] and targets["small_alone_le_0.40"]["met"]
    assert targets["small_alone_le_0.40"]["accuracy"] == round(methods["small"]["accuracy"], 4)
    original, duet = targets["original_accuracy_ge_0.85"], targets["duet_accuracy_ge_original_minus_0.02"]
    assert original["accuracy"] == duet["original"] == round(methods["original"]["accuracy"], 4)
    assert original["met"] == (original["accuracy"] >= 0.85)
    assert duet["met"] == (duet["duet"] >= duet["original"] - 0.02)
    tokens = targets["duet_tokens_le_0.40_T0"]
    assert tokens["duet_tokens"] == round(methods["duet"]["large_tokens"], 4) and tokens["T0"] == round(
        results["T0"], 4
    )
    assert tokens["met"] == (tokens["duet_tokens"] <= 0.40 * tokens["T0"])
    curves = results["training"]["curves"]
    assert [s for s, _ in curves["lambda"]] == [1, 2] and len(curves["val/accuracy"]) == 2
    assert results["warm_start"]["large"]["cached"] is False
    assert results["warm_start"]["small"]["cached"] is False
    run = root / "run"
    for name in (
        "pareto.png",
        "curves.png",
        "demo-config.yaml",
        "train/metrics.jsonl",
        "eval/warm/results.jsonl",
    ):
        assert (run / name).is_file(), name
    assert "accuracy" in output and "IPT" in output  # the table was printed
    table = (run / "table.md").read_text()  # and saved, with each row of results.json and the targets
    for name, row in results["methods"].items():
        assert f"| {name} |" in table and f"| {row['accuracy']:.3f} |" in table, name
    assert table.count("- met") + table.count("- NOT MET") == len(results["targets"])


def test_quick_demo_second_run_uses_the_cache(quick_run):
    _, first, _, again = quick_run
    for role in ("large", "small"):
        assert again["warm_start"][role]["cached"] is True
        assert again["warm_start"][role]["key"] == first["warm_start"][role]["key"]
    # same warm-started models, greedy: the baselines are identical
    for name in ("small", "original", "truncation:8"):
        assert again["methods"][name]["accuracy"] == first["methods"][name]["accuracy"], name
        assert again["methods"][name]["large_tokens"] == first["methods"][name]["large_tokens"], name
    assert [s for s, _ in again["training"]["curves"]["lambda"]] == [1]


def test_demo_refuses_a_foreign_directory_and_bad_config(tmp_path):
    from typer.testing import CliRunner

    from duetlm.cli import app

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    runner = CliRunner()
    res = runner.invoke(app, ["demo", "--quick", "--output", str(tmp_path / "mine")])
    assert res.exit_code == 1 and "not a demo run" in res.output
    assert (tmp_path / "mine" / "notes.txt").is_file()
    res = runner.invoke(app, ["demo", "--quick", "--set", "task.steps=1", "--output", str(tmp_path / "x")])
    assert res.exit_code == 1 and "task.steps" in res.output
    res = runner.invoke(
        app, ["demo", "--quick", "--set", "task.style=fancy", "--output", str(tmp_path / "x")]
    )
    assert res.exit_code == 1 and "style" in res.output
