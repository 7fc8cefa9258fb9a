import pytest

from duetlm.config import ConfigError, ModelConfig, SamplingConfig, Strict, load_config, parse_overrides


class Run(Strict):
    model: ModelConfig
    sampling: SamplingConfig = SamplingConfig()
    steps: int = 3


def test_yaml_and_dotted_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  path: smollm2-135m\nsampling:\n  temperature: 1.0\n")
    cfg = load_config(Run, f, ["sampling.temperature=0.6", "steps=10", "model.dtype=bfloat16"])
    assert cfg.sampling.temperature == 0.6 and cfg.steps == 10 and cfg.model.dtype == "bfloat16"
    assert cfg.sampling.max_new_tokens == 256  # default kept


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  path: x\n  tempreature: 1\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*\n.*model\.tempreature: unknown key"):
        load_config(Run, f)


def test_wrong_type_names_key(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  path: x\n")
    with pytest.raises(ConfigError, match=r"steps: .*'many'"):
        load_config(Run, f, ["steps=many"])
    with pytest.raises(ConfigError, match="sampling.temperature"):
        load_config(Run, f, ["sampling.temperature=-1"])


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_overrides(["nonsense"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "absent.yaml")
    assert parse_overrides(["a.b=[1, 2]", "a.c=null", "d=true"]) == {"a": {"b": [1, 2], "c": None}, "d": True}


def test_constant_lambda_schedule_needs_a_nonzero_lambda():
    # −LPS is a constant nonzero λ; λ ≡ 0 would silently drop the length penalty altogether.
    from duetlm.config import ObjectiveConfig

    with pytest.raises(ValueError, match="lambda_init > 0"):
        ObjectiveConfig(lambda_schedule="constant")
    assert ObjectiveConfig(lambda_schedule="constant", lambda_init=0.1).lambda_init == 0.1
