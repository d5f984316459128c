"""Scoring a rollout with reward functions, and turning the scores into a ScoredRollout.

Two halves, split where the reward pool splits the work:

- `score_rollout` runs in each RewardActor on its range of groups: it calls every reward
  function as TRL does (by keyword, prompts and columns repeated per completion) and turns
  failures (an exception, a wrong-length or non-numeric result, a timeout) into None rows and an
  error count, so one bad function costs a metric, never the run.
- `combine_scores` runs once per step on the parts, in order: the [N, F] matrix, TRL's weighted
  nansum, group-normalised advantages and TRL's scoring metrics.

No Ray here: the actor and the pool in `grpo_ray.actors.reward` are thin shells around these.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from grpo_ray.grpo import group_advantages, reward_stats
from grpo_ray.rewards import reward_name
from grpo_ray.types import Rollout, ScoredRollout

__all__ = ["RewardScores", "combine_scores", "completion_metrics", "score_rollout", "unique_reward_names"]

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., Sequence[Any]]

# Functions whose failure was already logged in this process, by id; the dict keeps each one alive so
# that its id cannot be reused by a new function that would then never be logged.
_logged_failures: dict[int, RewardFunc] = {}
_NOT_A_SCORE = object()  # what _as_score returns for a value that is no score


@dataclass
class RewardScores:
    """What one RewardActor returns for its range of groups: raw scores, failures, time."""

    values: list[list[float | None]]  # [N][F], None where a function returned None or failed
    errors: dict[str, int] = field(default_factory=dict)  # reward name (unique_reward_names) -> failed calls
    seconds: float = 0.0  # wall time of the whole range
    restarts: int = 0  # 1 when the actor was restarted after a crash before scoring this range


class _RewardCallError(Exception):
    """A reward call that gave no usable scores; the message says why, for the log."""


def unique_reward_names(funcs: Sequence[RewardFunc]) -> list[str]:
    """The metric name of each function (`reward_name`), made unique with `_2`, `_3`… so two
    functions that share a name (two partials of one function) keep separate metrics."""
    names: list[str] = []
    for fn in funcs:
        base = name = reward_name(fn)
        suffix = 2
        while name in names:
            name, suffix = f"{base}_{suffix}", suffix + 1
        names.append(name)
    return names


def score_rollout(rollout: Rollout, funcs: Sequence[RewardFunc], timeout_s: float | None) -> RewardScores:
    """Scores every completion of `rollout` with each of `funcs` (F of them), TRL's way.

    Each function is called once, by keyword, as TRL's GRPOTrainer calls it:
    ``fn(prompts=[N], completions=[N], completion_ids=[N][L_i], **{column: [N]})`` where the
    prompt and the columns of completion i are those of prompt i // G, and a completion is
    ``[{"role": "assistant", "content": text}]`` when prompts are message lists (TRL's
    conversational format), else the text.

    A call that raises, returns other than N numbers-or-None, or runs past `timeout_s` seconds
    gives None for all its rows and one error under its name; its first failure in this process
    is logged with the traceback. NaN scores count as None (TRL treats both as "no reward").

    Timeouts: with `timeout_s` > 0 each call runs in a daemon thread that is abandoned when the
    time is up, so the caller answers on time. Python cannot kill a thread: an abandoned call
    keeps its CPU and memory until it returns by itself (or the process exits), and code that
    holds the GIL without yielding (a catastrophic regex in C) delays even the caller. A worker
    thread also cannot install signal handlers, so reward code that times itself out with
    SIGALRM needs `timeout_s` None or <= 0: calls then run in the caller's thread, untimed.
    """
    start = time.perf_counter()
    kwargs = _reward_kwargs(rollout)
    n = rollout.num_completions
    columns: list[list[float | None]] = []  # [F][N]
    errors: dict[str, int] = {}
    for fn, name in zip(funcs, unique_reward_names(funcs)):
        try:
            columns.append(_checked_scores(_call(fn, kwargs, timeout_s), n))
            errors[name] = 0
        except _RewardCallError as error:
            columns.append([None] * n)
            errors[name] = 1
            _log_first_failure(fn, name, str(error))
    values = [list(row) for row in zip(*columns)] if columns else [[] for _ in range(n)]
    return RewardScores(values=values, errors=errors, seconds=time.perf_counter() - start)


def combine_scores(
    rollout: Rollout,
    parts: Sequence[RewardScores],
    reward_names: Sequence[str],
    reward_weights: Sequence[float] | None,
    scale_rewards: str | bool,
) -> ScoredRollout:
    """The ScoredRollout of `rollout` from the scores of its consecutive group ranges, in order.

    Steps:
        1. stack the parts' values into rewards_per_func [N, F] float32, NaN for None;
        2. rewards [N] = Σ_f w_f · r_f with NaN as 0 (TRL's nansum; weights default to 1.0);
        3. advantages [N] = grpo.group_advantages(rewards, G, scale_rewards);
        4. metrics under TRL's names (the rollout's own metrics copied first): `reward`,
           `reward_std`, `frac_reward_zero_std`, `rewards/<name>/{mean,std}` over the non-None
           scores (NaN when there are none, std also with one), `rewards/<name>/errors` (failed
           calls), `completions/{mean,min,max}_length`, `completions/clipped_ratio` (finish reason
           "length"), `completions/{mean,min,max}_terminated_length` (0 when none terminated),
           and `time/reward`, the slowest part's seconds (the parts run in parallel).
    """
    num_funcs = len(reward_names)
    values = [row for part in parts for row in part.values]
    if len(values) != rollout.num_completions or any(len(row) != num_funcs for row in values):
        raise ValueError(
            f"reward parts hold {len(values)} rows for a rollout of {rollout.num_completions} completions "
            f"and {num_funcs} reward functions: the parts must cover its groups in order, once"
        )
    weights = [1.0] * num_funcs if reward_weights is None else list(reward_weights)
    if len(weights) != num_funcs:
        raise ValueError(f"{len(weights)} reward weights for {num_funcs} reward functions")

    # 1. [N, F], NaN for None
    rewards_per_func = torch.tensor(
        [[math.nan if v is None else v for v in row] for row in values], dtype=torch.float32
    ).reshape(len(values), num_funcs)
    # 2. weighted sum; a completion no function scored gets 0, as in TRL
    rewards = (rewards_per_func * torch.tensor(weights, dtype=torch.float32)).nansum(dim=1)
    # 3. advantages
    advantages = group_advantages(rewards, rollout.num_generations, scale_rewards)
    # 4. metrics
    metrics = dict(rollout.metrics)
    metrics.update(reward_stats(rewards, rollout.num_generations))
    for f, name in enumerate(reward_names):
        mean, std = _mean_std(rewards_per_func[:, f])
        metrics[f"rewards/{name}/mean"] = mean
        metrics[f"rewards/{name}/std"] = std
        metrics[f"rewards/{name}/errors"] = float(sum(part.errors.get(name, 0) for part in parts))
    metrics.update(completion_metrics(rollout))
    metrics["time/reward"] = max((part.seconds for part in parts), default=0.0)
    metrics["recovery/reward_restarts"] = float(sum(part.restarts for part in parts))
    return ScoredRollout(
        rollout=rollout,
        reward_names=list(reward_names),
        rewards_per_func=rewards_per_func,
        rewards=rewards,
        advantages=advantages,
        metrics=metrics,
    )


def completion_metrics(rollout: Rollout) -> dict[str, float]:
    """TRL's `completions/*` metrics: lengths in tokens, and the share cut at the length limit."""
    lengths = [len(ids) for ids in rollout.completion_ids]
    terminated = [n for n, reason in zip(lengths, rollout.finish_reasons) if reason != "length"]
    if not lengths:
        return {}
    return {
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/min_length": float(min(lengths)),
        "completions/max_length": float(max(lengths)),
        "completions/clipped_ratio": 1.0 - len(terminated) / len(lengths),
        # TRL logs 0 rather than NaN when every completion was clipped
        "completions/mean_terminated_length": sum(terminated) / len(terminated) if terminated else 0.0,
        "completions/min_terminated_length": float(min(terminated, default=0)),
        "completions/max_terminated_length": float(max(terminated, default=0)),
    }


