"""Ray plumbing for the driver: joining a cluster, and waits with deadlines that name the call.

On a missed deadline the error names the actor and the call, and carries the actor's Python
stack (py-spy, when the actor runs on this node), so a hang says where it hangs.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from grpo_ray.config import ConfigError


class CallTimeout(TimeoutError):
    """A remote call that missed its deadline; the message names the actor and the call."""


def connect(address: str | None, need_cpus: float, need_gpus: float = 0.0) -> None:
    """Join the cluster of `ray job submit` / `address`, else start a local one that fits the job.

    A cluster with fewer CPUs or GPUs than the actors need: on a local cluster (nothing will be
    added) a ConfigError now, rather than Ray waiting until cluster.call_timeout_s; on a joined
    one a warning, since an autoscaler may add the nodes once the actors ask for them.
    """
    import ray

    joined = ray.is_initialized() or bool(address or os.environ.get("RAY_ADDRESS"))
    if not ray.is_initialized():
        if joined:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need_cpus + 0.999)),
                     include_dashboard=False, logging_level=logging.WARNING)  # fmt: skip
    have = ray.cluster_resources()
    shortages = [
        (f"the job needs {need:g} {kind}s ({formula}) but the Ray cluster has {have.get(kind, 0):g}; {advice}")
        for kind, need, formula, advice in (
            ("CPU", need_cpus, "cluster.rollout_cpus × cluster.rollout_engines + cluster.learner_cpus × "
             "cluster.learner_workers + reward.num_workers", "lower reward.num_workers or add CPUs"),
            ("GPU", need_gpus, "cluster.rollout_gpus × cluster.rollout_engines + cluster.learner_gpus × "
             "cluster.learner_workers; cluster=single_gpu: 1",
             "lower cluster.rollout_engines or cluster.learner_workers, use cluster=single_gpu, or add GPUs"),
        )
        if have.get(kind, 0) < need
    ]  # fmt: skip
    for message in shortages:
        if not joined:
            raise ConfigError(message)
        print(f"grpo-ray: warning: {message}. Waiting up to cluster.call_timeout_s for the cluster to add them "
              "(an autoscaler)", file=sys.stderr, flush=True)  # fmt: skip


def stack_dump(info: dict[str, Any] | None) -> str:
    """The Python stack of the process `info` (an actor's ready()) describes, via py-spy."""
    if not info:
        return ""
    where = f"pid {info['pid']} on {info['node']}"
    if info["node"] != socket.gethostname():
        return f"\nThe actor runs on another node ({where}): run `py-spy dump --pid {info['pid']}` there."
    beside_python = Path(sys.executable).parent / "py-spy"  # a venv's bin need not be on PATH
    py_spy = shutil.which("py-spy") or (str(beside_python) if beside_python.exists() else None)
    if py_spy is None:
        return f"\nInstall py-spy to see where it hangs ({where}): pip install py-spy"
    try:
        out = subprocess.run([py_spy, "dump", "--pid", str(info["pid"])], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"\n(py-spy dump of {where} failed: {e})"
    return f"\nStack of the actor ({where}):\n{out.stdout or out.stderr}"


def wait(ref: Any, what: str, timeout_s: float, info: dict[str, Any] | None = None) -> Any:
    """Wait until `ref` (or every ref of a list) is ready without fetching it; CallTimeout naming
    `what` at the deadline. Returns what it was given."""
    import ray

    refs = ref if isinstance(ref, list) else [ref]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s, fetch_local=False)
    if len(ready) < len(refs):
        raise CallTimeout(f"{what} did not finish within cluster.call_timeout_s={timeout_s:g}s{stack_dump(info)}")
    return ref


def get(ref: Any, what: str, timeout_s: float, info: dict[str, Any] | None = None) -> Any:
    """Fetch a small result (metrics, versions) with a deadline that names the call."""
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        raise CallTimeout(f"{what} did not finish within cluster.call_timeout_s={timeout_s:g}s{stack_dump(info)}") from e
