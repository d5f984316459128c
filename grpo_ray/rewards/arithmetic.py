"""Rewards for the synthetic arithmetic task ("What is a+b?", answer an exact integer)."""

from __future__ import annotations

import re
from typing import Any, Sequence

from grpo_ray.rewards.gsm8k import answers_match, completion_text

_INTEGER = re.compile(r"-?\d[\d,]*")


def last_number_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, *, answer: Sequence[str], **kwargs: Any
) -> list[float | None]:
    """1.0 when the last number in the reply is the answer (`7 + 4 = 11`), else 0.0."""
    scores = []
    for completion, reference in zip(completions, answer):
        numbers = _INTEGER.findall(completion_text(completion))
        scores.append(float(bool(numbers) and answers_match(numbers[-1].rstrip(","), reference)))
    return scores


def exact_answer_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Any = None, *, answer: Sequence[str], **kwargs: Any
) -> list[float | None]:
    """1.0 when the whole reply is the answer (`11`, ` 11.`), else 0.0."""
    return [float(answers_match(completion_text(c).strip(), a)) for c, a in zip(completions, answer)]
