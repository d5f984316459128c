"""HF rollout backend on a tiny random model: groups, logprobs, finish reasons, stop strings."""

import math

import pytest
import torch

from grpo_ray.actors.rollout import Generation, HFBackend, RolloutActor
from grpo_ray.config import load_config

ROWS = [{"prompt": [{"role": "user", "content": "What is 2+2?"}], "answer": "4", "level": 1},
        {"prompt": "plain text prompt", "answer": "5", "level": 2}]  # fmt: skip


def make(tiny_model_dir, *overrides):
    cfg = load_config([f"model.name_or_path={tiny_model_dir}", "rollout.num_generations=3",
                       "rollout.max_completion_length=10", "trainer.per_device_train_batch_size=6", *overrides])  # fmt: skip
    return cfg, RolloutActor(cfg, str(tiny_model_dir))


def test_generate_returns_groups_with_logprobs_and_columns(tiny_model_dir):
    cfg, actor = make(tiny_model_dir)
    rollout = actor.generate(ROWS, version=0)
    assert rollout.num_completions == 6 and rollout.num_generations == 3 and rollout.version == 0
    assert rollout.columns == {"answer": ["4", "5"], "level": [1, 2]}
    assert rollout.prompts == [ROWS[0]["prompt"], ROWS[1]["prompt"]]
    for ids, logps, reason in zip(rollout.completion_ids, rollout.sampling_logprobs, rollout.finish_reasons):
        assert len(ids) == len(logps) and 1 <= len(ids) <= 10
        assert all(lp <= 0 and math.isfinite(lp) for lp in logps)
        eos = actor.tokenizer.eos_token_id
        assert reason == ("stop" if ids[-1] == eos else "length") and eos not in ids[:-1]
    # the chat template was applied to message prompts, and the text is the decoded ids
    assert actor.tokenizer.decode(rollout.prompt_ids[0]).startswith("<|im_start|>user\nWhat is 2+2?")
    assert rollout.completions[0] == actor.tokenizer.decode(rollout.completion_ids[0], skip_special_tokens=True)


def test_generate_refuses_other_version(tiny_model_dir):
    _, actor = make(tiny_model_dir)
    with pytest.raises(RuntimeError, match="weight version 3, but the rollout holds 0"):
        actor.generate(ROWS, version=3)


def test_long_prompt_is_truncated_from_the_left_and_counted(tiny_model_dir):
    _, actor = make(tiny_model_dir, "rollout.max_prompt_length=8")
    rollout = actor.generate([{"prompt": "x" * 50 + "END", "answer": "1"}], version=0)
    assert len(rollout.prompt_ids[0]) == 8
    assert actor.tokenizer.decode(rollout.prompt_ids[0]).endswith("END")
    assert rollout.metrics["rollout/prompts_truncated"] == 1.0


def test_trim_cuts_at_eos_then_stop_string(tiny_model_dir):
    cfg, actor = make(tiny_model_dir, "rollout.stop=[STOP]")
    backend: HFBackend = actor.backend
    tok = actor.tokenizer
    ids = tok("abSTOPcd", add_special_tokens=False)["input_ids"]
    gen = backend._trim(ids, [-0.5] * len(ids))
    assert tok.decode(gen.token_ids) == "abSTOP" and gen.finish_reason == "stop" and len(gen.logprobs) == 6
    with_eos = tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id, tok.pad_token_id]
    assert backend._trim(with_eos, [-1.0] * 4) == Generation(with_eos[:3], [-1.0] * 3, "stop")
    plain = tok("abcd", add_special_tokens=False)["input_ids"]
    assert backend._trim(plain, [-1.0] * 4).finish_reason == "length"


def test_sampling_logprobs_match_a_forward_pass(tiny_model_dir):
    cfg, actor = make(tiny_model_dir, "rollout.temperature=0.7")
    rollout = actor.generate(ROWS[:1], version=0)
    model = actor.backend.model
    ids = rollout.prompt_ids[0] + rollout.completion_ids[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float() / 0.7
    p = len(rollout.prompt_ids[0])
    expected = torch.log_softmax(logits[p - 1 : len(ids) - 1], -1).gather(-1, torch.tensor(ids[p:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(rollout.sampling_logprobs[0]), expected, atol=1e-4, rtol=1e-4)
