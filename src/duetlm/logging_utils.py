"""Where a training run's numbers go: JSONL, TensorBoard, W&B / trackio, and a progress display.

- `metrics.jsonl`: one object per step (`{"step": t, ...}`), validation metrics (`val/...`) included on
  the steps that ran it. `samples.jsonl`: one object per sample table (`{"step": t, "rows": [...]}`).
  On resume both are cut back to the checkpoint's step, so a resumed run's files read like an
  uninterrupted run's.
- TensorBoard under `run_dir/tb` (events after the resumed step are purged).
- W&B and trackio only when enabled in the config; enabling one that is not installed is an error at
  start-up (`check_backends`), before any model loads.
- A rich progress bar with ETA when stdout is a terminal, plain lines otherwise (`progress: auto`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from duetlm.config import ConfigError, LoggingConfig

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"

# The metrics shown on the progress line, with their short labels.
HEADLINE = (
    ("reward/large", "R"),
    ("success/guided", "guided"),
    ("success/large", "acc"),
    ("lambda", "λ"),
    ("tokens/large_mean", "M tok"),
    ("val/accuracy", "val"),
    ("time/step_s", "s/step"),
)


def check_backends(cfg: LoggingConfig) -> None:
    """Fail fast when an enabled logging backend is not installed."""
    for enabled, module in ((cfg.wandb, "wandb"), (cfg.trackio, "trackio")):
        if enabled and importlib.util.find_spec(module) is None:
            raise ConfigError(f"logging.{module} is true but {module} is not installed: pip install {module}")
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "logging.tensorboard is true but tensorboard is not installed: pip install tensorboard"
        )


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep only the records with `step <= max_step` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= max_step]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def headline(metrics: dict[str, Any]) -> str:
    return " | ".join(f"{label} {_fmt(metrics[key])}" for key, label in HEADLINE if key in metrics)


class RunLogger:
    """Writes every step's metrics to each enabled sink and drives the progress display."""

    def __init__(
        self,
        run_dir: Path,
        cfg: LoggingConfig,
        *,
        total_steps: int,
        start_step: int,
        config: dict[str, Any],
    ) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.total_steps = total_steps
        self.start_step = start_step
        self._t0 = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(run_dir / METRICS_FILE, start_step)
        truncate_jsonl(run_dir / SAMPLES_FILE, start_step)
        self._metrics = open(run_dir / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        self._samples = open(run_dir / SAMPLES_FILE, "a")  # noqa: SIM115
        self._tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self._wandb = self._trackio = None
        if cfg.wandb:
            import wandb

            # One W&B run per run directory, so a resumed run continues the same curves.
            run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
            self._wandb = wandb.init(
                project=cfg.project,
                name=run_dir.name,
                id=run_id,
                dir=str(run_dir),
                config=config,
                resume="allow",
            )
        if cfg.trackio:
            import trackio

            trackio.init(project=cfg.project, name=run_dir.name, config=config, resume="allow")
            self._trackio = trackio
        self._progress = None
        self._task = None
        mode = cfg.progress
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self._mode = mode
        if mode == "rich":
            self._start_rich()

    def _start_rich(self) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        # The bar stays compact (step, elapsed, ETA, λ); the full metrics line is printed above it.
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._progress.start()
        self._task = self._progress.add_task(
            "train", total=self.total_steps, completed=self.start_step, info=""
        )

    def message(self, text: str) -> None:
        """A line for the user (through the progress console, so the bar is not broken)."""
        if self._progress is not None:
            self._progress.console.print(text)
        elif self._mode != "off":
            print(text, flush=True)

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **metrics}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._trackio is not None:
            self._trackio.log(scalars, step=step)
        self._show(step, metrics)

    def _show(self, step: int, metrics: dict[str, Any]) -> None:
        due = step % self.cfg.log_every == 0 or step == self.total_steps
        if self._progress is not None:
            info = f"λ {_fmt(metrics['lambda/next'])}" if "lambda/next" in metrics else ""
            self._progress.update(self._task, completed=step, info=info)
            if due:
                self._progress.console.print(f"step {step}/{self.total_steps} | {headline(metrics)}")
        elif self._mode == "plain" and due:
            done = step - self.start_step
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(done, 1) * (self.total_steps - step)
            print(f"step {step}/{self.total_steps} | {headline(metrics)} | eta {eta:.0f}s", flush=True)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._samples.write(json.dumps({"step": step, "rows": rows}, ensure_ascii=False) + "\n")
        self._samples.flush()
        if self._tb is not None and rows:
            keys = list(rows[0])
            lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            for row in rows:
                cells = [str(row[k]).replace("|", "\\|").replace("\n", " ")[:300] for k in keys]
                lines.append("| " + " | ".join(cells) + " |")
            self._tb.add_text("samples", "\n".join(lines), step)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        self._metrics.close()
        self._samples.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()


class NullLogger:
    """The logger of every data-parallel rank but rank 0: the same interface, writing nothing."""

    def message(self, text: str) -> None:
        pass

    def log_step(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass
