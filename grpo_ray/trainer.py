"""The driver: build the actors, run the GRPO step loop, checkpoint, recover, save the run.

One step, top to bottom (`Run.step`):
    prompts ─► RolloutActor.generate ─► ref(Rollout)             (a share per engine, in parallel)
    refs(Rollout) ─► RewardPool.score ─► ref(ScoredRollout)       (CPU actors, in parallel)
    ref(ScoredRollout) ─► LearnerActor.train_step ─► StepMetrics
    LearnerActor ─► RolloutActors: the adapter, by the sync path (grpo_ray.weights) ─► version + 1
Batches move as ObjectRefs between actors; the driver only waits on them (never fetches a
batch) and fetches the small StepMetrics. Every wait has a deadline that names the call.
"""

from __future__ import annotations

import json
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from grpo_ray.checkpoint import find_resume_point, list_checkpoints, load_checkpoint, save_checkpoint
from grpo_ray.config import ConfigError, to_yaml, weight_sync_path
from grpo_ray.data import PromptSampler, drop_long_prompts, load_prompts
from grpo_ray.metrics import MetricsLogger
from grpo_ray.models import check_model, load_tokenizer, resolve_model_path
from grpo_ray.parallel import group_ranges
from grpo_ray.plots import write_reward_plot
from grpo_ray.remote import connect, get, wait
from grpo_ray.weights import WeightSync, check_ipc_allocator, make_weight_sync


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped the run after a checkpoint; `resume=auto` continues it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


# --- actors ------------------------------------------------------------------------------


def actor_options(cfg: DictConfig, sync: WeightSync, restartable: bool, timeout_s: float) -> tuple[list[dict], list[dict], Any]:
    """Ray options of each rollout engine and each learner worker, and the placement group that holds them (or None).

    Engines and learners that share GPUs go in pairs, one bundle of one GPU each (fractional GPUs:
    the same device): cluster=single_gpu is one pair; cluster=split with rollout_gpus + learner_gpus
    <= 1 and as many engines as learners puts an engine beside each data-parallel learner, on
    whichever node holds that bundle. Actors that cannot restart alone (`Actors.restartable`) get no
    Ray restarts.
    """
    import ray

    cluster = cfg.cluster
    restarts = cfg.trainer.max_recoveries if restartable else 0
    rollout = dict(num_cpus=cluster.rollout_cpus, num_gpus=cluster.rollout_gpus, max_restarts=restarts)
    learner = dict(num_cpus=cluster.learner_cpus, num_gpus=cluster.learner_gpus, max_restarts=restarts)
    if sync.shares_base:  # expandable segments would make the weights impossible to export
        env = {"env_vars": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}}
        rollout["runtime_env"] = learner["runtime_env"] = env
    pairs = cluster.placement == "colocate" or (
        cluster.placement == "split" and cluster.rollout_engines == cluster.learner_workers
        and min(cluster.rollout_gpus, cluster.learner_gpus) > 0 and cluster.rollout_gpus + cluster.learner_gpus <= 1
    )  # fmt: skip
    if not pairs:
        return [rollout] * cluster.rollout_engines, [learner] * cluster.learner_workers, None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    cpus, count = cluster.rollout_cpus + cluster.learner_cpus, cluster.rollout_engines
    group = placement_group([{"GPU": 1, "CPU": cpus}] * count)
    ready, _ = ray.wait([group.ready()], timeout=timeout_s)
    if not ready:
        ray.util.remove_placement_group(group)
        raise ConfigError(
            f"cluster={cluster.name} puts each engine beside a learner: {count} GPU(s), each with {cpus:g} CPUs on its "
            f"node, but the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs "
            f"(waited cluster.call_timeout_s={timeout_s:g}s)"
        )
    strategies = [PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k) for k in range(count)]
    return [{**rollout, "scheduling_strategy": s} for s in strategies], [{**learner, "scheduling_strategy": s} for s in strategies], group


