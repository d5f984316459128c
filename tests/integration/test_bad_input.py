"""Bad input stops the run before any model work, with a message that says what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from grpo_ray.data import DataError, drop_long_prompts
from grpo_ray.errors import OutOfMemory, oom_advice
from grpo_ray.models import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_ray", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_model_that_does_not_load(tmp_path):
    proc = run_cli("model.name_or_path=/no/such/model", f"logging.output_dir={tmp_path}")
    assert proc.returncode == 2
    assert "could not load model.name_or_path='/no/such/model'" in proc.stderr
    assert "a local folder with config.json" in proc.stderr


def test_reward_function_that_does_not_import_fails_at_startup(tiny_model_dir, tmp_path):
    proc = run_cli(f"model.name_or_path={tiny_model_dir}", f"logging.output_dir={tmp_path}",
                   "task.reward_funcs=[grpo_ray.rewards.gsm8k:corectness_reward]")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Did you mean 'grpo_ray.rewards.gsm8k:correctness_reward'?" in proc.stderr


def test_long_prompts_are_dropped_and_counted(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = [{"prompt": [{"role": "user", "content": "x" * n}]} for n in (5, 80, 10)]
    kept, dropped = drop_long_prompts(datasets.Dataset.from_list(rows), tokenizer, max_prompt_length=40)
    assert dropped == 1 and [len(r["prompt"][0]["content"]) for r in kept] == [5, 10]
    with pytest.raises(DataError, match="every prompt is longer than rollout.max_prompt_length=3"):
        drop_long_prompts(datasets.Dataset.from_list(rows), tokenizer, max_prompt_length=3)


def test_cuda_oom_names_the_knobs():
    with pytest.raises(OutOfMemory, match=r"the learner ran out of GPU memory .*per_device_train_batch_size"):
        with oom_advice("learner"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    with pytest.raises(OutOfMemory, match=r"rollout.gpu_memory_utilization or rollout.kv_cache_gib .*rollout.max_num_seqs"):
        with oom_advice("rollout"):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_a_cluster_without_the_gpus_the_job_needs_stops_at_once(tiny_model_dir, tmp_path):
    """Ray would wait for GPUs that never come (until cluster.call_timeout_s): the run says what to change."""
    proc = run_cli(f"model.name_or_path={tiny_model_dir}", f"logging.output_dir={tmp_path}", "cluster=split",
                   "cluster.rollout_engines=8")  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the job needs 9 GPUs (cluster.rollout_gpus × cluster.rollout_engines" in proc.stderr
    assert "lower cluster.rollout_engines or cluster.learner_workers, use cluster=single_gpu" in proc.stderr


def test_a_joined_cluster_short_of_gpus_warns_for_an_autoscaler_to_add_them(ray_local, capsys):
    """A cluster the job joined (ray job submit, cluster.address) may grow when the actors ask for GPUs."""
    from grpo_ray.remote import connect

    connect(None, need_cpus=1, need_gpus=64)
    err = capsys.readouterr().err
    assert "grpo-ray: warning: the job needs 64 GPUs" in err and "for the cluster to add them (an autoscaler)" in err
