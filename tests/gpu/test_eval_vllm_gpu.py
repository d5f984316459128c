"""`grpo-ray eval` through the vLLM backend (`rollout=vllm`): the adapter is served, every function scores;
and the checkpoint `grpo-ray export --merged` writes loads in vLLM as base + adapter.

A run directory whose config asks for vLLM and a final/ adapter with large random B: the greedy
report with the adapter and the `--base` report both hold every prompt's completion, scored
without errors, and their completions differ (the adapter reaches the engine through the eval path).
The merged bf16 checkpoint, served by vLLM with no adapter, samples what HF's base + adapter would
(teacher-forced logprobs), not what the base would.
"""

from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.gpu
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
pytest.importorskip("vllm")

from grpo_ray.config import load_config  # noqa: E402
from grpo_ray.evaluate import eval_config, evaluate, resolve_target  # noqa: E402
from grpo_ray.models import load_model  # noqa: E402
from tests.conftest import write_run  # noqa: E402

PROMPTS = 12


def adapter_run(model_dir, run):
    """A run folder asking for vLLM, with a final/ adapter whose random B visibly changes the model."""
    cfg = load_config([
        f"model.name_or_path={model_dir}", "model.dtype=auto", "rollout=vllm", "rollout.enforce_eager=true",
        "rollout.gpu_memory_utilization=0.1", "model.lora.r=8", "model.lora.alpha=16", f"task.num_examples={PROMPTS}",
        "rollout.max_completion_length=12", "task.reward_funcs=[grpo_ray.rewards.arithmetic:last_number_reward]",
    ])  # fmt: skip
    write_run(cfg, model_dir, run, seed=0, std=0.3, device="cuda")
    return cfg


def test_eval_with_the_vllm_backend_serves_the_adapter(vllm_model_dir, tmp_path):
    run = tmp_path / "run"
    adapter_run(vllm_model_dir, run)
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


def test_merged_export_loads_in_vllm_as_base_plus_adapter(vllm_model_dir, tmp_path):
    from peft import PeftModel

    from grpo_ray.actors.rollout import RolloutActor
    from grpo_ray.export import export_merged
    from tests.gpu.vllm_helpers import MATCH_TOL, ROWS, TEMPERATURE, teacher_forced_gap

    run = tmp_path / "run"
    cfg = adapter_run(vllm_model_dir, run)
    merged = export_merged(run, tmp_path / "merged")  # bf16, as published
    serve = load_config([f"model.name_or_path={merged}", "model.dtype=auto", "rollout=vllm", "rollout.enforce_eager=true",
                         "rollout.gpu_memory_utilization=0.1", f"rollout.temperature={TEMPERATURE}",
                         "rollout.num_generations=4", "rollout.max_completion_length=16"])  # fmt: skip
    actor = RolloutActor(serve, str(merged), device="cuda")
    try:
        rollout = actor.generate(ROWS, version=0, seed=0)
    finally:
        actor.backend.close()
    base = load_model(cfg.model, str(vllm_model_dir), "cuda")
    base_gap = teacher_forced_gap(base, rollout, actor.tokenizer.pad_token_id)
    adapted = PeftModel.from_pretrained(base, str(run / "final")).eval()
    gap = teacher_forced_gap(adapted, rollout, actor.tokenizer.pad_token_id)
    print(f"\nmerged checkpoint in vLLM: gap to HF base + adapter {gap:.4f}, to the base {base_gap:.4f}")
    assert gap < MATCH_TOL < base_gap
