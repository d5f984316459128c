"""actors/reward.py through real local Ray: the pool splits, scores and combines; failures stay contained;
code rewards check the sandbox at startup and keep one warm sandbox per actor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import ray
import torch

from grpo_ray.actors.reward import RewardActor, RewardPool, _RemoteRewardActor
from grpo_ray.parallel import group_ranges
from grpo_ray.config import RewardConfig, TaskConfig
from grpo_ray.rewards import RewardLoadError
from grpo_ray.rewards.scoring import combine_scores
from grpo_ray.sandbox import runner
from grpo_ray.types import Rollout

GSM8K = "grpo_ray.rewards.gsm8k"
# Named by import path so that the actors' processes load them too (ray_local puts the repo on PYTHONPATH).
THIS_MODULE = "tests.integration.test_reward_pool"
GOOD = f"{THIS_MODULE}:length_reward"
BROKEN = f"{THIS_MODULE}:broken_reward"
FUNCS = [f"{GSM8K}:correctness_reward", f"{GSM8K}:strict_format_reward", GOOD]
CODE_FUNCS = ["grpo_ray.rewards.code:pass_fraction_reward", "grpo_ray.rewards.code:all_pass_reward"]
WEIGHTS = [1.0, 0.5, 0.01]


def length_reward(completions, **kwargs):
    """Characters of the completion, a score that differs inside every group."""
    return [float(len(c)) for c in completions]


def broken_reward(completions, **kwargs):
    """Fails on every call."""
    raise RuntimeError("this reward is broken")


def make_rollout(num_groups: int = 5, num_generations: int = 3) -> Rollout:
    """Groups of arithmetic answers in GSM8K's XML format, some right, some wrong, some badly formatted."""
    completions, ids, reasons = [], [], []
    for b in range(num_groups):
        for g in range(num_generations):
            answer = b + g % 2  # right for g = 0 and 2, but g = 2 gives no <answer> tag
            text = f"<reasoning>\n{b} + 0\n</reasoning>\n<answer>\n{answer}\n</answer>\n"
            completions.append(text if g < 2 else f"{answer}")
            ids.append(list(range(len(completions[-1]))))
            reasons.append("length" if g == 1 else "stop")
    return Rollout(
        prompts=[f"What is {b} + 0?" for b in range(num_groups)],
        prompt_ids=[[b] for b in range(num_groups)],
        completion_ids=ids,
        completions=completions,
        sampling_logprobs=[[-1.0] * len(i) for i in ids],
        finish_reasons=reasons,
        columns={"answer": [str(b) for b in range(num_groups)]},
        num_generations=num_generations,
        version=0,
    )


def make_pool(funcs: list[str], num_workers: int, weights: list[float] | None = None) -> RewardPool:
    task = TaskConfig(reward_funcs=funcs, reward_weights=weights)
    return RewardPool(RewardConfig(num_workers=num_workers, timeout_s=10.0), task, "group")


def test_group_ranges_are_contiguous_balanced_and_skip_idle_actors():
    assert group_ranges(5, 2) == [(0, 3), (3, 5)]
    assert group_ranges(6, 3) == [(0, 2), (2, 4), (4, 6)]
    assert group_ranges(2, 4) == [(0, 1), (1, 2)]


def test_two_actors_score_like_one_process(ray_local):
    rollout = make_rollout()
    pool = make_pool(FUNCS, num_workers=2, weights=WEIGHTS)
    try:
        scored = ray.get(pool.score([ray.put(rollout)], num_groups=5), timeout=60)
    finally:
        pool.shutdown()

    local = RewardActor(FUNCS, timeout_s=10.0)
    expected = combine_scores(rollout, [local.score(0, 5, rollout)], local.names, WEIGHTS, "group")
    assert pool.reward_names == ["correctness_reward", "strict_format_reward", "length_reward"]
    torch.testing.assert_close(scored.rewards_per_func, expected.rewards_per_func)
    torch.testing.assert_close(scored.rewards, expected.rewards)
    torch.testing.assert_close(scored.advantages, expected.advantages)
    timeless = lambda metrics: {k: v for k, v in metrics.items() if k != "time/reward"}  # noqa: E731
    assert timeless(scored.metrics) == pytest.approx(timeless(expected.metrics))
    assert scored.metrics["rewards/correctness_reward/mean"] == pytest.approx(2.0 / 3)  # 2.0 for one in three
    assert scored.rollout.completions == rollout.completions


def test_raising_function_does_not_stop_the_pool(ray_local):
    rollout_ref = ray.put(make_rollout())
    pool = make_pool([BROKEN, GOOD], num_workers=2)
    try:
        first = ray.get(pool.score([rollout_ref], num_groups=5), timeout=60)
        second = ray.get(pool.score([rollout_ref], num_groups=5), timeout=60)
    finally:
        pool.shutdown()

    for scored in (first, second):
        assert torch.isnan(scored.rewards_per_func[:, 0]).all()
        assert not torch.isnan(scored.rewards_per_func[:, 1]).any()
        assert scored.metrics["rewards/broken_reward/errors"] == 2.0  # one failed call per actor
        assert scored.metrics["rewards/length_reward/errors"] == 0.0
        assert scored.advantages.abs().sum() > 0  # the good function still drives learning


def test_bad_path_fails_at_creation_with_the_nearest_name(ray_local):
    with pytest.raises(RewardLoadError, match=rf"Did you mean '{GSM8K}:correctness_reward'\?"):
        make_pool([f"{GSM8K}:corectness_reward"], num_workers=2)


def make_code_rollout(num_groups: int = 4) -> Rollout:
    """Groups of two completions to "write add(a, b)": one right, one right on half the tests."""
    completions = ["```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return 3\n```"] * num_groups
    tests = json.dumps([{"assert": "assert add(1, 2) == 3"}, {"assert": "assert add(2, 2) == 4"}])
    return Rollout(
        prompts=["Write add(a, b)."] * num_groups,
        prompt_ids=[[0]] * num_groups,
        completion_ids=[[1]] * len(completions),
        completions=completions,
        sampling_logprobs=[[-1.0]] * len(completions),
        finish_reasons=["stop"] * len(completions),
        columns={"tests": [tests] * num_groups},
        num_generations=2,
        version=0,
    )


def _sandboxes_of(pid: int) -> int:
    """How many bubblewrap processes `pid` started (its warm sandboxes)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, fields = stat.read_text().split(" ", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        count += comm == "(bwrap" and int(fields.split()[1]) == pid
    return count


def test_code_rewards_score_with_one_warm_sandbox_per_actor(ray_local):
    pool = make_pool(CODE_FUNCS, num_workers=2)
    try:
        rollout_ref = ray.put(make_code_rollout())
        scored = [ray.get(pool.score([rollout_ref], num_groups=4), timeout=120) for _ in range(2)]
        pids = ray.get([actor.__ray_call__.remote(lambda actor: os.getpid()) for actor in pool.actors])
        sandboxes = [_sandboxes_of(pid) for pid in pids]
    finally:
        pool.shutdown()
    for step in scored:
        assert step.rewards_per_func[:, 0].tolist() == [1.0, 0.5] * 4  # pass fraction
        assert step.rewards_per_func[:, 1].tolist() == [1.0, 0.0] * 4  # all pass
    assert sandboxes == [1, 1]  # started at actor startup, kept for every job since


def test_code_rewards_stop_at_startup_without_bubblewrap(monkeypatch):
    monkeypatch.setenv("GRPO_RAY_BWRAP", "/nonexistent/bwrap")
    monkeypatch.setattr(runner, "_availability_result", [])
    with pytest.raises(RewardLoadError, match=r"code:pass_fraction_reward, .*code:all_pass_reward run completions in the code sandbox.*apt-get install -y bubblewrap"):
        RewardActor(CODE_FUNCS + FUNCS, timeout_s=10.0)
    assert RewardActor(FUNCS, timeout_s=10.0).names  # rewards that run no code need no sandbox


def test_a_reward_actor_on_a_node_without_bubblewrap_fails_ready_with_the_install_command(ray_local):
    no_bwrap = {"env_vars": {"GRPO_RAY_BWRAP": "/nonexistent/bwrap"}}
    actor = ray.remote(num_cpus=1)(_RemoteRewardActor).options(runtime_env=no_bwrap).remote(CODE_FUNCS, 10.0)
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as raised:
            ray.get(actor.ready.remote(), timeout=120)
    finally:
        ray.kill(actor)
    assert isinstance(raised.value.cause, RewardLoadError) and "apt-get install -y bubblewrap" in str(raised.value.cause)
