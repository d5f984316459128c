"""grpo_ray/rewards/scoring.py: TRL-style reward calls, failure handling, and the combined rewards and metrics."""

from __future__ import annotations

import functools
import logging
import math
import threading
import time

import numpy as np
import pytest
import torch

from grpo_ray.rewards.scoring import RewardScores, combine_scores, score_rollout, unique_reward_names
from grpo_ray.types import Rollout

NAN = math.nan
LOGGER = "grpo_ray.rewards.scoring"


def make_rollout(prompts=("p0", "p1"), completions=("a", "bb", "ccc", "dddd")) -> Rollout:
    """B = 2 prompts, G = 2: completions 0-1 answer p0, 2-3 answer p1. Lengths 3, 1, 2, 5; 1 and 3 clipped."""
    completion_ids = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10, 11]]
    return Rollout(
        prompts=list(prompts),
        prompt_ids=[[100], [101]],
        completion_ids=completion_ids,
        completions=list(completions),
        sampling_logprobs=[[0.0] * len(ids) for ids in completion_ids],
        finish_reasons=["stop", "length", "stop", "length"],
        columns={"answer": ["x", "y"], "level": [1, 2]},
        num_generations=2,
        version=3,
        metrics={"time/rollout": 1.5},
    )


def recorder(calls: list[dict], scores=(0.0, 0.0, 0.0, 0.0)):
    """A reward written as many users write them, `f(completions, **kwargs)`, that records its arguments."""

    def record(completions, **kwargs):
        calls.append({"completions": completions, **kwargs})
        return list(scores)

    return record


# --------------------------------------------------------------------------------------------
# score_rollout: how functions are called
# --------------------------------------------------------------------------------------------


def test_reward_called_by_keyword_with_prompts_and_columns_per_completion():
    calls: list[dict] = []
    scores = score_rollout(make_rollout(), [recorder(calls, [1, 2, 3, 4])], timeout_s=5)

    assert scores.values == [[1.0], [2.0], [3.0], [4.0]]
    assert scores.errors == {"record": 0}
    (call,) = calls
    assert call["prompts"] == ["p0", "p0", "p1", "p1"]
    assert call["completions"] == ["a", "bb", "ccc", "dddd"]
    assert call["completion_ids"] == [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10, 11]]
    assert call["answer"] == ["x", "x", "y", "y"]
    assert call["level"] == [1, 1, 2, 2]
    assert set(call) == {"prompts", "completions", "completion_ids", "answer", "level"}


def test_conversational_prompts_give_chat_completions():
    chat = [[{"role": "user", "content": "q0"}], [{"role": "user", "content": "q1"}]]
    calls: list[dict] = []
    score_rollout(make_rollout(prompts=chat), [recorder(calls)], timeout_s=None)

    assert calls[0]["prompts"] == [chat[0], chat[0], chat[1], chat[1]]
    assert calls[0]["completions"] == [
        [{"role": "assistant", "content": text}] for text in ("a", "bb", "ccc", "dddd")
    ]


def test_assistant_prefill_is_put_back_in_front_of_the_completion():
    # TRL: a trailing assistant message was continued by the model, so it starts the completion.
    prefilled = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>"}]
    calls: list[dict] = []
    score_rollout(make_rollout(prompts=[prefilled, [{"role": "user", "content": "q1"}]]), [recorder(calls)], 5)

    texts = [c[0]["content"] for c in calls[0]["completions"]]
    assert texts == ["<think>a", "<think>bb", "ccc", "dddd"]


def test_string_prompts_give_string_completions():
    calls: list[dict] = []
    score_rollout(make_rollout(), [recorder(calls)], timeout_s=5)
    assert all(isinstance(c, str) for c in calls[0]["completions"])


def test_scores_accept_none_bools_numpy_and_tensor_scalars_and_nan_is_none():
    def mixed(completions, **kwargs):
        return [None, True, np.float32(0.5), torch.tensor(2.0)]

    def with_nan(completions, **kwargs):
        return [NAN, 1, 2, 3]

    scores = score_rollout(make_rollout(), [mixed, with_nan], timeout_s=5)
    assert scores.values == [[None, None], [1.0, 1.0], [0.5, 2.0], [2.0, 3.0]]
    assert scores.errors == {"mixed": 0, "with_nan": 0}


def test_functions_sharing_a_name_get_suffixed_names():
    def length(completions, scale, **kwargs):
        return [scale * len(c) for c in completions]

    funcs = [functools.partial(length, scale=1.0), functools.partial(length, scale=2.0), length]
    assert unique_reward_names(funcs) == ["length", "length_2", "length_3"]
    assert score_rollout(make_rollout(), funcs[:2], timeout_s=5).errors == {"length": 0, "length_2": 0}


# --------------------------------------------------------------------------------------------
# score_rollout: failures give None rows, an error count and one log record
# --------------------------------------------------------------------------------------------


