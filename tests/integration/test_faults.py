"""Fault injection on CPU: killed actors, SIGTERM and resume, hung rewards, NaN losses."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from grpo_ray.config import load_config
from grpo_ray.metrics import read_metrics
from grpo_ray.trainer import train
from tests.integration.test_trainer import tiny_overrides

THIS_MODULE = "tests.integration.test_faults"
REPO_ROOT = Path(__file__).resolve().parents[2]


def slow_reward(completions, **kwargs):
    """Takes a while, so that a kill lands while the reward actor is scoring."""
    time.sleep(1.5)
    return [float(len(c[-1]["content"] if isinstance(c, list) else c) % 3) for c in completions]


def hanging_reward(completions, **kwargs):
    time.sleep(3600)


def kill_when(title: str, min_step: int, run_dir: Path, done: list) -> None:
    """SIGKILL the first process of this test's Ray (descendants of the test process) whose
    title contains `title`, once `min_step` steps are logged."""
    deadline = time.monotonic() + 300
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and not done:
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        if logged >= min_step:
            for proc in psutil.Process().children(recursive=True):
                try:
                    if title in " ".join(proc.cmdline()):
                        proc.kill()
                        done.append(proc.pid)
                        return
                except psutil.NoSuchProcess:
                    continue
        time.sleep(0.05)


def run_with_kill(cfg, title: str, min_step: int) -> tuple[Path, list]:
    run_dir = Path(cfg.logging.output_dir) / cfg.logging.run_name
    killed: list = []
    killer = threading.Thread(target=kill_when, args=(title, min_step, run_dir, killed), daemon=True)
    killer.start()
    train(cfg)
    killer.join(timeout=1)
    return run_dir, killed


def steps_of(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir)]


def test_killed_reward_actor_is_restarted_and_its_groups_rescored(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, f"task.reward_funcs=[{THIS_MODULE}:slow_reward]"))
    run_dir, killed = run_with_kill(cfg, "RewardActor.score", min_step=1)
    assert killed, "the reward actor was never caught scoring"
    records = read_metrics(run_dir)
    assert steps_of(run_dir) == [1, 2, 3]
    assert records[-1]["recovery/reward_restarts"] == 1
    assert all(r["rewards/slow_reward/errors"] == 0 for r in records)  # re-scored, not dropped


def test_killed_rollout_actor_is_restarted_resynced_and_the_step_retried(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "rollout.max_completion_length=48", "trainer.max_steps=4"))
    run_dir, killed = run_with_kill(cfg, "RolloutActor.generate", min_step=2)
    assert killed, "the rollout actor was never caught generating"
    records = read_metrics(run_dir)
    assert steps_of(run_dir) == [1, 2, 3, 4]
    assert records[-1]["recovery/rollout_restarts"] == 1
    assert records[-1]["recovery/learner_restarts"] == 0


def test_killed_learner_resumes_from_last_checkpoint(ray_local, tiny_model_dir, tmp_path):
    # six optimizer passes per step: a train_step long enough for the killer's 50 ms polls to catch it
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "trainer.max_steps=4", "trainer.save_steps=1",
                                     "rollout.max_completion_length=48", "trainer.num_iterations=6"))  # fmt: skip
    run_dir, killed = run_with_kill(cfg, "LearnerActor.train_step", min_step=2)
    assert killed, "the learner was never caught training"
    records = read_metrics(run_dir)
    assert steps_of(run_dir) == [1, 2, 3, 4]  # the lost step is trained again, logged once
    assert records[-1]["recovery/learner_restarts"] == 1
    assert (run_dir / "checkpoints" / "step_4" / "learner_state.pt").exists()


def test_hanging_reward_function_times_out_and_the_run_goes_on(ray_local, tiny_model_dir, tmp_path):
    funcs = f"[{THIS_MODULE}:hanging_reward,tests.integration.test_trainer:vowel_reward]"
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, f"task.reward_funcs={funcs}", "reward.timeout_s=1",
                                     "trainer.max_steps=2"))  # fmt: skip
    records = read_metrics(train(cfg))
    assert [r["rewards/hanging_reward/errors"] for r in records] == [1, 1]
    assert all(r["rewards/hanging_reward/mean"] is None for r in records)
    assert all(r["rewards/vowel_reward/mean"] is not None for r in records)


def comparable(record: dict) -> dict:
    """The metrics a resumed run must reproduce: everything but timings and throughput."""
    return {k: v for k, v in record.items() if not k.startswith(("time/", "perf/", "recovery/"))}


def test_sigterm_checkpoints_and_resume_matches_an_uninterrupted_run(ray_local, tiny_model_dir, tmp_path):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, "trainer.max_steps=5", "rollout.max_completion_length=24")
    reference = read_metrics(train(load_config([*overrides, "logging.run_name=reference"])))

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    cmd = [sys.executable, "-m", "grpo_ray", *overrides, "logging.run_name=interrupted"]
    run_dir = tmp_path / "interrupted"
    driver = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or len((run_dir / "metrics.jsonl").read_text().splitlines()) < 2:
        assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()
        time.sleep(0.1)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=300)
    assert driver.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert "continue with resume=auto" in out
    stopped_at = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert 2 <= stopped_at < 5 and (run_dir / "checkpoints" / f"step_{stopped_at}").is_dir()

    resumed = subprocess.run([*cmd, "resume=auto"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from step_{stopped_at}" in resumed.stdout
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for got, want in zip(records, reference):
        assert comparable(got).keys() == comparable(want).keys()
        for key, value in comparable(want).items():
            if value is None:
                assert got[key] is None, key
            else:
                assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), (got["step"], key, got[key], value)


def test_recurring_fault_stops_the_run_with_the_cause(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "trainer.max_recoveries=0", "trainer.max_steps=4",
                                     "rollout.max_completion_length=48"))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"stopped after 0 recoveries in a row at step 3 .*max_recoveries=0"):
        run_with_kill(cfg, "RolloutActor.generate", min_step=2)


def test_missed_deadline_names_the_call_and_dumps_the_actor_stack(ray_local):
    import ray

    from grpo_ray.remote import CallTimeout, wait

    class Sleeper:  # defined here so that Ray ships it by value to the worker
        def ready(self) -> dict:
            from grpo_ray.types import process_info

            return process_info(0)

        def hang(self) -> None:
            time.sleep(600)

    actor = ray.remote(num_cpus=0)(Sleeper).remote()
    info = ray.get(actor.ready.remote())
    try:
        with pytest.raises(CallTimeout) as caught:
            wait(actor.hang.remote(), "Sleeper.hang", 3.0, info)
    finally:
        ray.kill(actor)
    message = str(caught.value)
    assert message.startswith("Sleeper.hang did not finish within cluster.call_timeout_s=3s")
    assert f"pid {info['pid']}" in message
    assert "hang" in message.split("Stack of the actor", 1)[1]  # py-spy shows the frame it waits in
