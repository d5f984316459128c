"""Metric sinks: metrics.jsonl in the run directory, a compact console table, a progress bar,
and optionally TensorBoard and Weights & Biases; sample completions with their rewards.

Names follow TRL (`reward`, `rewards/<fn>/mean`, `kl`, `clip_ratio/region_mean`, ...), plus
`time/<phase>` and `perf/*` from the driver and actors.

Sample completions travel as a few plain rows (`sample_completions`), picked where the scored
rollout already is (the learner), never by pulling a batch into the driver:
``{"prompt": str, "completion": str, "reward": float, "advantage": float,
"rewards": {fn: float | None}, "answer": str}`` (`answer` when the task has one).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from tqdm import tqdm

if TYPE_CHECKING:
    from grpo_ray.types import ScoredRollout

SampleRow = dict[str, Any]

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


class Sink(Protocol):
    """An external metric store: every step's scalars and, now and then, a table of samples."""

    def scalars(self, step: int, metrics: dict[str, float]) -> None: ...
    def samples(self, step: int, rows: list[SampleRow]) -> None: ...
    def close(self) -> None: ...


class MetricsLogger:
    """Writes every step to metrics.jsonl (and TensorBoard / W&B when enabled) and prints a row
    per `logging_steps` with an ETA; `log_samples` keeps sample completions every `sample_steps`.

    `tensorboard=True` writes event files into `run_dir`; `wandb=True` logs to a W&B run named
    after the run directory. Each needs its package and says so at construction when it is
    missing, before any step runs. `start_step` > 0 continues a resumed run: TensorBoard drops
    its events after that step and samples.jsonl its rows after it (as the driver truncates
    metrics.jsonl), so the steps trained again are not shown twice.
    """

    def __init__(
        self,
        run_dir: Path,
        max_steps: int,
        logging_steps: int = 1,
        stream: IO[str] | None = None,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "grpo-ray",
        config: dict[str, Any] | None = None,
        sample_steps: int = 0,
        start_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.max_steps, self.logging_steps = max_steps, max(1, logging_steps)
        self.sample_steps, self.start_step = sample_steps, start_step
        self.stream = stream
        self.start = time.perf_counter()
        self.rows_printed = 0
        self.columns: list[tuple[str, str, str]] | None = None
        self.sinks: list[Sink] = []
        if tensorboard:
            self.sinks.append(TensorBoardSink(self.run_dir, purge_step=start_step + 1 if start_step else None))
        if wandb:
            self.sinks.append(WandbSink(self.run_dir, wandb_project, config))
        # A live bar on a terminal only (disable=None); logs and CI get the rows with their eta column.
        self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=None, file=stream)
        if start_step:
            _truncate_jsonl(self.samples_path, start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in sorted(metrics.items())}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.scalars(step, metrics)
        if step % self.logging_steps == 0 or step == self.max_steps:
            self._print_row(step, metrics)
        self.bar.update(step - self.bar.n)

    def wants_samples(self, step: int) -> bool:
        """Whether `log_samples(step, ...)` keeps anything: step 1, every `sample_steps`-th and the last."""
        return self.sample_steps > 0 and (step % self.sample_steps == 0 or step == self.max_steps or step == 1)

    def log_samples(self, step: int, rows: list[SampleRow]) -> None:
        """Sample completions (rows of `sample_completions`) to samples.jsonl and the sinks.

        Call it every step; it keeps the rows of steps 1, every `sample_steps`-th and the last.
        """
        if not rows or not self.wants_samples(step):
            return
        with self.samples_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}, default=_plain_sample) + "\n")
        for sink in self.sinks:
            sink.samples(step, rows)

    def close(self) -> None:
        self.bar.close()
        for sink in self.sinks:
            sink.close()

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
        remaining = (time.perf_counter() - self.start) / max(step - self.start_step, 1) * (self.max_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))

    def _write(self, line: str) -> None:
        tqdm.write(line, file=self.stream)


