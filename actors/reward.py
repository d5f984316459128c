"""Reward scoring on CPU actors: RewardActor (one process, some groups) and RewardPool (the driver's side).

One step: the driver hands `RewardPool.score` the ObjectRefs of a step's Rollout (one share per
rollout engine); the pool asks each actor for a contiguous range of groups, passing the refs
themselves (Ray resolves them in the actor's process, so the batch never travels through the
driver), and returns the ref of the first actor's call that combines the parts into a
ScoredRollout, which the learner takes as is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ray
from ray import ObjectRef

from grpo_ray import rewards
from grpo_ray.config import RewardConfig, TaskConfig
from grpo_ray.parallel import group_ranges
from grpo_ray.rewards.scoring import RewardScores, combine_scores, score_rollout, unique_reward_names
from grpo_ray.types import Rollout, ScoredRollout

__all__ = ["RewardActor", "RewardPool"]


class RewardActor:
    """Scores ranges of a rollout's groups with reward functions loaded by import path."""

    def __init__(self, reward_funcs: list[str], timeout_s: float) -> None:
        """Loads the functions; when one runs code (`@requires_sandbox`), also starts this
        process's warm sandbox, or raises RewardLoadError with the command that installs it."""
        self.funcs = [rewards.load(path) for path in reward_funcs]
        self.names = unique_reward_names(self.funcs)
        self.timeout_s = timeout_s
        rewards.start_sandbox(reward_funcs, self.funcs)

    def ready(self) -> list[str]:
        """The reward names: answers once the functions loaded, so the pool can wait for it."""
        return self.names

    def score(self, start: int, stop: int, *rollouts: Rollout) -> RewardScores:
        """Scores of groups [start, stop) of the step's rollout, given as the engines' shares in
        order (see `score_rollout`)."""
        return score_rollout(Rollout.concat(rollouts).group_slice(start, stop), self.funcs, self.timeout_s)

    def combine(self, reward_names: list[str], reward_weights: list[float] | None, scale_rewards: str,
                num_parts: int, *parts_then_rollouts: Any) -> ScoredRollout:  # fmt: skip
        """combine_scores of every actor's part over the step's rollout (the engines' shares joined).
        Parts and shares are top-level arguments, which Ray resolves from their refs. In an actor
        that already runs (and imported torch): a task of its own would need a fresh worker
        process each step when the actors hold every CPU."""
        parts, rollouts = parts_then_rollouts[:num_parts], parts_then_rollouts[num_parts:]
        return combine_scores(Rollout.concat(rollouts), parts, reward_names, reward_weights, scale_rewards)


class _RemoteRewardActor(RewardActor):
    """RewardActor as a Ray actor: a loading error is kept and raised by `ready()`.

    Ray keeps only the text of an exception raised in an actor's constructor; raised from a
    method, the exception reaches the driver whole (`RayTaskError.cause`), so the pool can
    re-raise the registry's RewardLoadError itself.
    """

    def __init__(self, reward_funcs: list[str], timeout_s: float) -> None:
        self._load_error: Exception | None = None
        # Ray restarted this actor after a crash: say so once, with the next scores.
        self._restarted = ray.get_runtime_context().was_current_actor_reconstructed
        try:
            super().__init__(reward_funcs, timeout_s)
        except Exception as error:  # re-raised by ready()
            self._load_error = error

    def ready(self) -> list[str]:
        if self._load_error is not None:
            raise self._load_error
        return super().ready()

    def score(self, start: int, stop: int, *rollouts: Rollout) -> RewardScores:
        scores = super().score(start, stop, *rollouts)
        scores.restarts, self._restarted = int(self._restarted), False
        return scores

    def __repr__(self) -> str:
        return "RewardActor"  # Ray's prefix of the actor's log lines


class RewardPool:
    """`reward_cfg.num_workers` RewardActors (one CPU each, spread over the cluster's nodes)."""

    def __init__(
        self,
        reward_cfg: RewardConfig,
        task_cfg: TaskConfig,
        scale_rewards: str,
        *,
        ready_timeout_s: float = 600.0,
        max_restarts: int = 0,
    ) -> None:
        """Starts the actors and waits until each has loaded `task_cfg.reward_funcs`.

        An actor that dies is restarted up to `max_restarts` times and its calls retried (its
        groups are re-scored); restarts are counted in `recovery/reward_restarts`.
        Raises the registry's RewardLoadError (or RewardImportError) when a path does not load,
        and TimeoutError when the actors cannot start within ready_timeout_s (not enough CPUs).
        """
        if reward_cfg.num_workers < 1:
            raise ValueError(f"reward.num_workers={reward_cfg.num_workers}: need at least one reward actor")
        self.reward_weights = None if task_cfg.reward_weights is None else list(task_cfg.reward_weights)
        self.scale_rewards = scale_rewards
        actor_cls = ray.remote(num_cpus=1, max_restarts=max_restarts, max_task_retries=max_restarts)(_RemoteRewardActor)
        self.actors: list[Any] = [
            actor_cls.options(scheduling_strategy="SPREAD").remote(list(task_cfg.reward_funcs), reward_cfg.timeout_s)
            for _ in range(reward_cfg.num_workers)
        ]
        try:
            self.reward_names: list[str] = self._wait_ready(ready_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def score(self, rollout_refs: Sequence[ObjectRef], num_groups: int) -> ObjectRef:
        """The ref of the ScoredRollout of a step's rollout of num_groups groups, which arrives as
        the refs of its shares (one per rollout engine, in order).

        Groups are split in contiguous ranges, one per actor; each actor resolves the refs itself.
        """
        parts = [
            actor.score.remote(start, stop, *rollout_refs)
            for actor, (start, stop) in zip(self.actors, group_ranges(num_groups, len(self.actors)))
        ]
        combiner = self.actors[0]
        return combiner.combine.remote(self.reward_names, self.reward_weights, self.scale_rewards, len(parts), *parts,
                                       *rollout_refs)  # fmt: skip

    def shutdown(self) -> None:
        """Kills the actors (an abandoned timed-out reward call dies with its process)."""
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def _wait_ready(self, timeout_s: float) -> list[str]:
        """The actors' reward names once all are up; their loading error, unwrapped, if any."""
        try:
            names: Sequence[list[str]] = ray.get([actor.ready.remote() for actor in self.actors], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(
                f"{len(self.actors)} reward actors (reward.num_workers, one CPU each) did not start within "
                f"{timeout_s:g} s: they need {len(self.actors)} CPUs besides the other actors' and the cluster "
                f"has {ray.cluster_resources().get('CPU', 0):g} in all; lower reward.num_workers or add CPUs"
            ) from None
        except ray.exceptions.RayTaskError as error:
            raise error.cause from None
        return list(names[0])
