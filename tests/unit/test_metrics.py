"""MetricsLogger sinks: metrics.jsonl, TensorBoard event files, W&B (faked), sample completions."""

from __future__ import annotations

import io
import json
import math
import sys
import types

import pytest
import torch

from grpo_ray.metrics import MetricsLogger, read_metrics, sample_completions, samples_markdown
from grpo_ray.types import Rollout, ScoredRollout

STEPS = [
    {"reward": 0.25, "rewards/exact/mean": 0.5, "kl": 0.01, "completions/mean_length": 11.0},
    {"reward": 0.5, "rewards/exact/mean": math.nan, "kl": 0.02, "completions/mean_length": 9.5},
    {"reward": 0.75, "rewards/exact/mean": 1.0, "kl": 0.03, "completions/mean_length": 8.0},
]
ROWS = [{"prompt": "What is 1+1?", "completion": "2 | two\nok", "reward": 1.0, "advantage": 0.5,
         "rewards": {"exact": 1.0, "fmt": None}, "answer": "2"}]  # fmt: skip


def scored_rollout() -> ScoredRollout:
    """B=4 prompts × G=2 completions; completion i has reward i/10, function 'b' unscored on odd i."""
    n, g = 8, 2
    rollout = Rollout(
        prompts=[[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"q{b}"}] for b in range(4)],
        prompt_ids=[[1]] * 4, completion_ids=[[2, 3]] * n, completions=[f"c{i}" for i in range(n)],
        sampling_logprobs=[[-1.0, -1.0]] * n, finish_reasons=["stop"] * n,
        columns={"answer": ["a0", "a1", "a2", "a3"]}, num_generations=g, version=0,
    )  # fmt: skip
    rewards = torch.arange(n, dtype=torch.float32) / 10
    per_func = torch.stack([rewards, torch.where(torch.arange(n) % 2 == 1, math.nan, 1.0)], dim=1)
    return ScoredRollout(rollout, ["a", "b"], per_func, rewards, advantages=-rewards)


def event_file_contents(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_files_hold_every_metric_and_the_samples(tmp_path):
    logger = MetricsLogger(tmp_path, max_steps=3, stream=io.StringIO(), tensorboard=True, sample_steps=2)
    for step, metrics in enumerate(STEPS, start=1):
        logger.log(step, metrics)
        logger.log_samples(step, ROWS)
    logger.close()

    acc = event_file_contents(tmp_path)
    assert set(acc.Tags()["scalars"]) == set(STEPS[0])
    kl = acc.Scalars("kl")
    assert [e.step for e in kl] == [1, 2, 3]
    assert [e.value for e in kl] == pytest.approx([0.01, 0.02, 0.03])
    assert math.isnan(acc.Scalars("rewards/exact/mean")[1].value)  # NaN kept as NaN, not dropped
    # samples as text at steps 1 (first), 2 (every 2nd) and 3 (last)
    texts = acc.Tensors("samples/text_summary")
    assert [e.step for e in texts] == [1, 2, 3]
    markdown = texts[0].tensor_proto.string_val[0].decode()
    assert "What is 1+1?" in markdown and "2 \\| two<br>ok" in markdown
    # metrics.jsonl unchanged: every step, NaN as null
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert read_metrics(tmp_path)[1]["rewards/exact/mean"] is None


def test_log_samples_keeps_first_every_nth_and_last_step(tmp_path):
    logger = MetricsLogger(tmp_path, max_steps=7, stream=io.StringIO(), sample_steps=3)
    for step in range(1, 8):
        logger.log_samples(step, ROWS)
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 3, 6, 7]
    assert lines[0]["rewards"] == {"exact": 1.0, "fmt": None} and lines[0]["completion"] == "2 | two\nok"