# --- sinks -------------------------------------------------------------------------------


class TensorBoardSink:
    """Event files in the run directory: every metric as a scalar under its own name, samples as a
    markdown table under the text tag `samples` (TensorBoard's TEXT tab)."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                f"logging.tensorboard=true needs the tensorboard package ({e}): pip install tensorboard "
                "(it comes with pip install grpo-ray[dev]), or set logging.tensorboard=false"
            ) from e
        # purge_step: events at and after it, left by the run before a resume, are hidden
        self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, float(value), step)
        self.writer.flush()  # a live `tensorboard --logdir` sees each step as it ends

    def samples(self, step: int, rows: list[SampleRow]) -> None:
        self.writer.add_text("samples", samples_markdown(rows), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A Weights & Biases run (project `wandb_project`, named after the run directory)."""

    def __init__(self, run_dir: Path, project: str, config: dict[str, Any] | None) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError(
                f"logging.wandb=true needs the wandb package ({e}): pip install wandb, or set logging.wandb=false"
            ) from e
        self.wandb = wandb
        self.run = wandb.init(project=project, name=Path(run_dir).name, dir=str(run_dir), config=config)

    def scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def samples(self, step: int, rows: list[SampleRow]) -> None:
        columns, data = sample_columns(rows)
        self.run.log({"samples": self.wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


# --- sample completions ------------------------------------------------------------------


def sample_completions(scored: "ScoredRollout", k: int) -> list[SampleRow]:
    """`k` completions of a scored rollout as plain rows (see the module docstring), spread
    evenly over its N completions so they come from different prompts: i = 0, N/k, 2N/k, ...

    Small enough to return with StepMetrics (a few strings and floats); call it where the
    ScoredRollout already lives.
    """
    rollout = scored.rollout
    n, g = rollout.num_completions, rollout.num_generations
    if k <= 0 or n == 0:
        return []
    picks = sorted({i * n // min(k, n) for i in range(min(k, n))})
    rows = []
    for i in picks:
        row: SampleRow = {
            "prompt": prompt_text(rollout.prompts[i // g]),
            "completion": rollout.completions[i],
            "reward": float(scored.rewards[i]),
            "advantage": float(scored.advantages[i]),
            "rewards": {
                name: _none_if_nan(float(scored.rewards_per_func[i, f])) for f, name in enumerate(scored.reward_names)
            },
        }
        if "answer" in rollout.columns:
            row["answer"] = str(rollout.columns["answer"][i // g])
        rows.append(row)
    return rows


def sample_columns(rows: list[SampleRow]) -> tuple[list[str], list[list[Any]]]:
    """Rows flattened into a table: prompt, completion, [answer,] reward, advantage, one column per function."""
    funcs = list(rows[0].get("rewards", {})) if rows else []
    fixed = ["prompt", "completion"] + (["answer"] if rows and "answer" in rows[0] else []) + ["reward", "advantage"]
    data = [[row.get(c) for c in fixed] + [row.get("rewards", {}).get(f) for f in funcs] for row in rows]
    return fixed + funcs, data


def samples_markdown(rows: list[SampleRow]) -> str:
    """A markdown table of sample rows (newlines as <br>, pipes escaped), numbers to 3 decimals."""
    columns, data = sample_columns(rows)

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in data]
    return "\n".join(lines)


def prompt_text(prompt: Any) -> str:
    """A prompt as text: the last user message of a chat prompt, else the string."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1].get("content", ""))
    return str(prompt)


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def _plain_sample(value: Any) -> Any:
    """json.dumps fallback for sample rows: numpy / torch scalars as floats."""
    return float(value)


def _plain(value: float) -> float | None:
    """JSON has no NaN: write null for it."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def _truncate_jsonl(path: Path, step: int) -> None:
    """Keep the lines of a jsonl file whose "step" is at most `step`."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl, in order."""
    with (Path(run_dir) / "metrics.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]
