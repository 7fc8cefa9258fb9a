"""Typed configuration: pydantic models, YAML files, and dotted CLI overrides.

Every config class derives from `Strict`, which forbids unknown keys, so a typo is an error naming the
key instead of a silently ignored option. `load_config(cls, path, overrides)` reads a YAML file, applies
`a.b.c=value` overrides (values parsed as YAML: `0.6`, `true`, `[1, 2]`, `null`), validates, and raises
`ConfigError` whose message names the file and each offending key.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from duetlm.errors import DuetError
from duetlm.modes import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    LAMBDA_SCHEDULES,
    LENGTH_MEASURES,
    MODES,
    MU_BASELINES,
    SCHEDULES,
    SMALL_GROUPS,
    check_name,
)

T = TypeVar("T", bound=BaseModel)


class ConfigError(DuetError, ValueError):
    """A config that cannot be used; the message says which key, in which file, and why."""


class Strict(BaseModel):
    """Base of all configs: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


DType = Literal["auto", "float32", "bfloat16", "float16"]


class ModelConfig(Strict):
    """Where a model comes from and how it runs.

    `path`: a Hugging Face hub id, a local directory, a `.gguf` file, or a registered short name
    (`smollm2-135m`; see `duetlm.models.SHORT_NAMES`).
    """

    path: str = Field(description="hub id, local directory, .gguf file or short name")
    dtype: DType = Field("auto", description="weights dtype; auto = float32 on CPU, bfloat16 on CUDA")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    engine: Literal["hf", "vllm", "remote"] = Field("hf", description="generation engine")
    url: str | None = Field(None, description="base URL of an OpenAI-compatible server (engine: remote)")
    lora: bool = Field(False, description="train a LoRA adapter instead of all weights")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory)"
    )


