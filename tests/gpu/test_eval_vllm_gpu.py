"""`grpo-ray eval` through the vLLM backend (`rollout=vllm`): the adapter is served, every function scores.

A run directory whose config asks for vLLM and a final/ adapter with large random B: the greedy
report with the adapter and the `--base` report both hold every prompt's completion, scored
without errors, and their completions differ (the adapter reaches the engine through the eval path).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
pytest.importorskip("vllm")

from grpo_ray.config import load_config, to_yaml  # noqa: E402
from grpo_ray.evaluate import eval_config, evaluate, resolve_target  # noqa: E402
from grpo_ray.models import add_lora, load_model  # noqa: E402

PROMPTS = 12


def test_eval_with_the_vllm_backend_serves_the_adapter(vllm_model_dir, tmp_path):
    cfg = load_config([
        f"model.name_or_path={vllm_model_dir}", "model.dtype=auto", "rollout=vllm", "rollout.enforce_eager=true",
        "rollout.gpu_memory_utilization=0.1", "model.lora.r=8", "model.lora.alpha=16", f"task.num_examples={PROMPTS}",
        "rollout.max_completion_length=12", "task.reward_funcs=[grpo_ray.rewards.arithmetic:last_number_reward]",
    ])  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    model = add_lora(load_model(cfg.model, str(vllm_model_dir), "cuda"), cfg.model.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.save_pretrained(run / "final")
    del model
    reports = {}
    for base in (False, True):
        target = resolve_target(run, base=base)
        reports[base] = evaluate(eval_config(target), target)
    for base, report in reports.items():
        scored = report["rewards"]["last_number_reward"]
        print(f"\nbase={base}: {report['completions']} mean length, {scored} ; sample {report['samples'][0]['completion']!r}")
        assert report["task"]["num_prompts"] == PROMPTS == report["num_completions"] and scored["errors"] == 0
    adapted = [s["completion"] for s in reports[False]["samples"]]
    plain = [s["completion"] for s in reports[True]["samples"]]
    assert adapted != plain  # the adapter reached the engine
