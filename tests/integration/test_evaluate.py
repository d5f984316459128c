"""`grpo-ray eval` on a tiny random model: targets, config composition, decoding, report numbers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from grpo_ray.cli import main
from grpo_ray.config import ConfigError, load_config
from grpo_ray.evaluate import (
    EvalError, eval_config, evaluate, load_run_config, pass_at_k, report_name, resolve_target,
)
from tests.conftest import write_run

REWARDS_MODULE = '''
def even_length(completions, **kwargs):
    """1.0 for a completion of even length in characters, else 0.0."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 2 == 0) for t in texts]


def half_scored(completions, **kwargs):
    """0.5 for every other completion, None (not applicable) for the rest."""
    return [0.5 if i % 2 == 0 else None for i in range(len(completions))]
'''


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A finished run: config.yaml (arithmetic prompts, two test reward functions) and a final/ adapter."""
    root = tmp_path_factory.mktemp("eval")
    (root / "eval_test_rewards.py").write_text(REWARDS_MODULE)
    cfg = load_config([
        f"model.name_or_path={tiny_model_dir}", "model.lora.r=4", "model.lora.alpha=8",
        "task.num_examples=6", "rollout.max_completion_length=6",
        "task.reward_funcs=[eval_test_rewards:even_length,eval_test_rewards:half_scored]",
    ])  # fmt: skip
    return write_run(cfg, tiny_model_dir, root / "run", seed=2, std=0.5)


@pytest.fixture(autouse=True)
def rewards_on_path(run_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(run_dir.parent))


def greedy_reference(model_dir, adapter_dir, prompt_ids, max_new_tokens):
    """do_sample=False generation of base (+ adapter through peft), the completion tokens only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    ids = torch.tensor([prompt_ids])
    # min_new_tokens: EOS is masked until the end, so both sides produce exactly max_new_tokens
    out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                eos_token_id=model.config.eos_token_id, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("base", [False, True])
def test_greedy_eval_is_do_sample_false_with_the_adapter_loaded(tiny_model_dir, run_dir, base):
    from grpo_ray.actors.rollout import RolloutActor
    from grpo_ray.types import AdapterWeights

    target = resolve_target(run_dir, base=base)
    cfg = eval_config(target, ["rollout.max_completion_length=12", "+rollout.generation_kwargs.min_new_tokens=12"])
    actor = RolloutActor(cfg, str(tiny_model_dir))
    if target.adapter is not None:
        from peft.utils import load_peft_weights

        actor.update_weights(AdapterWeights(0, load_peft_weights(str(target.adapter))))
    rows = [{"prompt": [{"role": "user", "content": "What is 3+4?"}], "answer": "7"}]
    rollout = actor.generate(rows, version=0)
    assert rollout.num_completions == 1 and len(rollout.completion_ids[0]) == 12
    assert rollout.completion_ids[0] == greedy_reference(tiny_model_dir, target.adapter, rollout.prompt_ids[0], 12)


def test_eval_cli_writes_a_report_whose_numbers_follow_from_the_scores(run_dir, capsys):
    args = ["eval", str(run_dir), "eval.greedy=false", "eval.k=3", "eval.batch_size=4", "eval.num_logged_samples=100"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    report_path = run_dir / "eval" / "arithmetic-test-k3.json"
    assert f"report: {report_path}" in printed and "pass@3" in printed
    report = json.loads(report_path.read_text())
    assert report["adapter"] == str(run_dir / "final") and report["task"]["split"] == "test"
    assert report["task"]["num_prompts"] == 6 and report["num_completions"] == 18
    assert report["decoding"] == {"greedy": False, "k": 3, "temperature": 0.7, "max_completion_length": 6}
    # recompute from the logged samples (all 18 of them)
    samples = report["samples"]
    even = [s["rewards"]["even_length"] for s in samples]
    assert even == [float(len(s["completion"]) % 2 == 0) for s in samples]
    r = report["rewards"]["even_length"]
    assert r["mean"] == pytest.approx(sum(even) / 18) and r["pass@1"] == pytest.approx(sum(even) / 18)
    passes = [sum(even[i : i + 3]) for i in range(0, 18, 3)]
    assert r["pass@3"] == pytest.approx(sum(c > 0 for c in passes) / 6)
    half = report["rewards"]["half_scored"]
    # half_scored scores completions 0, 2 of each batch of 4 prompts × 3 = 12 and 0, 2, 4 of the last 6
    assert half["mean"] == 0.5 and half["scored"] == 9 and half["errors"] == 0
    assert half["pass@1"] == pytest.approx(9 / 18)
    totals = [s["rewards"]["even_length"] + (s["rewards"]["half_scored"] or 0.0) for s in samples]
    assert report["reward"]["mean"] == pytest.approx(sum(totals) / 18)
    assert 1 <= report["completions"]["mean_length"] <= 6


def test_base_eval_of_an_adapter_folder_uses_its_run_and_its_own_report_name(run_dir, tmp_path):
    target = resolve_target(run_dir / "final", base=True)
    assert target.run_dir == run_dir and target.adapter is None and target.report_dir == run_dir / "eval"
    cfg = eval_config(target, ["task.num_examples=2"])
    assert report_name(cfg, target) == "arithmetic-test-base.json"
    report = evaluate(cfg, target, tmp_path / "r.json")
    assert report["adapter"] is None and report["decoding"]["k"] == 1
    assert json.loads((tmp_path / "r.json").read_text())["task"]["num_prompts"] == 2


def test_bare_adapter_takes_its_base_model_and_lora_shape_from_adapter_config(tiny_model_dir, run_dir, tmp_path):
    adapter = shutil.copytree(run_dir / "final", tmp_path / "adapter")
    target = resolve_target(adapter)
    assert target.run_dir is None and target.report_dir == adapter / "eval"
    cfg = eval_config(target, [])
    assert cfg.model.name_or_path == str(tiny_model_dir)
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (4, 8)
    assert cfg.task.name == "arithmetic" and cfg.task.split == "test"  # the default config


def test_run_config_is_the_base_that_overrides_change(run_dir):
    cfg = load_run_config(run_dir, ["task.split=test", "loss=grpo", "rollout.max_completion_length=9"])
    assert cfg.loss.loss_type == "grpo" and cfg.rollout.max_completion_length == 9 and cfg.task.split == "test"
    assert cfg.task.num_examples == 6 and cfg.model.lora.r == 4  # kept from the run
    assert cfg.task.reward_funcs == ["eval_test_rewards:even_length", "eval_test_rewards:half_scored"]
    with pytest.raises(ConfigError, match="did you mean 'k'"):
        load_run_config(run_dir, ["eval.kk=2"])


def test_eval_cli_errors_name_the_problem(run_dir, tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["eval", str(tmp_path)]) == 2
    assert "has no final adapter" in capsys.readouterr().err


def test_pass_at_k_by_hand():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(EvalError):
        resolve_target("/nonexistent/path")


def test_code_rewards_stop_eval_up_front_without_a_sandbox(run_dir, monkeypatch):
    from grpo_ray.rewards import RewardLoadError
    from grpo_ray.sandbox import runner

    monkeypatch.setenv("GRPO_RAY_BWRAP", "/nonexistent/bwrap")
    monkeypatch.setattr(runner, "_availability_result", [])
    target = resolve_target(run_dir)
    cfg = eval_config(target, ["task.reward_funcs=[grpo_ray.rewards.code:pass_fraction_reward]"])
    with pytest.raises(RewardLoadError, match="code:pass_fraction_reward run completions in the code sandbox.*apt-get install"):
        evaluate(cfg, target)