class SamplingConfig(Strict):
    """Decoding options for one model (see `duetlm.engines.SamplingParams`)."""

    temperature: float = Field(1.0, ge=0.0, description="sampling temperature; 0 = greedy")
    top_p: float = Field(
        1.0, gt=0.0, le=1.0, description="nucleus sampling: keep the top tokens of this mass"
    )
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0: all)")
    max_new_tokens: int = Field(
        256, ge=1, description="cap on generated tokens (M: on the signal z; m: on the answer)"
    )


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key.path=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {pair!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {pair!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `update` merged into `base`, recursively for nested dicts."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds (directly or as `X | None`), else None (a leaf)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def section_keys(cls: type[BaseModel], section: tuple[Any, ...]) -> list[str] | None:
    """The keys directly under `section` of `cls` (`("rollout",)` -> n, n_small, large, ...), or None
    when the path names no section."""
    for part in section:
        field = cls.model_fields.get(str(part))
        sub = section_class(field.annotation) if field is not None else None
        if sub is None:
            return None
        cls = sub
    return list(cls.model_fields)


def _got(value: Any) -> str:
    """The offending value, short: a scalar as given; never a whole section (or the whole config)."""
    if isinstance(value, (dict, list, tuple)):
        return ""
    text = repr(value)
    return f" (got {text[:80]}{'...' if len(text) > 80 else ''})"


def format_validation_error(err: ValidationError, origin: str, cls: type[BaseModel] | None = None) -> str:
    """One line per problem, naming the key and the fix: an unknown key lists its section's valid
    keys (from `cls`); a value names what it got, never the whole config."""
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            where = ".".join(str(p) for p in e["loc"][:-1])
            valid = section_keys(cls, tuple(e["loc"][:-1])) if cls is not None else None
            hint = (
                f"; valid keys {'in ' + where if where else 'at the top level'}: {', '.join(valid)}"
                if valid
                else ""
            )
            lines.append(f"  {loc}: unknown key{hint} (every key: docs/config.md)")
        elif e["type"] == "missing":
            lines.append(f"  {loc}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}{_got(e.get('input'))}")
    return "\n".join(lines)


def build_config(cls: type[T], data: dict[str, Any], origin: str = "<dict>") -> T:
    """Validate `data` as `cls`, turning pydantic's error into a `ConfigError` that names `origin`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, origin, cls)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read `path` (YAML; optional), apply dotted `overrides`, validate as `cls`."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
        data = loaded
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        origin += " + --set overrides"
    return build_config(cls, data, origin)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# --------------------------------------------------------------------------------------------------
# Training (`duetlm train`; algorithm.md §2-§5, paper Appendix C). Names of dispatched choices (mode,
# mu_baseline, advantage, loss_agg, ...) are checked against `duetlm.modes` (torch-free; the dispatch
# tables of objective.py and grpo.py must cover exactly those names), so a typo lists the valid names.


def one_of(valid: Any, what: str) -> AfterValidator:
    """A field validator: the value must be one of `valid`'s names (the error lists them)."""
    return AfterValidator(lambda v: check_name(v, valid, what))


class LoraSettings(Strict):
    """LoRA adapter options (peft), used for each model whose `lora: true`."""

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input")
    target_modules: str | list[str] = Field(
        "all-linear", description="modules to adapt: 'all-linear' or a list of module names"
    )


class DataConfig(Strict):
    """Where training and validation problems come from.

    `source` (and `val_source`) is anything `duetlm.problems.load_problems` accepts (a registered name
    such as `deepscaler`, `math-lighteval`, `dapo17k`, `math500`; a .jsonl/.json/.parquet/.csv file; a
    Hugging Face dataset id) or `PREFIX:NAME` for a registered source hook (`lab:<task>` for
    `duetlm.lab`; see `duetlm.problems.register_source`).
    """

    source: str | None = Field(
        None,
        description="training problems (registered name, file, HF dataset id, lab:<task>); required "
        "unless the caller passes the problems itself",
    )
    split: str | None = Field(None, description="split of `source` (its loader's default when unset)")
    limit: int | None = Field(None, ge=1, description="use only the first `limit` problems of `source`")
    val_source: str | None = Field(
        None, description="held-out problems for validation; unset: hold `val_size` out of `source`"
    )
    val_split: str | None = Field(None, description="split of `val_source`")
    val_size: int = Field(
        0, ge=0, description="validation problems (first of val_source, or a seeded hold-out of source)"
    )
    data_dir: str | None = Field(
        None, description="offline mirror of registered datasets (default: $DUETLM_DATA_DIR)"
    )
    question_field: str | None = Field(None, description="question column of a file or hub dataset")
    answer_field: str | None = Field(None, description="answer column of a file or hub dataset")
    id_field: str | None = Field(None, description="id column of a file or hub dataset")
    solution_field: str | None = Field(
        None, description="solution column whose last \\boxed{} is the answer (when there is no answer)"
    )
    answer_format: str = Field("plain", description="plain | number | gsm8k (files and hub datasets)")

    def load_options(self) -> dict[str, Any]:
        """Keyword options for `duetlm.problems.load_problems` (only those that were set)."""
        options = {
            "data_dir": self.data_dir,
            "question_field": self.question_field,
            "answer_field": self.answer_field,
            "id_field": self.id_field,
            "solution_field": self.solution_field,
        }
        if self.answer_format != "plain":
            options["answer_format"] = self.answer_format
        return {k: v for k, v in options.items() if v is not None}


# The keyword options of `duetlm.engines.vllm.VLLMEngine` a training config may set (`rollout.vllm`);
# a test keeps this in step with the engine's signature, which config.py does not import.
VLLM_OPTIONS = (
    "max_model_len",
    "enforce_eager",
    "gpu_memory_utilization",
    "kv_cache_gib",
    "sleep_mode",
    "llm_kwargs",
)


class RolloutConfig(Strict):
    """One step's rollouts: prompts, group sizes, and decoding for M and m (algorithm.md §2 items 1-3)."""

    batch_size: int = Field(64, ge=1, description="prompts per step")
    n: int = Field(4, ge=1, description="M rollouts per prompt: the GRPO group size (>= 2)")
    n_small: int = Field(
        4, ge=1, description="n_m: m's answers per signal, and m's samples for the unguided baseline"
    )
    large: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=16384),
        description="M's decoding (its thinking; DUET stops at the end-of-thinking marker)",
    )
    small: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, max_new_tokens=2048),
        description="m's decoding (its answer)",
    )
    engine_batch_size: int = Field(64, ge=1, description="sequences decoded together by the HF engine")
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="M's longest prompt in tokens, template included (paper: 1024); longer problems are "
        "skipped, never cut, and counted (data/prompts_skipped). m's prompt is bounded by it plus M's "
        "max_new_tokens. null: no limit",
    )
    vllm: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the VLLMEngine of a model with engine: vllm (max_model_len, kv_cache_gib, "
        "gpu_memory_utilization: leave GPU memory for the training copy, ...)",
    )
    generation_block: int | None = Field(
        None,
        ge=1,
        description="prompts per seeded generation call (null: one call per process). Each call's seed "
        "derives from (seed, step, role, its first prompt's index in the global batch), so with a block "
        "that divides batch_size / processes the samples do not depend on the number of processes",
    )

    @field_validator("vllm")
    @classmethod
    def _vllm_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        valid = VLLM_OPTIONS
        unknown = sorted(set(v) - set(valid))
        if unknown:
            raise ValueError(f"unknown rollout.vllm option(s) {unknown}; valid: {', '.join(valid)}")
        return v

    @model_validator(mode="after")
    def _block(self) -> RolloutConfig:
        if self.generation_block is not None and self.batch_size % self.generation_block:
            raise ValueError(
                f"rollout.generation_block={self.generation_block} must divide rollout.batch_size="
                f"{self.batch_size}"
            )
        return self