def good(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize(
    "result, why",
    [
        ([1.0, 2.0, 3.0], "returned 3 scores for 4 completions"),
        ([1.0, "2", 3.0, 4.0], "returned '2' (str) for completion 1"),
        ("1234", "returned a str"),
        (3.0, "returned a float"),
    ],
)
def test_wrong_length_or_non_numbers_give_none_and_an_error(result, why, caplog):
    def bad(completions, **kwargs):
        return result

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        scores = score_rollout(make_rollout(), [bad, good], timeout_s=5)

    assert scores.values == [[None, 1.0], [None, 2.0], [None, 3.0], [None, 4.0]]
    assert scores.errors == {"bad": 1, "good": 0}
    assert why in caplog.text


@pytest.mark.parametrize("timeout_s", [5.0, None])
def test_raising_function_gives_none_is_counted_and_logged_once_with_traceback(timeout_s, caplog):
    def broken(completions, **kwargs):
        return [1 / 0 for _ in completions]

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        first = score_rollout(make_rollout(), [broken, good], timeout_s=timeout_s)
        second = score_rollout(make_rollout(), [broken, good], timeout_s=timeout_s)

    for scores in (first, second):
        assert [row[0] for row in scores.values] == [None] * 4
        assert [row[1] for row in scores.values] == [1.0, 2.0, 3.0, 4.0]
        assert scores.errors == {"broken": 1, "good": 0}
    (record,) = [r for r in caplog.records if "broken" in r.getMessage()]
    message = record.getMessage()
    assert "Traceback" in message and "ZeroDivisionError" in message and "1 / 0" in message


def test_hung_function_times_out_and_the_next_call_still_answers(caplog):
    release = threading.Event()

    def hangs(completions, **kwargs):
        release.wait(30)
        return [0.0] * len(completions)

    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            start = time.perf_counter()
            hung = score_rollout(make_rollout(), [hangs, good], timeout_s=0.2)
            again = score_rollout(make_rollout(), [good], timeout_s=0.2)
            elapsed = time.perf_counter() - start
    finally:
        release.set()  # let the abandoned thread finish

    assert elapsed < 2.0
    assert [row[0] for row in hung.values] == [None] * 4
    assert hung.errors == {"hangs": 1, "good": 0}
    assert again.values == [[1.0], [2.0], [3.0], [4.0]]
    assert "timed out after 0.2 s" in caplog.text
    assert "release.wait(30)" in caplog.text  # where it hung


# --------------------------------------------------------------------------------------------
# combine_scores
# --------------------------------------------------------------------------------------------

# Three functions over the 4 completions (groups {0, 1} and {2, 3}), scored in two parts:
#   f1 = [1, 0, None, 2], f2 = [2, None, 4, 0], f3 failed in both parts (all None), weights [1, 0.5, 3]
#   rewards = nansum(w · r) = [1 + 1, 0, 0 + 2, 2 + 0] = [2, 0, 2, 2]
PARTS = [
    RewardScores(values=[[1.0, 2.0, None], [0.0, None, None]], errors={"f1": 0, "f2": 0, "f3": 1}, seconds=0.25),
    RewardScores(values=[[None, 4.0, None], [2.0, 0.0, None]], errors={"f1": 0, "f2": 0, "f3": 1}, seconds=0.75),
]
NAMES = ["f1", "f2", "f3"]
WEIGHTS = [1.0, 0.5, 3.0]


def test_combine_stacks_parts_and_takes_the_weighted_nansum():
    scored = combine_scores(make_rollout(), PARTS, NAMES, WEIGHTS, "group")

    expected = torch.tensor([[1, 2, NAN], [0, NAN, NAN], [NAN, 4, NAN], [2, 0, NAN]], dtype=torch.float32)
    torch.testing.assert_close(scored.rewards_per_func, expected, equal_nan=True)
    assert scored.rewards_per_func.dtype == torch.float32
    torch.testing.assert_close(scored.rewards, torch.tensor([2.0, 0.0, 2.0, 2.0]))
    assert scored.reward_names == NAMES
    assert scored.rollout.version == 3


def test_combine_without_weights_weighs_every_function_one():
    scored = combine_scores(make_rollout(), PARTS, NAMES, None, "group")
    torch.testing.assert_close(scored.rewards, torch.tensor([3.0, 0.0, 4.0, 2.0]))


def test_completion_no_function_scored_gets_reward_zero_as_in_trl():
    parts = [RewardScores(values=[[None], [1.0], [None], [None]])]
    scored = combine_scores(make_rollout(), parts, ["f"], None, "none")
    torch.testing.assert_close(scored.rewards, torch.tensor([0.0, 1.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    "scale_rewards, divisor",
    [
        # group {2, 0}: mean 1, unbiased std √2; group {2, 2}: mean 2, std 0 → advantages 0
        ("group", math.sqrt(2) + 1e-4),
        # batch [2, 0, 2, 2]: mean 1.5, unbiased std √((.25 + 2.25 + .25 + .25) / 3) = 1
        ("batch", 1.0 + 1e-4),
        ("none", 1.0),
    ],
)
def test_combine_advantages_are_group_normalised(scale_rewards, divisor):
    scored = combine_scores(make_rollout(), PARTS, NAMES, WEIGHTS, scale_rewards)
    expected = torch.tensor([1.0, -1.0, 0.0, 0.0]) / divisor
    torch.testing.assert_close(scored.advantages, expected)


def test_combine_metrics_have_trl_names_and_hand_computed_values():
    metrics = combine_scores(make_rollout(), PARTS, NAMES, WEIGHTS, "group").metrics

    expected = {
        "time/rollout": 1.5,  # copied from the rollout
        "reward": 1.5,  # mean of [2, 0, 2, 2]
        "reward_std": 1.0,  # see test_combine_advantages_are_group_normalised
        "frac_reward_zero_std": 0.5,  # group {2, 2}
        "rewards/f1/mean": 1.0,  # [1, 0, 2]
        "rewards/f1/std": 1.0,  # √((0 + 1 + 1) / 2)
        "rewards/f1/errors": 0.0,
        "rewards/f2/mean": 2.0,  # [2, 4, 0]
        "rewards/f2/std": 2.0,  # √((0 + 4 + 4) / 2)
        "rewards/f2/errors": 0.0,
        "rewards/f3/mean": NAN,  # never scored
        "rewards/f3/std": NAN,
        "rewards/f3/errors": 2.0,  # one failed call per part
        "completions/mean_length": 2.75,  # lengths [3, 1, 2, 5]
        "completions/min_length": 1.0,
        "completions/max_length": 5.0,
        "completions/clipped_ratio": 0.5,  # 1 and 3 ended on "length"
        "completions/mean_terminated_length": 2.5,  # [3, 2]
        "completions/min_terminated_length": 2.0,
        "completions/max_terminated_length": 3.0,
        "time/reward": 0.75,  # the slower part
        "recovery/reward_restarts": 0.0,  # no part came from a restarted actor
    }
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, nan_ok=True), name


def test_terminated_length_is_zero_when_every_completion_was_clipped():
    rollout = make_rollout()
    rollout.finish_reasons = ["length"] * 4
    metrics = combine_scores(rollout, PARTS, NAMES, WEIGHTS, "group").metrics
    assert metrics["completions/clipped_ratio"] == 1.0
    assert metrics["completions/mean_terminated_length"] == 0.0


def test_std_of_a_single_score_is_nan():
    parts = [RewardScores(values=[[1.0], [None], [None], [None]])]
    metrics = combine_scores(make_rollout(), parts, ["f"], None, "group").metrics
    assert metrics["rewards/f/mean"] == 1.0
    assert math.isnan(metrics["rewards/f/std"])


def test_combine_rejects_parts_that_do_not_cover_the_rollout():
    with pytest.raises(ValueError, match="3 rows for a rollout of 4 completions"):
        combine_scores(make_rollout(), PARTS[:1] + [RewardScores(values=[[1.0, 1.0, 1.0]])], NAMES, None, "group")
    with pytest.raises(ValueError, match="2 reward weights for 3 reward functions"):
        combine_scores(make_rollout(), PARTS, NAMES, [1.0, 1.0], "group")


def test_scoring_by_group_ranges_then_combining_equals_scoring_at_once():
    def by_answer(completions, answer, **kwargs):
        return [float(len(c)) if a == "x" else None for c, a in zip(completions, answer)]

    rollout, funcs = make_rollout(), [good, by_answer]
    names = unique_reward_names(funcs)
    whole = combine_scores(rollout, [score_rollout(rollout, funcs, 5)], names, [1.0, 2.0], "group")
    parts = [score_rollout(rollout.group_slice(g, g + 1), funcs, 5) for g in range(2)]
    split = combine_scores(rollout, parts, names, [1.0, 2.0], "group")

    torch.testing.assert_close(split.rewards_per_func, whole.rewards_per_func, equal_nan=True)
    torch.testing.assert_close(split.advantages, whole.advantages)
    torch.testing.assert_close(split.rewards, torch.tensor([3.0, 6.0, 3.0, 4.0]))  # len + 2·len for "x" rows


def test_rollouts_of_several_engines_join_in_order_and_slice_back():
    whole = make_rollout()
    shares = [whole.group_slice(0, 1), whole.group_slice(1, 2)]
    shares[0].metrics = {"time/rollout": 1.5, "rollout/prompts_truncated": 1.0}
    shares[1].metrics = {"time/rollout": 2.5, "rollout/prompts_truncated": 2.0}
    joined = Rollout.concat(shares)
    for name in ("prompts", "prompt_ids", "completion_ids", "completions", "sampling_logprobs", "finish_reasons",
                 "columns", "num_generations", "version"):  # fmt: skip
        assert getattr(joined, name) == getattr(whole, name), name
    assert joined.metrics == {"time/rollout": 2.5, "rollout/prompts_truncated": 3.0}  # the slowest; counts add up
    assert Rollout.concat([whole]) is whole
    other = make_rollout()
    other.version = 4
    with pytest.raises(ValueError, match=r"versions \[3, 4\]"):
        Rollout.concat([whole, other])
