"""Reward-curve PNG of a run, from metrics.jsonl."""

from __future__ import annotations

import json
import struct

import pytest

from grpo_ray.cli import main
from grpo_ray.plots import PLOT_NAME, moving_average, plot_run, reward_names, series


def write_run(run_dir, steps: int) -> None:
    """metrics.jsonl of a run whose reward rises; `broken` never scores; no KL (beta=0)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "metrics.jsonl").open("w") as f:
        for s in range(1, steps + 1):
            record = {
                "step": s, "reward": s / steps, "reward_std": 0.1, "rewards/exact/mean": s / steps,
                "rewards/broken/mean": None, "completions/mean_length": 10.0 - s / steps,
                "completions/min_length": 5.0, "completions/max_length": 16.0,
                "completions/clipped_ratio": 0.1, "entropy": 1.0 - s / (2 * steps),
            }  # fmt: skip
            f.write(json.dumps(record) + "\n")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


@pytest.mark.parametrize("steps", [3, 60])  # markers on short runs; a moving average on long ones
def test_plot_run_writes_a_png_into_the_run_directory(tmp_path, steps):
    write_run(tmp_path / "run", steps)
    path = plot_run(tmp_path / "run")
    assert path == tmp_path / "run" / PLOT_NAME
    width, height = png_size(path)
    assert width > 1000 and height > 700 and path.stat().st_size > 20_000


def test_plot_cli_writes_where_asked_and_reports_a_missing_run(tmp_path, capsys):
    write_run(tmp_path / "run", 4)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "curves.png")]) == 0
    assert png_size(tmp_path / "curves.png")[0] > 0
    assert "wrote" in capsys.readouterr().out
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err


def test_series_skips_missing_and_null_values():
    records = [{"step": 1, "kl": 0.1}, {"step": 2}, {"step": 3, "kl": None}, {"step": 4, "kl": 0.3}]
    assert series(records, "kl") == ([1, 4], [0.1, 0.3])


def test_reward_names_in_first_seen_order():
    records = [{"rewards/b/mean": 1, "rewards/b/std": 0}, {"rewards/a/mean": 1, "rewards/b/mean": 1}]
    assert reward_names(records) == ["b", "a"]


def test_moving_average_is_centred():
    # window 3: ends average 2 values, the middle 3
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]


def test_write_reward_plot_at_the_end_of_a_run_warns_instead_of_failing(tmp_path, caplog):
    from grpo_ray.plots import write_reward_plot

    write_run(tmp_path / "run", 2)
    assert write_reward_plot(tmp_path / "run") == tmp_path / "run" / PLOT_NAME
    assert write_reward_plot(tmp_path / "empty") is None
    assert "grpo-ray plot" in caplog.text