class ObjectiveConfig(Strict):
    """M's reward and the multiplier λ (algorithm.md §2; objective.py)."""

    budget: float = Field(1000.0, gt=0, description="B: the token budget of the length term λ·L/B")
    mu_baseline: Annotated[str, one_of(MU_BASELINES, "mu_baseline")] = Field(
        "per_rollout", description="marginal-utility baseline b: per_rollout | per_prompt | none"
    )
    length_measure: Annotated[str, one_of(LENGTH_MEASURES, "length_measure")] = Field(
        "response", description="L_i: response (all of M's tokens) | signal (|z|)"
    )
    kl_coef: float = Field(
        0.001, ge=0.0, description="β of the k1 KL term in M's reward; > 0 keeps a frozen reference copy of M"
    )
    kl_loss_coef: float = Field(
        0.0,
        ge=0.0,
        description="weight of a k3 KL(π ‖ π_ref) term in M's loss (verl's use_kl_loss), beside or instead "
        "of kl_coef's term in the reward; > 0 keeps a frozen reference copy of M (none with LoRA)",
    )
    lambda_init: float = Field(0.0, ge=0.0, description="λ_0")
    lambda_step_size: float = Field(0.01, ge=0.0, description="η of the dual ascent")
    lambda_max: float | None = Field(1.0, ge=0.0, description="λ_max (null: no upper clip)")
    lambda_schedule: Annotated[str, one_of(LAMBDA_SCHEDULES, "lambda_schedule")] = Field(
        "adaptive", description="adaptive (dual ascent) | constant (−LPS ablation: λ held at lambda_init > 0)"
    )
    thinkprune_start: int = Field(8000, ge=1, description="ThinkPrune: first length limit (tokens)")
    thinkprune_step: int = Field(1000, ge=0, description="ThinkPrune: limit decrease per stage")
    thinkprune_every: int = Field(20, ge=1, description="ThinkPrune: steps per stage")
    thinkprune_floor: int = Field(1000, ge=0, description="ThinkPrune: lowest limit")

    @property
    def uses_reference(self) -> bool:
        """A frozen reference π_ref is needed: a KL term in M's reward or in its loss."""
        return self.kl_coef > 0 or self.kl_loss_coef > 0

    @model_validator(mode="after")
    def _lambda_range(self) -> ObjectiveConfig:
        if self.lambda_max is not None and self.lambda_init > self.lambda_max:
            raise ValueError(
                f"objective.lambda_init={self.lambda_init} exceeds lambda_max={self.lambda_max}; "
                "lower lambda_init or raise lambda_max"
            )
        if self.lambda_schedule == "constant" and self.lambda_init == 0:
            # λ ≡ 0 is no length penalty at all, not the paper's −LPS (a constant nonzero coefficient).
            raise ValueError(
                "objective.lambda_schedule=constant holds λ at lambda_init=0: no length penalty at all, "
                "not the −LPS ablation; set objective.lambda_init > 0 (e.g. the mean `lambda` of the "
                "adaptive run's metrics.jsonl), or keep the adaptive schedule with lambda_step_size=0 for λ ≡ 0"
            )
        if self.thinkprune_floor > self.thinkprune_start:
            raise ValueError(
                f"objective.thinkprune_floor={self.thinkprune_floor} exceeds thinkprune_start="
                f"{self.thinkprune_start}"
            )
        return self


