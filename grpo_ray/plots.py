"""Reward curves of a run as one PNG, from its metrics.jsonl (`grpo-ray plot <run_dir>`).

Four panels against the step: the total reward (with ± its std inside groups) and each reward
function's mean; completion length (mean, min–max band, and the share cut at the length limit);
the KL to the reference model; the policy entropy. A metric the run did not log (KL when
beta=0) leaves its panel with a note instead of an empty frame.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from grpo_ray.metrics import read_metrics

log = logging.getLogger("grpo_ray")

PLOT_NAME = "reward_curves.png"
SMOOTH_FROM = 30  # steps: from here on a centred moving average is drawn over the raw (faint) curve


def plot_run(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the run's reward curves to `out` (default `<run_dir>/reward_curves.png`); returns the path.

    Raises FileNotFoundError when `run_dir` has no metrics.jsonl, ImportError without matplotlib.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: give the directory of a run (outputs/<run-name>)")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"plots need matplotlib ({e}): pip install matplotlib") from e

    records = read_metrics(run_dir)
    out = Path(out) if out is not None else run_dir / PLOT_NAME
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True)
    _reward_panel(axes[0, 0], records)
    _length_panel(axes[0, 1], records)
    _single_panel(axes[1, 0], records, "kl", "KL to reference (k3)", "KL", "not logged (loss.beta=0)")
    _single_panel(axes[1, 1], records, "entropy", "Policy entropy", "nats per token", "not logged")
    from matplotlib.ticker import MaxNLocator

    for ax in axes[1]:
        ax.set_xlabel("step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    last = records[-1]["step"] if records else 0
    fig.suptitle(f"{run_dir.name}: {len(records)} steps (last {last})", fontsize=14)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_reward_plot(run_dir: Path | str) -> Path | None:
    """`plot_run` at the end of a training run: a failure (no matplotlib, ...) is a warning, never
    an error, since the run's results are already saved. Returns the PNG path, None on failure."""
    try:
        return plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 - the plot is a convenience; `grpo-ray plot` can retry
        log.warning("grpo-ray: no reward plot for %s (%s: %s); retry with `grpo-ray plot %s`",
                    run_dir, type(e).__name__, e, run_dir)  # fmt: skip
        return None


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, skipping steps where it is missing or null (NaN)."""
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None and not math.isnan(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def reward_names(records: list[dict[str, Any]]) -> list[str]:
    """The reward functions of a run, from its `rewards/<fn>/mean` keys, in first-seen order."""
    names: dict[str, None] = {}
    for r in records:
        for key in r:
            if key.startswith("rewards/") and key.endswith("/mean"):
                names[key[len("rewards/") : -len("/mean")]] = None
    return list(names)


def moving_average(values: list[float], window: int) -> list[float]:
    """Centred mean over `window` values (fewer at the ends), same length as `values`; no lag."""
    half = window // 2
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    out = []
    for i in range(len(values)):
        lo, hi = max(0, i - half), min(len(values), i + half + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def _line(ax: Any, steps: list[int], values: list[float], label: str, linewidth: float = 1.6, **kwargs: Any) -> None:
    """Raw curve with markers on short runs; on long ones faint raw values and a moving average."""
    if len(steps) < SMOOTH_FROM:
        ax.plot(steps, values, marker="o", markersize=3, linewidth=linewidth, label=label, **kwargs)
        return
    (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=1, **kwargs)
    window = max(5, len(steps) // 20)
    kwargs["color"] = raw.get_color()
    ax.plot(steps, moving_average(values, window), linewidth=linewidth, label=f"{label} ({window}-step avg)", **kwargs)


def _reward_panel(ax: Any, records: list[dict[str, Any]]) -> None:
    steps, total = series(records, "reward")
    if steps:
        _line(ax, steps, total, "reward (weighted sum)", color="black", linewidth=2.2)
        std_steps, std = series(records, "reward_std")
        if std_steps == steps:
            ax.fill_between(steps, [m - s for m, s in zip(total, std)], [m + s for m, s in zip(total, std)],
                            color="black", alpha=0.08, label="± reward std")  # fmt: skip
    for name in reward_names(records):
        f_steps, values = series(records, f"rewards/{name}/mean")
        if f_steps:
            _line(ax, f_steps, values, name, linestyle="--")
        else:  # every call failed or returned None: say so in the legend
            ax.plot([], [], linestyle="none", label=f"{name}: no scores")
    ax.set_title("Reward")
    ax.set_ylabel("mean reward per completion")
    if ax.lines:
        ax.legend(fontsize=8, loc="best")
    else:
        _note(ax, "no rewards logged")


def _length_panel(ax: Any, records: list[dict[str, Any]]) -> None:
    steps, mean = series(records, "completions/mean_length")
    if not steps:
        _note(ax, "not logged")
    else:
        _line(ax, steps, mean, "mean", color="tab:blue")
        lo_steps, lo = series(records, "completions/min_length")
        hi_steps, hi = series(records, "completions/max_length")
        if lo_steps == steps == hi_steps:
            ax.fill_between(steps, lo, hi, color="tab:blue", alpha=0.12, label="min–max")
        ax.legend(fontsize=8, loc="upper left")
        c_steps, clipped = series(records, "completions/clipped_ratio")
        if c_steps:
            twin = ax.twinx()
            twin.plot(c_steps, clipped, color="tab:red", alpha=0.7, linewidth=1, label="clipped ratio")
            twin.set_ylim(-0.02, 1.02)
            twin.set_ylabel("share cut at max_completion_length", color="tab:red")
            twin.tick_params(axis="y", colors="tab:red")
            twin.legend(fontsize=8, loc="upper right")
    ax.set_title("Completion length")
    ax.set_ylabel("tokens")


def _single_panel(ax: Any, records: list[dict[str, Any]], key: str, title: str, ylabel: str, missing: str) -> None:
    steps, values = series(records, key)
    if steps:
        _line(ax, steps, values, key, color="tab:purple" if key == "kl" else "tab:green")
    else:
        _note(ax, missing)
    ax.set_title(title)
    ax.set_ylabel(ylabel)


def _note(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="gray", fontsize=11)
