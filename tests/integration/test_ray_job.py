"""`ray job submit --working-dir . -- python scripts/train.py ...` against a local Ray head."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MARKER = "GRPO_RAY_TEST_HEAD"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(env: dict[str, str], num_cpus: int) -> tuple[int, int]:
    """`ray start --head` on free ports with its own temp dir; (GCS port, dashboard port)."""
    temp_dir = Path("/tmp") / f"rayjob-{env[MARKER][:8]}"  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         f"--ray-client-server-port={free_port()}", *agent_ports()],
        check=True, env=env, capture_output=True, timeout=180,
    )  # fmt: skip
    return gcs, dashboard


def agent_ports() -> list[str]:
    """Every agent port of its own: another Ray on this machine (the suite's ray_local) holds the
    defaults, and a job agent that cannot bind its port leaves `ray job submit` with "No available agent"."""
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")  # fmt: skip
    return [f"--{flag}={free_port()}" for flag in flags]


@pytest.fixture
def ray_env() -> Iterator[dict[str, str]]:
    """The environment of a test's Ray processes; every process still carrying its marker is stopped after."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # Every process of this cluster inherits the marker, so exactly these can be stopped afterwards
    # (`ray stop` would stop every Ray instance on the machine).
    env[MARKER] = uuid.uuid4().hex
    try:
        yield env
    finally:
        stop_marked_processes(env[MARKER])


@pytest.fixture
def ray_head(ray_env):
    """A one-node cluster: `ray start --head` with 4 CPUs."""
    _, dashboard = start_head(ray_env, num_cpus=4)
    return ray_env, f"http://127.0.0.1:{dashboard}"


@pytest.fixture
def ray_two_nodes(ray_env):
    """A two-node cluster on this machine: a head with 1 CPU and a second raylet (its own object
    store) with 3 joining it, so a job of 4 CPUs must place actors on both."""
    gcs, dashboard = start_head(ray_env, num_cpus=1)
    subprocess.run(
        [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=3", "--disable-usage-stats", *agent_ports()],
        check=True, env=ray_env, capture_output=True, timeout=180,
    )  # fmt: skip
    return ray_env, f"http://127.0.0.1:{dashboard}"


def marked_processes(marker: str) -> set[psutil.Process]:
    """Processes carrying the marker and all their descendants (agents may rewrite their environ)."""
    found: set[psutil.Process] = set()
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == marker:
                found |= {proc, *proc.children(recursive=True)}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def stop_marked_processes(marker: str, rounds: int = 5) -> None:
    """Freeze every process of the head first (so a dying raylet cannot restart its agents),
    then kill them; repeat until none is left."""
    for _ in range(rounds):
        procs = marked_processes(marker)
        if not procs:
            return
        for action in (psutil.Process.suspend, psutil.Process.kill):
            for proc in procs:
                try:
                    action(proc)
                except psutil.NoSuchProcess:
                    pass
        psutil.wait_procs(list(procs), timeout=10)
    left = [f"{p.pid} {p.name()}" for p in marked_processes(marker)]
    assert not left, f"Ray processes left behind: {left}"


def submit_training(env: dict[str, str], address: str, model_dir: Path, out: Path, *extra: str) -> Path:
    """`ray job submit` a 2-step training run; waits until it succeeded, returns its run directory."""
    cmd = [
        str(BIN / "ray"), "job", "submit", f"--address={address}", "--working-dir", ".", "--",
        "python", "scripts/train.py", f"model.name_or_path={model_dir}", "rollout.num_generations=4",
        "rollout.max_completion_length=6", "trainer.per_device_train_batch_size=8", "trainer.max_steps=2",
        f"logging.output_dir={out}", "logging.run_name=job", *extra,
    ]  # fmt: skip
    deadline = time.monotonic() + 300  # the head's job agent may still be starting on a busy machine
    while True:
        result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in result.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = re.search(r"raysubmit_\w+", result.stdout + result.stderr).group(0)
    from ray.job_submission import JobStatus, JobSubmissionClient

    assert JobSubmissionClient(address).get_job_status(job_id) == JobStatus.SUCCEEDED
    return out / "job"


def test_ray_job_submit_runs_training(ray_head, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run_dir = submit_training(*ray_head, tiny_model_dir, tmp_path / "outputs")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
    assert "max_steps: 2" in (run_dir / "config.yaml").read_text()


def test_a_job_spans_two_nodes(ray_two_nodes, tiny_model_dir, tmp_path, monkeypatch):
    """Rollout, learner and two reward actors (4 CPUs) on a head of 1 CPU and a node of 3: the
    rollouts, scores and adapters cross two object stores, and the run trains."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run_dir = submit_training(*ray_two_nodes, tiny_model_dir, tmp_path / "outputs", "reward.num_workers=2")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["tokens/total"] > 0 for r in records)
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
