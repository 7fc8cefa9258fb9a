"""`ServeMetrics`: the Prometheus metrics of one server (`GET /metrics`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from duetlm.serve.openai import DuetOutcome

ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize")


class ServeMetrics:
    """Prometheus metrics of one server, in a registry of its own so that several servers in one
    process keep theirs apart.

    - `duetlm_http_requests_total{route, status}`: every HTTP answer (unknown routes as "other");
    - `duetlm_request_seconds{stream}`: a chat completion from arrival to its last byte;
    - `duetlm_time_to_first_output_seconds{part}`: streams, arrival to the first signal / answer text;
    - `duetlm_tokens_total{model, kind}`: prompt and completion tokens of M ("large") and m ("small");
    - `duetlm_signal_tokens`: M's tokens per choice (|z|, what DUET makes short), and
      `duetlm_signals_total{complete}`: whether M closed its thinking within its cap;
    - `duetlm_cascade_choices_total{decision}`: with `--cascade`, choices that called M or skipped it;
    - `duetlm_requests_in_flight` (read from `in_flight()`) and `duetlm_batch_mean{stage}` (requests
      per engine call, windowed; rows per decode step, continuous) of each of `stages`.
    """

    def __init__(self, in_flight: Callable[[], int], stages: Sequence[Any]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        reg = self.registry = CollectorRegistry()
        self.http = Counter(
            "duetlm_http_requests", "HTTP answers by route and status", ["route", "status"], registry=reg
        )
        seconds = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
        self.latency = Histogram(
            "duetlm_request_seconds",
            "chat completion, arrival to last byte",
            ["stream"],
            buckets=seconds,
            registry=reg,
        )
        self.first_output = Histogram(
            "duetlm_time_to_first_output_seconds",
            "streamed chat completion, arrival to the first text of the signal or the answer",
            ["part"],
            buckets=seconds,
            registry=reg,
        )
        self.tokens = Counter(
            "duetlm_tokens", "tokens by model (large: M, small: m) and kind", ["model", "kind"], registry=reg
        )
        self.signal_tokens = Histogram(
            "duetlm_signal_tokens",
            "M's tokens per choice (|z| and its end marker)",
            buckets=(4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            registry=reg,
        )
        self.signals = Counter(
            "duetlm_signals", "signals by whether M closed its thinking", ["complete"], registry=reg
        )
        self.cascade = Counter(
            "duetlm_cascade_choices",
            "cascade: choices where m asked M (called) or kept its own answer (skipped)",
            ["decision"],
            registry=reg,
        )
        self.fallbacks = Counter(
            "duetlm_large_fallbacks",
            "choices m answered alone because M failed (error) or was too slow (timeout)",
            ["reason"],
            registry=reg,
        )
        self.signal_cache = Counter(
            "duetlm_signal_cache",
            "M passes answered from the signal cache (hit) or run and stored (miss)",
            ["result"],
            registry=reg,
        )
        Gauge("duetlm_requests_in_flight", "requests admitted and not done", registry=reg).set_function(
            in_flight
        )
        batch = Gauge(
            "duetlm_batch_mean",
            "mean batch per stage (window: requests/call; continuous: rows/step)",
            ["stage"],
            registry=reg,
        )
        for stage in stages:
            batch.labels(stage.name).set_function(lambda stage=stage: stage.stats.to_json()["mean_batch"])

    def answered(self, route: str, status: int) -> None:
        self.http.labels(route if route in ROUTES else "other", str(status)).inc()

    def completed(
        self, outcomes: list[DuetOutcome], usage: dict[str, Any], seconds: float, stream: bool
    ) -> None:
        """A chat completion's figures (`usage` as the response reports it)."""
        self.latency.labels(str(stream).lower()).observe(seconds)
        for model in ("large", "small"):
            for kind in ("prompt", "completion"):
                self.tokens.labels(model, kind).inc(usage[model][f"{kind}_tokens"])
        for o in outcomes:
            if o.large_called is not None:
                self.cascade.labels("called" if o.large_called else "skipped").inc()
            if o.large is None:
                continue
            self.signal_tokens.observe(o.large.num_tokens)
            self.signals.labels(str(o.signal.complete).lower()).inc()
