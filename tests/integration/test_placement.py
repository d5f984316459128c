"""Where Ray puts the actors: engines beside data-parallel learners, one pair a GPU (trainer.actor_options)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.integration.conftest import REPO_ROOT

# Its own Ray (the session's ray_local has no GPUs): 2 logical GPUs, one actor per option that reports its GPU.
SCRIPT = """
import json, sys, ray
from grpo_ray.config import load_config
from grpo_ray.trainer import actor_options
from grpo_ray.weights import make_weight_sync

ray.init(num_cpus=4, num_gpus=2, include_dashboard=False)

@ray.remote
class Where:
    def gpus(self):
        return ray.get_gpu_ids()

cfg = load_config(sys.argv[1:])
rollout, learner, group = actor_options(cfg, make_weight_sync(cfg), False, 60)
where = lambda options: ray.get([Where.options(**o).remote().gpus.remote() for o in options])
print(json.dumps({"rollout": where(rollout), "learner": where(learner), "group": group is not None}))
"""


def placed(*overrides: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, *overrides], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=240)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_engine_goes_beside_each_data_parallel_learner_one_pair_a_gpu():
    where = placed("rollout=vllm", "cluster=split", "cluster.weight_sync=object_store", "cluster.learner_workers=2",
                   "cluster.learner_gpus=0.6", "cluster.rollout_engines=2", "cluster.rollout_gpus=0.4",
                   "cluster.rollout_cpus=1", "cluster.learner_cpus=1")  # fmt: skip
    assert where["group"]
    assert where["rollout"] == where["learner"]  # engine k shares learner k's GPU
    assert sorted(ids[0] for ids in where["learner"]) == [0, 1]  # the learners (NCCL ranks) on different GPUs


def test_whole_gpus_need_no_placement_group():
    where = placed("rollout=vllm", "cluster=split", "cluster.rollout_cpus=1", "cluster.learner_cpus=1")
    assert not where["group"] and sorted(where["rollout"] + where["learner"]) == [[0], [1]]
