"""Integration fixtures: one local Ray instance shared by the whole session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray with 4 logical CPUs, no dashboard; shut down at the end of the session.

    Workers get the repo root on PYTHONPATH, so a test can name functions in its own module by
    import path (`tests.integration.test_x:fn`) whatever directory pytest was started from.
    """
    import ray

    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        log_to_driver=True,
    )
    try:
        yield
    finally:
        ray.shutdown()
