"""The driver: build the actors, run the GRPO step loop, save the run.

One step, top to bottom:
    prompts ─► RolloutActor.generate ─► ref(Rollout)
    ref(Rollout) ─► RewardPool.score ─► ref(ScoredRollout)        (CPU actors, in parallel)
    ref(ScoredRollout) ─► LearnerActor.train_step ─► StepMetrics
    LearnerActor.export_weights ─► RolloutActor.update_weights ─► version + 1
Batches move as ObjectRefs between actors; the driver only waits on them (never fetches a
batch) and fetches the small StepMetrics. Every wait has a deadline that names the call.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig

from grpo_ray.config import ConfigError, to_yaml
from grpo_ray.data import PromptSampler, load_prompts
from grpo_ray.metrics import MetricsLogger
from grpo_ray.models import resolve_model_path

log = logging.getLogger("grpo_ray")


class CallTimeout(TimeoutError):
    """A remote call that missed its deadline; the message names the actor and the call."""


# --- Ray plumbing ------------------------------------------------------------------------


def required_cpus(cfg: DictConfig) -> float:
    return cfg.cluster.rollout_cpus + cfg.cluster.learner_cpus + cfg.reward.num_workers


def connect(cfg: DictConfig) -> None:
    """Join the cluster of `ray job submit` / cluster.address, else start a local one that fits the job."""
    import ray

    need = required_cpus(cfg)
    if not ray.is_initialized():
        if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=cfg.cluster.address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                     include_dashboard=False, logging_level=logging.WARNING)  # fmt: skip
    have = ray.cluster_resources().get("CPU", 0)
    if have < need:
        raise ConfigError(
            f"the job needs {need:g} CPUs (cluster.rollout_cpus + cluster.learner_cpus + reward.num_workers) "
            f"but the Ray cluster has {have:g}; lower reward.num_workers or add CPUs"
        )


def wait(ref: Any, what: str, timeout_s: float) -> Any:
    """Wait until `ref` is ready without fetching it; raise CallTimeout naming `what` at the deadline."""
    import ray

    ready, _ = ray.wait([ref], timeout=timeout_s, fetch_local=False)
    if not ready:
        raise CallTimeout(f"{what} did not finish within cluster.call_timeout_s={timeout_s:g}s")
    return ref


def get(ref: Any, what: str, timeout_s: float) -> Any:
    """Fetch a small result (metrics, versions) with a deadline that names the call."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise CallTimeout(f"{what} did not finish within cluster.call_timeout_s={timeout_s:g}s") from e


@contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[f"time/{name}"] = time.perf_counter() - start


# --- actors ------------------------------------------------------------------------------


@dataclass
class Actors:
    rollout: Any
    rewards: Any  # RewardPool
    learner: Any
    timeout_s: float

    @classmethod
    def create(cls, cfg: DictConfig, model_path: str) -> "Actors":
        """Start rollout, reward pool and learner; wait until each has loaded (errors surface here)."""
        import ray

        from grpo_ray.actors.learner import LearnerActor
        from grpo_ray.actors.reward import RewardPool
        from grpo_ray.actors.rollout import RolloutActor

        device = "cuda" if cfg.cluster.placement != "cpu" else "cpu"
        cluster = cfg.cluster
        rewards = RewardPool(cfg.reward, cfg.task, cfg.loss.scale_rewards)  # first: bad reward paths fail fast
        rollout = ray.remote(num_cpus=cluster.rollout_cpus, num_gpus=cluster.rollout_gpus)(RolloutActor)
        learner = ray.remote(num_cpus=cluster.learner_cpus, num_gpus=cluster.learner_gpus)(LearnerActor)
        actors = cls(
            rollout=rollout.remote(cfg, model_path, device),
            rewards=rewards,
            learner=learner.remote(cfg, model_path, device),
            timeout_s=cluster.call_timeout_s,
        )
        try:
            get(actors.rollout.ready.remote(), "RolloutActor.__init__ (loading the model)", actors.timeout_s)
            get(actors.learner.ready.remote(), "LearnerActor.__init__ (loading the model)", actors.timeout_s)
        except BaseException:
            actors.shutdown()
            raise
        return actors

    def sync_weights(self) -> int:
        """Learner's adapter -> rollout, through the object store; returns the rollout's new version."""
        weights = self.learner.export_weights.remote()
        return get(self.rollout.update_weights.remote(weights), "RolloutActor.update_weights", self.timeout_s)

    def shutdown(self) -> None:
        import ray

        self.rewards.shutdown()
        for actor in (self.rollout, self.learner):
            ray.kill(actor)