@dataclass
class Actors:
    rollouts: list[Any]  # cluster.rollout_engines engines; a step's prompts are split over them
    rewards: Any  # RewardPool
    learners: list[Any]  # cluster.learner_workers data-parallel workers; rank 0 first
    timeout_s: float
    sync: WeightSync
    # whether one actor can be restarted alone: not when tied to the engine or to other learners
    restartable: bool
    placement_group: Any = None
    info: dict[str, dict] = field(default_factory=dict)  # name -> ready(): pid, node, version

    @property
    def learner(self) -> Any:
        """Rank 0: the learner that exports weights and writes checkpoints (all hold the same)."""
        return self.learners[0]

    @property
    def rollout(self) -> Any:
        """The first engine: the one a colocated learner builds on (single_gpu has only one)."""
        return self.rollouts[0]

    @classmethod
    def create(cls, cfg: DictConfig, model_path: str) -> "Actors":
        """Start reward pool, rollout and learner; wait until each has loaded (errors surface here).

        The learner starts after the engine when it is built on the engine's weights (CUDA IPC);
        otherwise both load at once.
        """
        import ray

        from grpo_ray.actors.learner import LearnerActor
        from grpo_ray.actors.reward import RewardPool
        from grpo_ray.actors.rollout import RolloutActor

        device = "cuda" if cfg.cluster.placement != "cpu" else "cpu"
        sync, timeout = make_weight_sync(cfg), cfg.cluster.call_timeout_s
        if sync.shares_base:
            check_ipc_allocator()
        # first: a bad reward-function path fails before any model loads
        rewards = RewardPool(cfg.reward, cfg.task, cfg.loss.scale_rewards, max_restarts=cfg.trainer.max_recoveries)
        restartable = sync.restartable and cfg.cluster.learner_workers == 1
        rollout_options, learner_options, group = actor_options(cfg, sync, restartable, timeout)
        rollouts = [ray.remote(RolloutActor).options(**options).remote(cfg, model_path, device) for options in rollout_options]
        actors = cls(rollouts=rollouts, rewards=rewards, learners=[], timeout_s=timeout, sync=sync,
                     restartable=restartable, placement_group=group)  # fmt: skip
        try:
            shared = None
            if sync.shares_base:
                actors.refresh_info(["rollout"])
                shared = actors.rollout.share_weights.remote()
            workers = cfg.cluster.learner_workers
            actors.learners = [ray.remote(LearnerActor).options(**options).remote(cfg, model_path, device, shared, rank, workers)
                               for rank, options in enumerate(learner_options)]  # fmt: skip
            actors.refresh_info()
            if workers > 1:
                host, port = get(actors.learner.rendezvous_address.remote(), "LearnerActor.rendezvous_address", timeout)
                get([w.join_learner_group.remote(host, port) for w in actors.learners], "LearnerActor.join_learner_group",
                    timeout)  # fmt: skip
            sync.connect(actors.rollouts, actors.learner, timeout)
        except BaseException:
            actors.shutdown()
            raise
        return actors

    def refresh_info(self, names: tuple[str, ...] | list[str] = ("rollout", "learner")) -> dict[str, dict]:
        """Ask rollout and learner where they run and which version they hold (waits out restarts)."""
        import ray

        deadline = time.monotonic() + self.timeout_s
        for name in names:
            handles = self.rollouts if name == "rollout" else self.learners
            what = f"{name.capitalize()}Actor.__init__ (loading the model)"
            while True:
                try:
                    infos = get([h.ready.remote() for h in handles], what, max(deadline - time.monotonic(), 0.001))
                    self.info[name] = infos[0]
                    break
                except ray.exceptions.ActorUnavailableError:  # Ray is restarting it: ask again
                    time.sleep(0.5)
        return self.info

    def train_step(self, scored: Any) -> Any:
        """Every learner worker trains on its share of the scored rollout; rank 0's StepMetrics
        (its metrics are the whole batch's)."""
        refs = [w.train_step.remote(scored) for w in self.learners]
        return get(refs, "LearnerActor.train_step", self.timeout_s, self.info.get("learner"))[0]

    def load_state(self, files: dict[str, bytes]) -> int:
        """Every learner worker restores the checkpoint's state; returns the restored weight version."""
        refs = [w.load_state_files.remote(files) for w in self.learners]
        return get(refs, "LearnerActor.load_state_files", self.timeout_s)[0]

    def generate(self, rows: list[dict], version: int, seed: int) -> list[Any]:
        """Refs of the step's rollout, one share per engine: contiguous ranges of `rows`, each engine
        sampling with a seed of its own (the first keeps `seed`: one engine samples as before)."""
        ranges = group_ranges(len(rows), len(self.rollouts))
        return [engine.generate.remote(rows[start:stop], version, seed if k == 0 else (seed * 1_000_003 + k) % 2**62)
                for k, (engine, (start, stop)) in enumerate(zip(self.rollouts, ranges))]  # fmt: skip

    def sync_weights(self, version: int) -> int:
        """Learner's adapter (at `version`) -> every engine, by the sync path; returns their new version."""
        return self.sync.push(self.rollouts, self.learner, version, self.timeout_s, self.info.get("rollout"))

    def shutdown(self) -> None:
        """Stop the actors: the learner first, so that its views of the engine's memory go before the engine."""
        import ray

        self.rewards.shutdown()
        for learner in self.learners:
            ray.kill(learner)
        try:  # a vLLM engine runs its own process: stop it, then the actor
            ray.get([engine.close.remote() for engine in self.rollouts], timeout=60)
        except Exception:  # a dead or hung rollout is killed all the same
            pass
        for engine in self.rollouts:
            ray.kill(engine)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)