class GRPOConfig(Strict):
    """Advantages and the PPO-clip loss (algorithm.md §3; grpo.py)."""

    advantage: Annotated[str, one_of(ADVANTAGE_ESTIMATORS, "advantage estimator")] = Field(
        "grpo", description="M's advantage estimator: grpo | batch | global (§2.1)"
    )
    small_advantage: Annotated[str, one_of(ADVANTAGE_ESTIMATORS, "advantage estimator")] = Field(
        "grpo", description="m's advantage estimator"
    )
    norm_std: bool = Field(True, description="divide advantages by the std (false: Dr. GRPO centring)")
    eps: float = Field(1e-6, gt=0.0, description="ε added to the std")
    small_group: Annotated[str, one_of(SMALL_GROUPS, "small_group")] = Field(
        "per_signal", description="m's GRPO group: per_signal (answers to one z) | per_prompt"
    )
    loss_agg: Annotated[str, one_of(AGGREGATIONS, "loss_agg")] = Field(
        "token-mean", description="token-mean | seq-mean-token-mean | seq-mean-token-sum-norm"
    )
    clip_eps: float = Field(0.2, ge=0.0, lt=1.0, description="PPO clip ε")
    clip_eps_high: float | None = Field(None, ge=0.0, description="upper clip ε (null: clip_eps)")
    recompute_old_logprobs: bool = Field(
        False,
        description="recompute π_old with a forward pass instead of taking the engine's per-token "
        "log-probs (needed when rollouts ran in another precision or engine)",
    )


class OptimConfig(Strict):
    """AdamW, batching and precision (algorithm.md §3: lr 1e-6, weight decay 0.01, grad clip 1.0)."""

    lr_large: float = Field(1e-6, gt=0.0, description="M's learning rate (constant)")
    lr_small: float = Field(1e-6, gt=0.0, description="m's learning rate (constant)")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: float = Field(1.0, gt=0.0, description="max global grad norm per update")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per rollout batch (one PPO epoch)")
    micro_batch_size: int = Field(
        8, ge=1, description="sequences per forward/backward; gradients accumulate over a mini-batch"
    )
    autocast: Literal["off", "bf16", "auto"] = Field(
        "off",
        description="bf16 autocast of the training forward; auto: bf16 where the device computes it natively "
        "(CUDA, or a CPU with AVX512-BF16 / AMX), fp32 elsewhere (emulated bf16 is many times slower)",
    )
    logprob_chunk_size: int | None = Field(
        None, ge=1, description="compute token log-probs in chunks of this many positions (memory)"
    )