# --- rollout schedules: chosen once, at setup --------------------------------------------


class OnPolicy:
    """async_steps=0: each step's rollout is generated by the weights the learner holds."""

    def __init__(self, actors: Actors, sampler: PromptSampler, prompts_per_step: int) -> None:
        self.actors, self.sampler, self.prompts_per_step = actors, sampler, prompts_per_step

    def launch(self, version: int) -> Any:
        return self.actors.rollout.generate.remote(self.sampler.next_batch(self.prompts_per_step), version)

    def next_rollout(self, version: int) -> Any:
        return self.launch(version)


class OneStepAhead(OnPolicy):
    """async_steps=1: the rollout of step k+1 is generated while the learner trains step k."""

    pending: Any = None

    def next_rollout(self, version: int) -> Any:
        current = self.pending if self.pending is not None else self.launch(version)
        self.pending = self.launch(version)  # queued on the rollout actor before the next weight update
        return current


# --- the run -----------------------------------------------------------------------------


def make_run_dir(cfg: DictConfig) -> Path:
    name = cfg.logging.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.logging.output_dir).absolute() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def save_adapter(actors: Actors, path: Path) -> None:
    """Write the learner's adapter in PEFT format (the learner may run on another node)."""
    path.mkdir(parents=True, exist_ok=True)
    files = get(actors.learner.adapter_files.remote(), "LearnerActor.adapter_files", actors.timeout_s)
    for name, data in files.items():
        (path / name).write_bytes(data)


def train(cfg: DictConfig) -> Path:
    """Run GRPO as configured; returns the run directory (config.yaml, metrics.jsonl, final/)."""
    run_dir = make_run_dir(cfg)
    print(f"grpo-ray: run directory {run_dir}", flush=True)
    prompts_per_step = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps
    prompts_per_step //= cfg.rollout.num_generations
    sampler = PromptSampler(load_prompts(cfg.task, cfg.trainer.seed), seed=cfg.trainer.seed)
    model_path = resolve_model_path(cfg.model.name_or_path)
    connect(cfg)
    actors = Actors.create(cfg, model_path)
    schedule = (OneStepAhead if cfg.trainer.async_steps else OnPolicy)(actors, sampler, prompts_per_step)
    logger = MetricsLogger(run_dir, cfg.trainer.max_steps, cfg.logging.logging_steps)
    timeout = cfg.cluster.call_timeout_s
    try:
        version = actors.sync_weights()  # the rollout starts from the learner's exact adapter
        for step in range(1, cfg.trainer.max_steps + 1):
            timings: dict[str, float] = {}
            with phase("step", timings):
                with phase("rollout", timings):
                    rollout = wait(schedule.next_rollout(version), "RolloutActor.generate", timeout)
                with phase("reward", timings):
                    scored = wait(actors.rewards.score(rollout, prompts_per_step), "RewardPool.score", timeout)
                with phase("train", timings):
                    result = get(actors.learner.train_step.remote(scored), "LearnerActor.train_step", timeout)
                with phase("sync", timings):
                    version = actors.sync_weights()
            # tokens/s: prompt + completion tokens of the step over its wall time, end to end
            timings["perf/tokens_per_s"] = result.metrics["tokens/total"] / timings["time/step"]
            logger.log(step, {**result.metrics, **timings})
        save_adapter(actors, run_dir / "final")
    finally:
        logger.close()
        actors.shutdown()
    print(f"grpo-ray: done; adapter in {run_dir / 'final'}", flush=True)
    return run_dir