# --- rollout schedules: chosen once, at setup --------------------------------------------


class OnPolicy:
    """async_steps=0: each step's rollout is generated by the weights the learner holds.

    A step's prompts and sampling seed are drawn once and kept until the step is done, so a
    step retried after an actor fault samples exactly what it would have.
    """

    def __init__(self, actors: Actors, sampler: PromptSampler, prompts_per_step: int, seed: int) -> None:
        self.actors, self.sampler, self.prompts_per_step, self.seed = actors, sampler, prompts_per_step, seed
        self.calls = 0
        self.current: tuple[list[dict], int] | None = None

    def _draw(self) -> tuple[list[dict], int]:
        self.calls += 1
        return self.sampler.next_batch(self.prompts_per_step), self.seed * 100_003 + self.calls

    def _launch(self, batch: tuple[list[dict], int], version: int) -> list[Any]:
        rows, seed = batch
        return self.actors.generate(rows, version, seed)

    def next_rollout(self, version: int) -> list[Any]:
        self.current = self.current or self._draw()
        return self._launch(self.current, version)

    def step_done(self) -> None:
        self.current = None

    def after_fault(self) -> None:
        """Drop in-flight generations; the current step is generated again from its kept prompts."""

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.calls, self.current = state["calls"], None


class OneStepAhead(OnPolicy):
    """async_steps=1: the rollout of step k+1 is generated while the learner trains step k."""

    pending: tuple[tuple[list[dict], int], list[Any]] | None = None  # (prompts and seed, refs)

    def next_rollout(self, version: int) -> list[Any]:
        if self.pending is not None:
            self.current, refs = self.pending
        else:
            self.current = self.current or self._draw()
            refs = self._launch(self.current, version)
        upcoming = self._draw()  # queued on the rollout engines before the next weight update
        self.pending = (upcoming, self._launch(upcoming, version))
        return refs

    def after_fault(self) -> None:
        self.pending = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pending = None


# --- the run -----------------------------------------------------------------------------


def make_run_dir(cfg: DictConfig) -> tuple[Path, Path | None]:
    """(run directory, checkpoint to resume from or None); writes the resolved config."""
    run_dir, checkpoint = None, None
    if cfg.resume:
        run_dir, checkpoint = find_resume_point(Path(cfg.logging.output_dir), cfg.logging.run_name, cfg.resume)
    if run_dir is None:
        name = cfg.logging.run_name or datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.logging.output_dir).absolute() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir, checkpoint


def load_task_prompts(cfg: DictConfig, model_path: str) -> Any:
    """The task's prompts; with rollout.long_prompts=drop, without those over max_prompt_length."""
    dataset = load_prompts(cfg.task, cfg.trainer.seed)
    if cfg.rollout.long_prompts == "drop" and cfg.rollout.max_prompt_length:
        tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
        dataset, dropped = drop_long_prompts(dataset, tokenizer, cfg.rollout.max_prompt_length)
        print(f"grpo-ray: dropped {dropped} prompts longer than rollout.max_prompt_length="
              f"{cfg.rollout.max_prompt_length} tokens; {len(dataset)} left", flush=True)  # fmt: skip
    return dataset


def make_logger(cfg: DictConfig, run_dir: Path, start_step: int) -> MetricsLogger:
    """metrics.jsonl, console rows, and TensorBoard / W&B / sample completions as logging.* says."""
    log = cfg.logging
    return MetricsLogger(
        run_dir, cfg.trainer.max_steps, log.logging_steps, tensorboard=log.tensorboard, wandb=log.wandb,
        wandb_project=log.wandb_project, config=OmegaConf.to_container(cfg, resolve=True),
        sample_steps=log.sample_steps, start_step=start_step,
    )  # fmt: skip