def test_no_samples_when_sample_steps_is_zero(tmp_path):
    logger = MetricsLogger(tmp_path, max_steps=2, stream=io.StringIO(), sample_steps=0)
    logger.log_samples(1, ROWS)
    assert not (tmp_path / "samples.jsonl").exists() and not logger.wants_samples(2)


def test_sample_completions_spread_over_groups_with_per_function_rewards():
    rows = sample_completions(scored_rollout(), k=4)
    # N=8, k=4: completions 0, 2, 4, 6 -> the first completion of each of the 4 groups
    assert [r["completion"] for r in rows] == ["c0", "c2", "c4", "c6"]
    assert [r["prompt"] for r in rows] == ["q0", "q1", "q2", "q3"]  # the user's message, not the system's
    assert [r["answer"] for r in rows] == ["a0", "a1", "a2", "a3"]
    assert rows[1]["reward"] == pytest.approx(0.2) and rows[1]["advantage"] == pytest.approx(-0.2)
    assert rows[1]["rewards"] == {"a": pytest.approx(0.2), "b": 1.0}
    odd = sample_completions(scored_rollout(), k=8)[1]
    assert odd["rewards"]["b"] is None  # NaN (not applicable / failed) becomes None
    json.dumps(rows)  # plain data: travels with StepMetrics and into samples.jsonl
    assert sample_completions(scored_rollout(), k=0) == []
    assert len(sample_completions(scored_rollout(), k=50)) == 8


def test_samples_markdown_is_one_table_row_per_sample():
    text = samples_markdown(ROWS)
    header, rule, row = text.splitlines()
    assert header == "| prompt | completion | answer | reward | advantage | exact | fmt |"
    assert rule.count("---") == 7
    assert row == "| What is 1+1? | 2 \\| two<br>ok | 2 | 1.000 | 0.500 | 1.000 | – |"


def test_tensorboard_missing_names_the_package_and_the_switch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install tensorboard.*logging\.tensorboard=false"):
        MetricsLogger(tmp_path, max_steps=1, stream=io.StringIO(), tensorboard=True)


def test_wandb_sink_logs_scalars_and_a_samples_table(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, data, step):
            calls.append((step, data))

        def finish(self):
            calls.append("finish")

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake = types.SimpleNamespace(init=lambda **kw: calls.append(kw) or Run(), Table=Table)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    (tmp_path / "my-run").mkdir()
    logger = MetricsLogger(tmp_path / "my-run", max_steps=1, stream=io.StringIO(), wandb=True,
                           wandb_project="proj", config={"a": 1}, sample_steps=1)  # fmt: skip
    logger.log(1, STEPS[0])
    logger.log_samples(1, ROWS)
    logger.close()
    assert calls[0] == {"project": "proj", "name": "my-run", "dir": str(tmp_path / "my-run"), "config": {"a": 1}}
    assert calls[1] == (1, STEPS[0])
    step, data = calls[2]
    assert step == 1 and data["samples"].columns[:2] == ["prompt", "completion"]
    assert data["samples"].data[0][-2:] == [1.0, None] and calls[-1] == "finish"


def test_a_resumed_run_hides_the_events_and_samples_after_its_checkpoint(tmp_path):
    first = MetricsLogger(tmp_path, max_steps=4, stream=io.StringIO(), tensorboard=True, sample_steps=1)
    for step in (1, 2, 3):
        first.log(step, {"reward": float(step)})
        first.log_samples(step, ROWS)
    first.close()  # "crashed" after step 3; the checkpoint is at step 2
    resumed = MetricsLogger(tmp_path, max_steps=4, stream=io.StringIO(), tensorboard=True, sample_steps=1,
                            start_step=2)  # fmt: skip
    for step in (3, 4):
        resumed.log(step, {"reward": 10.0 * step})
        resumed.log_samples(step, ROWS)
    resumed.close()
    rewards = [(e.step, e.value) for e in event_file_contents(tmp_path).Scalars("reward")]
    assert rewards == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    steps = [json.loads(line)["step"] for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
