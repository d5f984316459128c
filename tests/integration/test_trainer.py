"""The whole loop through real Ray actors on a tiny random model: learning, sync, versions, failures."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from grpo_ray.actors.learner import LearnerActor
from grpo_ray.actors.rollout import RolloutActor
from grpo_ray.config import load_config
from grpo_ray.rewards.scoring import combine_scores, score_rollout
from grpo_ray.trainer import train
from grpo_ray.weights import StaleRolloutError

THIS_MODULE = "tests.integration.test_trainer"
ROWS = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1)} for i in range(2)]


def vowel_reward(completions, **kwargs):
    """Fraction of vowels: varies inside every group of random text."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts]


def broken_reward(completions, **kwargs):
    raise RuntimeError("this reward function is broken")


def tiny_overrides(model_dir, tmp_path, *extra: str) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        "rollout.num_generations=4",
        "rollout.max_completion_length=8",
        "trainer.per_device_train_batch_size=4",
        "trainer.gradient_accumulation_steps=2",
        "trainer.max_steps=3",
        "trainer.lr=5e-3",
        f"task.reward_funcs=[{THIS_MODULE}:vowel_reward,{THIS_MODULE}:broken_reward]",
        f"logging.output_dir={tmp_path}",
        "logging.run_name=run",
        *extra,
    ]


def test_full_loop_writes_metrics_and_peft_adapter(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path))
    run_dir = train(cfg)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        # per-reward metrics with TRL's names; the broken function is counted, the run goes on
        assert 0.0 <= r["rewards/vowel_reward/mean"] <= 1.0
        assert r["rewards/broken_reward/errors"] == 1
        assert r["rewards/broken_reward/mean"] is None  # NaN: no row scored
        for key in ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                    "completions/clipped_ratio", "loss", "grad_norm", "learning_rate", "entropy",
                    "clip_ratio/region_mean", "time/rollout", "time/reward", "time/train", "time/sync"):  # fmt: skip
            assert key in r, key
    assert records[-1]["learning_rate"] == pytest.approx(5e-3)
    assert (run_dir / "config.yaml").read_text().count("vowel_reward") == 1

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "final")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # trained: B moved away from its zero init


def test_two_data_parallel_learners_take_the_one_learner_step(ray_local, tiny_model_dir, tmp_path):
    # 2 prompts × 4 completions a step: each worker trains on one group, gradients summed over gloo.
    # The same rollouts (same weights, same seeds) must give the same metrics and the same adapter.
    runs = {}
    for workers in (1, 2):
        cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path / str(workers), "trainer.max_steps=2",
                                         f"cluster.learner_workers={workers}", "loss.beta=0.05"))  # fmt: skip
        run_dir = train(cfg)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        from safetensors.torch import load_file

        runs[workers] = records, load_file(str(run_dir / "final" / "adapter_model.safetensors"))
    (one, adapter_one), (two, adapter_two) = runs[1], runs[2]
    assert [r["step"] for r in two] == [1, 2]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "kl", "entropy", "reward", "tokens/total", "completions/mean_length",
                    "sampling/sampling_logp_difference/max", "clip_ratio/region_mean"):  # fmt: skip
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert adapter_one.keys() == adapter_two.keys()
    for name, tensor in adapter_one.items():
        torch.testing.assert_close(adapter_two[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert any(t.abs().sum() > 0 for n, t in adapter_two.items() if "lora_B" in n)  # it did train


def test_adapter_sync_changes_rollout_and_stale_rollout_is_refused(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "trainer.lr=0.5"))
    path = str(tiny_model_dir)
    Rollout_ = ray.remote(num_cpus=0)(RolloutActor)
    updated, frozen = Rollout_.remote(cfg, path), Rollout_.remote(cfg, path)
    learner = ray.remote(num_cpus=0)(LearnerActor).remote(cfg, path)
    weights = learner.export_weights.remote()
    ray.get([updated.update_weights.remote(weights), frozen.update_weights.remote(weights)])

    first = updated.generate.remote(ROWS, 0)
    funcs = [vowel_reward]
    scored = ray.get(first)
    scored = combine_scores(scored, [score_rollout(scored, funcs, None)], ["vowel"], None, "group")
    ray.get(learner.train_step.remote(scored))
    assert ray.get(updated.update_weights.remote(learner.export_weights.remote())) == 1

    # Same sampling seed (same number of generate calls) on both: only the adapter differs.
    ray.get(frozen.generate.remote(ROWS, 0))
    after, before = ray.get([updated.generate.remote(ROWS, 1), frozen.generate.remote(ROWS, 0)])
    assert after.version == 1 and before.version == 0
    assert after.completion_ids != before.completion_ids

    # The learner is at version 1 and strictly on-policy: a version-0 rollout is refused.
    stale = combine_scores(before, [score_rollout(before, funcs, None)], ["vowel"], None, "group")
    with pytest.raises(ray.exceptions.RayTaskError) as info:
        ray.get(learner.train_step.remote(stale))
    assert isinstance(info.value.cause, StaleRolloutError)
    assert "weight version 0" in str(info.value) and "version 1" in str(info.value)


def test_one_step_ahead_trains_on_lagged_rollouts(ray_local, tiny_model_dir, tmp_path):
    run_dir = train(load_config(tiny_overrides(tiny_model_dir, tmp_path, "trainer.async_steps=1")))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss"] is not None for r in records)


def test_first_step_sync_check_catches_engine_on_other_weights(tiny_model_dir, tmp_path):
    # The classic silent failure: the engine samples from the base model while the learner's
    # adapter is not zero. Give the learner's LoRA B large values; the rollout has none.
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path))
    rollout = RolloutActor(cfg, str(tiny_model_dir)).generate(ROWS, 0)
    scored = combine_scores(rollout, [score_rollout(rollout, [vowel_reward], None)], ["vowel"], None, "group")
    learner = LearnerActor(cfg, str(tiny_model_dir))
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    from grpo_ray.actors.learner import SyncCheckError

    with pytest.raises(SyncCheckError, match=r"mean \|learner logp - sampling logp\| = .* learner at weight version 0 "
                                             r"and the rollout made by version 0 exceeds") as info:
        learner.train_step(scored)
    assert "kv_cache_dtype" not in str(info.value)
    # an fp8 KV cache (vllm) is another way to be far off: the error names the setting
    learner.cfg.rollout.kv_cache_dtype = "fp8"
    with pytest.raises(SyncCheckError, match="rollout.kv_cache_dtype=fp8 attention .* set rollout.kv_cache_dtype=auto"):
        learner.train_step(scored)


