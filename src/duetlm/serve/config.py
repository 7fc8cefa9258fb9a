"""`ServeConfig`: the options of `duetlm serve` (its command-line flags are generated from the fields)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from duetlm.cascade import CascadeSpec, parse_cascade
from duetlm.config import DType, Strict
from duetlm.errors import DuetError


class ServeConfig(Strict):
    """Options of `duetlm serve` (the CLI flags of the same names)."""

    role: Literal["duet", "large", "small"] = Field(
        "duet",
        description="duet: M thinks, m answers; large: serve M's thinking alone; small: serve m alone "
        "(a duet server's --small-url)",
    )
    large: str | None = Field(None, description="M: hub id, local dir, .gguf file or short name")
    large_url: str | None = Field(
        None, description="M behind an OpenAI-compatible server (vLLM, SGLang, duetlm) instead"
    )
    small: str | None = Field(
        None, description="m (roles duet, small): hub id, local dir, .gguf file or short name"
    )
    small_url: str | None = Field(
        None,
        description="m behind an OpenAI-compatible server that continues an assistant turn "
        "(duetlm serve --role small, vLLM) instead",
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    engine: Literal["hf", "vllm"] = Field(
        "hf",
        description="engine of the local models (vllm: its own venv; vLLM's async engine, or its "
        "offline engine in windows with --batching window)",
    )
    vllm_max_model_len: int | None = Field(
        None, ge=1, description="--engine vllm: prompt + generated tokens per sequence (default: the model's)"
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: DType = Field("auto", description="weights dtype; auto = float32 on CPU, bfloat16 on CUDA")
    served_model_name: str | None = Field(None, description="the model name clients use (default: the role)")
    batching: Literal["continuous", "window"] = Field(
        "continuous",
        description="continuous: requests join the running batch at each step (HF: duetlm's batcher; "
        "vllm: vLLM's async engine); window: a batch per window",
    )
    max_batch: int = Field(16, ge=1, description="requests decoded together; 1 turns batching off")
    batch_window_ms: float = Field(5.0, ge=0, description="window batching: how long a batch waits for more")
    admit_ratio: float = Field(
        0.0,
        ge=0,
        description="continuous batching: new requests join once waiting >= ratio x running (0: every step)",
    )
    admit_max_wait: int = Field(
        16, ge=0, description="continuous batching: ... or once the oldest waited this many decode steps"
    )
    max_queue: int = Field(256, ge=1, description="requests admitted at once; beyond: 503 + Retry-After")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After header of a 503")
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="on SIGTERM: how long admitted requests may take to finish before the server exits",
    )
    max_signal_tokens: int = Field(256, ge=1, description="default cap on M's thinking tokens")
    max_answer_tokens: int = Field(256, ge=1, description="default cap on m's answer tokens")
    max_tokens_limit: int = Field(8192, ge=1, description="largest max_tokens a request may ask for")
    max_n: int = Field(8, ge=1, description="largest n (choices per request) a request may ask for")
    system_messages: Literal["both", "small", "ignore", "reject"] = Field(
        "both",
        description="role duet: system messages reach both models through their chat templates (both), "
        "m only (small), neither (ignore: dropped), or are a 400 (reject)",
    )
    temperature: float = Field(0.0, ge=0.0, description="default temperature (0 = greedy)")
    max_body_bytes: int = Field(1_000_000, ge=1, description="larger request bodies get 413")
    remote_timeout_s: float = Field(
        120.0, gt=0, description="per-request timeout towards --large-url / --small-url"
    )
    remote_max_retries: int = Field(4, ge=0, description="retries towards --large-url / --small-url")
    remote_backoff_s: float = Field(
        0.5, ge=0, description="first backoff delay towards --large-url / --small-url"
    )
    remote_concurrency: int = Field(
        16, ge=1, description="requests in flight towards each of --large-url / --small-url"
    )
    cascade: str | None = Field(
        None,
        description="m answers first and M is called only where m is unsure: logprob@T or consistency@K@T "
        "(duetlm.cascade); default: M on every request",
    )
    large_timeout_s: float | None = Field(
        None,
        gt=0,
        description="the longest M's pass may take (role duet); beyond it, --large-fallback applies",
    )
    large_fallback: Literal["fail", "small"] = Field(
        "fail",
        description="when M fails or exceeds --large-timeout-s: fail (502 / 504) or small (m answers alone)",
    )
    signal_cache: int = Field(
        0,
        ge=0,
        description="M's signals kept for reuse by identical greedy requests (LRU entries; 0: off)",
    )
    api_key: str | None = Field(
        None, description="clients must send 'Authorization: Bearer <key>' (all routes but /health)"
    )

    @model_validator(mode="after")
    def _check_models(self) -> ServeConfig:
        if self.role == "small":
            if self.small is None or self.large is not None or self.large_url or self.small_url:
                raise ValueError(
                    "role small serves m alone: give small (a model), and no large, large_url or small_url"
                )
        elif (self.large is None) == (self.large_url is None):
            raise ValueError("give exactly one of large (a model) and large_url (a server)")
        if self.role == "duet" and (self.small is None) == (self.small_url is None):
            raise ValueError(
                "role duet needs exactly one of small (m) and small_url (m behind a server); "
                "use role large to serve M alone"
            )
        if self.role == "large" and (self.small is not None or self.small_url is not None):
            raise ValueError("role large serves M alone: drop small / small_url")
        if self.role != "duet" and (self.large_fallback != "fail" or self.large_timeout_s is not None):
            raise ValueError("large_fallback and large_timeout_s apply to role duet (M's pass before m's)")
        if self.cascade is not None:
            if self.role != "duet":
                raise ValueError("cascade needs role duet (m answers first)")
            try:  # an unknown estimator or a bad threshold: refused at start-up, not per request
                parse_cascade(self.cascade)
            except DuetError as err:
                raise ValueError(f"cascade: {err}") from None
        return self

    def cascade_spec(self) -> CascadeSpec | None:
        return None if self.cascade is None else parse_cascade(self.cascade)

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.role