def save_adapter(actors: Actors, path: Path) -> None:
    """Write the learner's adapter in PEFT format (the learner may run on another node)."""
    path.mkdir(parents=True, exist_ok=True)
    files = get(actors.learner.adapter_files.remote(), "LearnerActor.adapter_files", actors.timeout_s)
    for name, data in files.items():
        (path / name).write_bytes(data)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines after `step` (a resumed run writes them again)."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


@contextmanager
def phase(name: str, timings: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[f"time/{name}"] = time.perf_counter() - start


@contextmanager
def stop_signals() -> Iterator[list[int]]:
    """Turn the first SIGTERM/SIGINT into a request to checkpoint and stop after the step; a second one stops now."""
    requested: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        print(f"grpo-ray: {signal.Signals(signum).name}: finishing the step, then checkpointing", flush=True)

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Run:
    """The state of a run the driver keeps: step, weight version, data position, recoveries."""

    def __init__(self, cfg: DictConfig, actors: Actors, schedule: OnPolicy, run_dir: Path) -> None:
        self.cfg, self.actors, self.schedule, self.run_dir = cfg, actors, schedule, run_dir
        self.step, self.version = 0, 0
        self.initial_state = schedule.state_dict()
        self.faults_in_a_row = 0
        self.recoveries = {"rollout": 0, "learner": 0, "reward": 0}

    # 1. one GRPO step
    def train_step(self) -> tuple[dict[str, float], list[dict]]:
        """Generate, score, train, sync; returns the step's metrics and a few sample completions."""
        actors, timeout = self.actors, self.cfg.cluster.call_timeout_s
        num_prompts = self.schedule.prompts_per_step
        timings: dict[str, float] = {}
        with phase("step", timings):
            with phase("rollout", timings):
                rollout = wait(self.schedule.next_rollout(self.version), "RolloutActor.generate", timeout,
                               actors.info.get("rollout"))  # fmt: skip
            with phase("reward", timings):
                scored = wait(actors.rewards.score(rollout, num_prompts), "RewardPool.score", timeout)
            with phase("train", timings):
                result = actors.train_step(scored)
            with phase("sync", timings):
                self.version = self.sync_weights(result.version)
        self.schedule.step_done()
        self.step += 1
        self.faults_in_a_row = 0
        self.recoveries["reward"] += int(result.metrics.get("recovery/reward_restarts", 0))
        # tokens/s: prompt + completion tokens of the step over its wall time, end to end
        timings["perf/tokens_per_s"] = result.metrics["tokens/total"] / timings["time/step"]
        recovery = {f"recovery/{name}_restarts": float(n) for name, n in self.recoveries.items()}
        return {**result.metrics, **timings, **recovery}, result.samples

    # 2. checkpoints
    def save(self) -> Path:
        files = get(self.actors.learner.state_files.remote(), "LearnerActor.state_files", self.cfg.cluster.call_timeout_s)
        state = {"step": self.step, "version": self.version, "schedule": self.schedule.state_dict(),
                 "recoveries": self.recoveries}  # fmt: skip
        return save_checkpoint(self.run_dir, self.step, files, state, self.cfg.trainer.save_total_limit)

    def restore(self, checkpoint: Path | None) -> None:
        """Continue from `checkpoint` (None: from the start); the rollout gets the restored adapter."""
        version = 0
        if checkpoint is None:
            self.step, state = 0, {"schedule": self.initial_state, "recoveries": self.recoveries}
        else:
            files, state = load_checkpoint(checkpoint)
            version = self.actors.load_state(files)
            self.step = state["step"]
        self.schedule.load_state_dict(state["schedule"])
        self.recoveries = dict(state["recoveries"])
        self.version = self.sync_weights(version)
        truncate_metrics(self.run_dir, self.step)

    # 3. actor faults
    def _count_fault(self, error: Exception) -> None:
        if not self.actors.restartable:
            raise RuntimeError(
                f"an actor failed at step {self.step + 1}; with cluster.weight_sync={weight_sync_path(self.cfg)} and "
                f"cluster.learner_workers={len(self.actors.learners)} the learner is tied to the engine (shared memory "
                "or a NCCL group) or to other learners, so one cannot restart alone: "
                "continue from the last checkpoint with resume=auto (trainer.save_steps sets how often they are written)"
            ) from error
        self.faults_in_a_row += 1
        if self.faults_in_a_row > self.cfg.trainer.max_recoveries:
            raise RuntimeError(
                f"the run stopped after {self.faults_in_a_row - 1} recoveries in a row at step {self.step + 1} "
                f"(trainer.max_recoveries={self.cfg.trainer.max_recoveries}); last fault: {error}"
            ) from error
        print(f"grpo-ray: actor fault at step {self.step + 1}, recovering: {str(error).splitlines()[0]}", flush=True)

    def sync_weights(self, version: int) -> int:
        """Move the adapter (at `version`) to the rollout; a rollout that dies meanwhile is restarted and synced."""
        import ray

        while True:
            try:
                return self.actors.sync_weights(version)
            except ray.exceptions.RayActorError as error:
                self._count_fault(error)
                self.actors.refresh_info()
                self.recoveries["rollout"] += 1

    def recover(self, error: Exception) -> None:
        """After an actor died before the learner's update: restore a restarted learner from the
        last checkpoint, or sync a restarted rollout; the step is then retried.
        Stops after trainer.max_recoveries faults in a row."""
        self._count_fault(error)
        self.schedule.after_fault()
        before = {name: info["pid"] for name, info in self.actors.info.items()}
        info = self.actors.refresh_info()  # waits until Ray has restarted the dead actor
        if info["learner"]["pid"] != before["learner"]:
            self.recoveries["learner"] += 1
            checkpoints = list_checkpoints(self.run_dir)
            recoveries = dict(self.recoveries)
            self.restore(checkpoints[-1] if checkpoints else None)
            self.recoveries = recoveries
        elif info["rollout"]["pid"] != before["rollout"]:
            self.recoveries["rollout"] += 1
            self.version = self.sync_weights(self.version)


def train(cfg: DictConfig) -> Path:
    """Run GRPO as configured; returns the run directory (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    import ray

    run_dir, checkpoint = make_run_dir(cfg)
    print(f"grpo-ray: run directory {run_dir}" + (f", resuming from {checkpoint.name}" if checkpoint else ""), flush=True)
    prompts_per_step = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps
    prompts_per_step //= cfg.rollout.num_generations
    model_path = resolve_model_path(cfg.model.name_or_path)
    check_model(model_path, cfg.model, cfg.rollout)
    sampler = PromptSampler(load_task_prompts(cfg, model_path), seed=cfg.trainer.seed)
    cluster = cfg.cluster
    gpus = cluster.rollout_gpus * cluster.rollout_engines + cluster.learner_gpus * cluster.learner_workers
    connect(cluster.address, cluster.rollout_cpus * cluster.rollout_engines + cluster.learner_cpus * cluster.learner_workers
            + cfg.reward.num_workers, 1.0 if cluster.placement == "colocate" else gpus)  # fmt: skip
    actors = Actors.create(cfg, model_path)
    schedule = (OneStepAhead if cfg.trainer.async_steps else OnPolicy)(actors, sampler, prompts_per_step, cfg.trainer.seed)
    run = Run(cfg, actors, schedule, run_dir)
    logger = None
    try:
        run.restore(checkpoint)
        logger = make_logger(cfg, run_dir, start_step=run.step)
        with stop_signals() as stop:
            while run.step < cfg.trainer.max_steps and not stop:
                try:
                    metrics, samples = run.train_step()
                except ray.exceptions.RayActorError as error:
                    run.recover(error)
                    continue
                logger.log(run.step, metrics)
                logger.log_samples(run.step, samples)
                if cfg.trainer.save_steps and run.step % cfg.trainer.save_steps == 0:
                    run.save()
            if stop:
                path = run.save()
                raise Interrupted(stop[0], f"stopped by {signal.Signals(stop[0]).name} at step {run.step}; "
                                           f"checkpoint {path}; continue with resume=auto")  # fmt: skip
        save_adapter(actors, run_dir / "final")
    finally:
        if logger is not None:
            logger.close()
        actors.shutdown()
    plot = write_reward_plot(run_dir) if cfg.logging.plot else None  # a plotting problem only warns
    print(f"grpo-ray: done; adapter in {run_dir / 'final'}" + (f", reward curves in {plot}" if plot else ""), flush=True)
    return run_dir