@pytest.mark.parametrize("interval, caught", [(0, False), (2, True)])
def test_sync_check_repeats_every_interval_steps(tiny_model_dir, tmp_path, interval, caught):
    # Two good steps, then the engine falls behind (here: the learner's adapter jumps away from
    # what sampled the rollout). Only a check at step 3 (interval 2) sees it.
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, f"trainer.sync_check_interval={interval}",
                                     "trainer.lr=0"))  # fmt: skip
    rollout = RolloutActor(cfg, str(tiny_model_dir)).generate(ROWS, 0)
    scored = combine_scores(rollout, [score_rollout(rollout, [vowel_reward], None)], ["vowel"], None, "group")
    learner = LearnerActor(cfg, str(tiny_model_dir))
    for version in (0, 1):
        rollout.version = version
        learner.train_step(scored)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 2.0)
    rollout.version = 2
    from grpo_ray.actors.learner import SyncCheckError

    if caught:
        with pytest.raises(SyncCheckError, match="learner at weight version 2 and the rollout made by version 2"):
            learner.train_step(scored)
    else:
        assert learner.train_step(scored).version == 3


def test_kl_penalty_and_several_iterations_per_rollout(ray_local, tiny_model_dir, tmp_path):
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "loss.beta=0.1", "trainer.num_iterations=2",
                                     "trainer.max_steps=2", "loss=grpo"))  # fmt: skip
    records = [json.loads(line) for line in (train(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2
    # k3 KL against the adapter-disabled model: 0 before any update, positive once the adapter moved
    assert all(r["kl"] >= 0 for r in records) and records[-1]["kl"] > 0


def test_call_deadline_names_the_actor_and_call(ray_local, tiny_model_dir, tmp_path):
    from grpo_ray.remote import CallTimeout

    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "cluster.call_timeout_s=0.001"))
    with pytest.raises(CallTimeout, match=r"RolloutActor.__init__ \(loading the model\) did not finish within"):
        train(cfg)


def test_run_writes_tensorboard_samples_and_plot(ray_local, tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, "logging.sample_steps=2", "logging.num_samples=2"))
    run_dir = train(cfg)
    events = EventAccumulator(str(run_dir)).Reload()
    assert [e.step for e in events.Scalars("reward")] == [1, 2, 3]
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1, 2, 3} and len(samples) == 6  # step 1, every 2nd, the last
    assert set(samples[0]["rewards"]) == {"vowel_reward", "broken_reward"}
    assert (run_dir / "reward_curves.png").stat().st_size > 10_000


def test_two_rollout_engines_share_the_prompts_and_both_get_each_adapter(ray_local, tiny_model_dir, tmp_path):
    from grpo_ray.trainer import Actors

    two = ("cluster.rollout_engines=2", "cluster.rollout_cpus=1", "cluster.learner_cpus=0")  # fits Ray's 4 CPUs
    cfg = load_config(tiny_overrides(tiny_model_dir, tmp_path, *two, "trainer.lr=0.5"))
    rows = ROWS + [{"prompt": [{"role": "user", "content": "What is 7+1?"}], "answer": "8"}]
    actors = Actors.create(cfg, str(tiny_model_dir))
    try:
        assert actors.sync_weights(0) == 0
        shares = actors.generate(rows, 0, seed=11)
        parts = ray.get(shares)
        assert [len(p.prompts) for p in parts] == [2, 1]  # contiguous shares, in order
        assert [p.prompts for p in parts] == [[r["prompt"] for r in rows[:2]], [rows[2]["prompt"]]]
        scored = ray.get(actors.rewards.score(shares, len(rows)))
        assert scored.rollout.prompts == [r["prompt"] for r in rows] and scored.rollout.num_completions == 12
        assert scored.rollout.columns["answer"] == ["1", "2", "8"]
        assert actors.train_step(scored).version == 1
        assert actors.sync_weights(1) == 1  # both engines took the adapter: each generates at version 1 now
        assert [p.version for p in ray.get(actors.generate(rows, 1, seed=11))] == [1, 1]
    finally:
        actors.shutdown()
    run_dir = train(load_config(tiny_overrides(tiny_model_dir, tmp_path / "run2", *two, "trainer.max_steps=2")))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["tokens/total"] > 0 for r in records)