def _reward_kwargs(rollout: Rollout) -> dict[str, Any]:
    """The keyword arguments of every reward call, one entry per completion (TRL's layout)."""
    g = rollout.num_generations
    per_completion = range(rollout.num_completions)
    prompts = [rollout.prompts[i // g] for i in per_completion]
    if prompts and _is_conversational(prompts[0]):
        completions: list[Any] = [
            [{"role": "assistant", "content": _prefill(prompt) + text}]
            for prompt, text in zip(prompts, rollout.completions)
        ]
    else:
        completions = list(rollout.completions)
    columns = {name: [values[i // g] for i in per_completion] for name, values in rollout.columns.items()}
    return {"prompts": prompts, "completions": completions, "completion_ids": rollout.completion_ids, **columns}


def _is_conversational(prompt: Any) -> bool:
    """TRL's test: a prompt given as a list of {"role", "content"} messages."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


def _prefill(prompt: list[dict[str, Any]]) -> str:
    """A trailing assistant message is a prefill the model continued: TRL puts it back in front."""
    last = prompt[-1]
    return str(last.get("content") or "") if last.get("role") == "assistant" else ""


def _call(fn: RewardFunc, kwargs: dict[str, Any], timeout_s: float | None) -> Any:
    """fn(**kwargs), in a daemon thread abandoned after timeout_s; _RewardCallError on failure."""
    if timeout_s is None or timeout_s <= 0:
        try:
            return fn(**kwargs)
        except Exception:
            raise _RewardCallError(f"raised:\n{traceback.format_exc()}") from None

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(**kwargs)
        except BaseException:  # noqa: BLE001 - reported to the caller, not swallowed
            outcome["error"] = traceback.format_exc()

    thread = threading.Thread(target=run, name=f"reward-{reward_name(fn)}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        frame = sys._current_frames().get(thread.ident or -1)
        where = "".join(traceback.format_stack(frame)) if frame is not None else "(stack unavailable)\n"
        raise _RewardCallError(
            f"timed out after {timeout_s:g} s (reward.timeout_s); the call is abandoned and keeps "
            f"running in a daemon thread. It was at:\n{where}"
        )
    if "error" in outcome:
        raise _RewardCallError(f"raised:\n{outcome['error']}")
    return outcome["value"]


def _checked_scores(output: Any, n: int) -> list[float | None]:
    """`output` as N floats-or-None (NaN → None); _RewardCallError unless it is exactly that."""
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__"):
        raise _RewardCallError(f"returned a {type(output).__name__}, not a list of {n} floats or None")
    if len(output) != n:
        raise _RewardCallError(f"returned {len(output)} scores for {n} completions")
    scores: list[float | None] = []
    for i, value in enumerate(output):
        score = _as_score(value)
        if score is _NOT_A_SCORE:
            raise _RewardCallError(
                f"returned {value!r} ({type(value).__name__}) for completion {i}: expected a float or None"
            )
        scores.append(score)  # type: ignore[arg-type]
    return scores


def _as_score(value: Any) -> float | None | object:
    """A float or None for a real number (bool, numpy, 0-d tensor included) or None; else _NOT_A_SCORE."""
    if value is None:
        return None
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    if not isinstance(value, numbers.Real):
        return _NOT_A_SCORE
    score = float(value)
    return None if math.isnan(score) else score


def _log_first_failure(fn: RewardFunc, name: str, why: str) -> None:
    """Logs a reward function's failure the first time it fails in this process; later ones only count."""
    if id(fn) in _logged_failures:
        return
    _logged_failures[id(fn)] = fn
    logger.warning(
        "reward function %r %s\nIts rows score None and rewards/%s/errors counts each failed call; "
        "later failures of this function are not logged again.",
        name,
        why.rstrip(),
        name,
    )


def _mean_std(column: torch.Tensor) -> tuple[float, float]:
    """Mean and unbiased std of the non-NaN values: NaN without values, std NaN with one (TRL's nanstd)."""
    present = column[~torch.isnan(column)]
    mean = present.mean().item() if present.numel() else math.nan
    std = present.std().item() if present.numel() > 1 else math.nan
    return mean, std
