"""The benchmarks' nvidia-smi sampler, against a stand-in nvidia-smi on PATH: one GPU or all of
them, per process on that GPU, and the GPU a run's CUDA_VISIBLE_DEVICES leaves it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from bench_memory import SmiPeak  # noqa: E402
from bench_sync import visible_gpu  # noqa: E402

FAKE_SMI = """#!/bin/sh
case "$1" in
  --query-gpu=uuid,memory.used) printf 'GPU-aaa, 1024\\nGPU-bbb, 2048\\n';;
  --query-gpu=index,uuid) printf '0, GPU-aaa\\n1, GPU-bbb\\n';;
  --query-compute-apps=gpu_uuid,pid,used_memory) printf 'GPU-aaa, 111, 512\\nGPU-bbb, 222, 1536\\nGPU-bbb, 333, 256\\n';;
esac
"""


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{Path(sys.executable).parent}:/usr/bin:/bin")


def _sampled(uuid: str | None) -> SmiPeak:
    with SmiPeak(uuid, interval_s=0.01) as smi:
        time.sleep(0.05)
    return smi


@pytest.mark.parametrize(
    "visible, uuid, peak, processes",
    [("1", "GPU-bbb", 2.0, {"222": 1.5, "333": 0.25}), ("GPU-aaa", "GPU-aaa", 1.0, {"111": 0.5}),
     ("0,1", None, 3.0, {"111": 0.5, "222": 1.5, "333": 0.25}), ("", None, 3.0, {"111": 0.5, "222": 1.5, "333": 0.25})],
)  # fmt: skip
def test_a_run_is_sampled_on_the_gpus_it_can_see(fake_smi, monkeypatch, visible, uuid, peak, processes):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpu() == uuid
    smi = _sampled(uuid)
    assert smi.peak == peak and smi.per_process == processes


def test_no_nvidia_smi_means_no_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    smi = _sampled(None)
    assert smi.peak is None and smi.per_process == {}