class RunConfig(Strict):
    """Run control: length, run directory, checkpoints, guard rails."""

    steps: int = Field(150, ge=1, description="training steps in all (a resumed run continues to this)")
    dir: str = Field("runs/duet", description="run directory (config, metrics, checkpoints)")
    save_every: int = Field(10, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_last: int = Field(3, ge=1, description="keep the newest K checkpoints")
    keep_steps: list[int] = Field(
        default_factory=list,
        description="checkpoints of these steps are never pruned (the paper evaluates steps 50, 100, 150)",
    )
    max_bad_steps: int = Field(3, ge=1, description="stop after K updates in a row with a NaN/inf loss")
    grading_workers: int = Field(4, ge=1, description="parallel grading workers")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (null: torch's default)")


class LoggingConfig(Strict):
    """Metrics, sample tables, validation, progress display."""

    log_every: int = Field(1, ge=1, description="print a progress line every N steps (plain mode)")
    sample_every: int = Field(10, ge=0, description="write a table of samples every N steps (0: never)")
    num_samples: int = Field(4, ge=1, description="rows of each sample table")
    val_every: int = Field(10, ge=0, description="greedy validation every N steps (0: never)")
    progress: Literal["auto", "rich", "plain", "off"] = Field(
        "auto", description="auto: a rich bar on a terminal, plain lines otherwise"
    )
    tensorboard: bool = Field(True, description="write TensorBoard events under run_dir/tb")
    wandb: bool = Field(False, description="log to Weights & Biases (needs `pip install wandb`)")
    trackio: bool = Field(False, description="log to trackio (needs `pip install trackio`)")
    project: str = Field("duetlm", description="W&B / trackio project name")


class DistributedConfig(Strict):
    """Data parallelism when `accelerate launch` or `torchrun` starts several processes
    (docs/distributed.md). One process ignores this section."""

    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="ddp (each process holds whole models) | fsdp (FSDP2: parameters, gradients and "
        "optimizer states sharded per decoder layer) | auto (fsdp when accelerate was launched with an "
        "FSDP config, else ddp)",
    )
    fsdp_reshard_after_forward: bool = Field(
        True, description="FSDP: free the gathered parameters after each forward (less memory, more traffic)"
    )


class TrainConfig(Strict):
    """One training run (`duetlm train --config FILE`). See configs/tiny.yaml and configs/paper/."""

    mode: Annotated[str, one_of(MODES, "mode")] = Field(
        "duet", description="duet | single | thinkprune | lgrpo (algorithm.md §2, §5)"
    )
    schedule: Annotated[str, one_of(SCHEDULES, "schedule")] = Field(
        "joint", description="joint (both every step) | alternate (M odd steps, m even) | frozen_small"
    )
    seed: int = Field(0, description="every random stream derives from (seed, step)")
    large: ModelConfig = Field(description="M, the model that thinks")
    small: ModelConfig | None = Field(None, description="m, the model that answers (mode duet)")
    lora: LoraSettings = Field(default_factory=LoraSettings, description="for models with lora: true")
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        uses_small = MODES[self.mode].uses_small
        if uses_small and self.small is None:
            raise ValueError(f"mode {self.mode!r} needs a small model: set small.path")
        if self.rollout.n < 2:
            raise ValueError(
                f"rollout.n must be >= 2: GRPO compares the n rollouts of a prompt (got {self.rollout.n})"
            )
        for role, model in (("large", self.large), ("small", self.small if uses_small else None)):
            if model is not None and model.engine == "remote":
                raise ValueError(
                    f"{role}.engine='remote' cannot be used for training: the trainer loads every model "
                    "it rolls out with and pushes updated weights to its engine; use engine: hf or vllm"
                )
        trains_small = uses_small and SCHEDULES[self.schedule].trains_small
        group_size = SMALL_GROUPS[self.grpo.small_group].size(self.rollout.n, self.rollout.n_small)
        if trains_small and group_size < 2:
            raise ValueError(
                f"m's GRPO groups (grpo.small_group={self.grpo.small_group}) hold {group_size} answer: "
                f"raise rollout.n_small (got {self.rollout.n_small}) or use small_group=per_prompt"
            )
        return self
