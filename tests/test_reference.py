"""docs/config.md against the schemas, and the config errors that point to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from duetlm.config import ConfigError, TrainConfig, build_config
from duetlm.reference import DOC_PATH, REGENERATE, commands, keys, markdown

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_reference_is_the_generated_one():
    assert (ROOT / DOC_PATH).read_text() == markdown(), f"docs/config.md is stale: run `{REGENERATE}`"


def test_every_key_is_documented():
    for title, _, cls in commands():
        found = list(keys(cls))
        assert found, title
        undocumented = [k.name for k in found if not k.description]
        assert not undocumented, f"{title}: give these fields a description: {undocumented}"
    names = {k.name: k for k in keys(TrainConfig)}
    # nested sections are dotted as --set takes them; an optional section's own keys are listed too
    assert names["rollout.large.temperature"].default == "1.0"
    assert names["small"].default == "null" and "small.path" in names
    assert names["large.path"].default == "required"
    assert names["large.engine"].type == '"hf" | "vllm" | "remote"'


def test_a_section_default_reports_its_own_values():
    from duetlm.lab.demo import DemoConfig

    demo = {k.name: k for k in keys(DemoConfig)}
    assert (
        demo["warm_large.steps"].default != demo["warm_small.steps"].default
    )  # 250 vs 450, not SFTConfig's 400


MINIMAL = {"large": {"path": "M"}, "small": {"path": "m"}, "data": {"source": "lab:chain"}}


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        ({"foo": 1}, "foo: unknown key; valid keys at the top level: mode, schedule, seed, large, small,"),
        ({"rollout": {"nn": 2}}, "rollout.nn: unknown key; valid keys in rollout: batch_size, n, n_small,"),
        (
            {"rollout": {"large": {"temp": 1}}},
            "valid keys in rollout.large: temperature, top_p, top_k, max_new_tokens",
        ),
    ],
)
def test_an_unknown_key_lists_its_section(update, expected):
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, {**MINIMAL, **update}, "test")
    assert expected in str(err.value) and "docs/config.md" in str(err.value)


def test_a_bad_value_names_the_field_without_the_config():
    with pytest.raises(ConfigError) as err:
        build_config(TrainConfig, {**MINIMAL, "rollout": {"n": 1}}, "test")
    text = str(err.value)
    assert "rollout.n must be >= 2" in text and "(got 1)" in text
    assert "{" not in text and len(text.splitlines()) == 2  # the heading and one line, no dump
    with pytest.raises(ConfigError, match=r"optim\.lr_large: .*greater than 0 \(got -1\)"):
        build_config(TrainConfig, {**MINIMAL, "optim": {"lr_large": -1}}, "test")
