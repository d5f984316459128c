"""Metric sinks: metrics.jsonl in the run directory, a compact console table, a progress bar.

Names follow TRL (`reward`, `rewards/<fn>/mean`, `kl`, `clip_ratio/region_mean`, ...), plus
`time/<phase>` and `perf/*` from the driver and actors.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO

from tqdm import tqdm

# (metric, column header, format) shown in the console table, when present.
CONSOLE_COLUMNS = [
    ("reward", "reward", "{:.3f}"),
    ("reward_std", "r_std", "{:.3f}"),
    ("frac_reward_zero_std", "0std", "{:.2f}"),
    ("completions/mean_length", "len", "{:.1f}"),
    ("completions/clipped_ratio", "clip%", "{:.2f}"),
    ("kl", "kl", "{:.4f}"),
    ("entropy", "entropy", "{:.3f}"),
    ("loss", "loss", "{:+.4f}"),
    ("grad_norm", "grad", "{:.3f}"),
    ("time/step", "s/step", "{:.1f}"),
]
HEADER_EVERY = 20


def reward_columns(metrics: dict[str, float]) -> list[tuple[str, str, str]]:
    """A column per reward function: rewards/<fn>/mean, headed by the function's name."""
    keys = sorted(k for k in metrics if k.startswith("rewards/") and k.endswith("/mean"))
    return [(k, k.split("/")[1][:18], "{:.3f}") for k in keys]


class MetricsLogger:
    """Writes every step to metrics.jsonl and prints a row per `logging_steps` with an ETA."""

    def __init__(self, run_dir: Path, max_steps: int, logging_steps: int = 1, stream: IO[str] | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.max_steps, self.logging_steps = max_steps, max(1, logging_steps)
        self.stream = stream
        self.start = time.perf_counter()
        self.rows_printed = 0
        self.columns: list[tuple[str, str, str]] | None = None
        # A live bar on a terminal only (disable=None); logs and CI get the rows with their eta column.
        self.bar = tqdm(total=max_steps, unit="step", dynamic_ncols=True, disable=None, file=stream)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if step % self.logging_steps == 0 or step == self.max_steps:
            self._print_row(step, metrics)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()

    def _print_row(self, step: int, metrics: dict[str, float]) -> None:
        if self.columns is None:  # fixed at the first row so columns line up
            self.columns = reward_columns(metrics) + [c for c in CONSOLE_COLUMNS if c[0] in metrics]
        widths = [max(len(h), 8) for _, h, _ in self.columns]
        if self.rows_printed % HEADER_EVERY == 0:
            header = "  ".join(h.rjust(w) for (_, h, _), w in zip(self.columns, widths))
            self._write(f"{'step':>9}  {header}  {'eta':>8}")
        cells = "  ".join(
            (fmt.format(metrics[k]) if k in metrics else "-").rjust(w) for (k, _, fmt), w in zip(self.columns, widths)
        )
        self._write(f"{f'{step}/{self.max_steps}':>9}  {cells}  {self.eta(step):>8}")
        self.rows_printed += 1

    def eta(self, step: int) -> str:
        """Remaining time at the mean pace so far, as h:mm:ss."""
        remaining = (time.perf_counter() - self.start) / max(step, 1) * (self.max_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))

    def _write(self, line: str) -> None:
        tqdm.write(line, file=self.stream)


def _plain(value: float) -> float | None:
    """JSON has no NaN: write null for it."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
