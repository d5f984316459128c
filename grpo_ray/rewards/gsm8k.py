"""GSM8K rewards: the five XML-format reward functions of the GRPO recipes.

The rules and scores follow willccbb's GRPO gist and the Unsloth notebooks
(correctness 2.0, integer 0.5, strict format 0.5, soft format 0.5, xmlcount up
to 0.5), with their known defects fixed:

- reasoning and answers may span several lines (the original regexes lacked
  re.DOTALL, so any multi-line reasoning scored 0 on format);
- answers compare as numbers where both sides parse (`1,000` == `1000`,
  `$18` == `18`, `18.0` == `18`, `18.50` == `18.5`, trailing period and
  surrounding whitespace ignored), else as normalised strings;
- a completion without `<answer>...</answer>` has no answer (the original
  scored the whole completion text as the answer);
- xmlcount subtracts its trailing-text penalty once, not twice.

Every function has TRL's signature, `fn(prompts, completions,
completion_ids=None, **columns) -> list[float | None]`: completions are plain
strings or chat message lists (the last message's content is scored), and the
reference answer arrives as the `answer` column, one per completion.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, Callable, Sequence

SYSTEM_PROMPT = """Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>"""

# A tag inside a section's content would let a lazy `.*?` swallow a second
# reasoning/answer block, so strict format forbids tags inside sections.
_NO_TAG = r"(?:(?!</?(?:reasoning|answer)>).)*"
_STRICT_FORMAT = re.compile(
    rf"<reasoning>\n{_NO_TAG}\n</reasoning>\n<answer>\n{_NO_TAG}\n</answer>\s*",
    re.DOTALL,
)
_SOFT_FORMAT = re.compile(r"\s*<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
_XML_TAGS = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
# Optional sign and `$`, digits with or without well-formed thousands commas,
# optional fraction: `-$1,234.50`, `18`, `.5`.
_NUMBER = re.compile(r"([-+]?)\$?([-+]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")
_GSM8K_SOLUTION_MARK = "####"


def completion_text(completion: str | Sequence[dict[str, Any]] | dict[str, Any]) -> str:
    """The text of one completion: the string itself, or the last chat message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return completion.get("content") or ""
    if not completion:
        return ""
    return completion[-1].get("content") or ""


def extract_answer(text: str) -> str | None:
    """The stripped text between the last `<answer>` and the `</answer>` after it; None without both."""
    start = text.rfind("<answer>")
    if start < 0:
        return None
    start += len("<answer>")
    end = text.find("</answer>", start)
    if end < 0:
        return None
    return text[start:end].strip()


def parse_number(text: str) -> Decimal | None:
    """`text` as an exact decimal (`$1,000.` -> 1000), or None when it is not a plain number."""
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    sign_before, sign_after, digits = match.groups()
    if sign_before and sign_after:
        return None
    return Decimal((sign_before or sign_after) + digits.replace(",", ""))


def reference_answer(answer: str) -> str:
    """The final answer of a reference: the text after `####` in a raw GSM8K solution, else all of it."""
    if _GSM8K_SOLUTION_MARK in answer:
        answer = answer.rsplit(_GSM8K_SOLUTION_MARK, 1)[1]
    return answer.strip()


def _normalise(text: str) -> str:
    text = " ".join(text.split()).casefold()
    return text[:-1] if text.endswith(".") else text


def answers_match(predicted: str, reference: str) -> bool:
    """True when both are equal numbers or, if either is not a number, equal normalised strings."""
    predicted_number, reference_number = parse_number(predicted), parse_number(reference)
    if predicted_number is not None and reference_number is not None:
        return predicted_number == reference_number
    return _normalise(predicted) == _normalise(reference)


def _answers(completions: Sequence[Any]) -> list[str | None]:
    return [extract_answer(completion_text(c)) for c in completions]


def correctness_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    answer: Sequence[str],
    **columns: Any,
) -> list[float | None]:
    """2.0 when the `<answer>` matches the `answer` column (numbers compare as numbers), else 0.0."""
    scores: list[float | None] = []
    for predicted, reference in zip(_answers(completions), answer, strict=True):
        correct = predicted is not None and answers_match(predicted, reference_answer(str(reference)))
        scores.append(2.0 if correct else 0.0)
    return scores


def int_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **columns: Any,
) -> list[float | None]:
    """0.5 when the `<answer>` has an integral value (`18`, `-3`, `1,000`, `$18`, `18.0`), else 0.0."""
    scores: list[float | None] = []
    for predicted in _answers(completions):
        number = parse_number(predicted) if predicted is not None else None
        scores.append(0.5 if number is not None and number == number.to_integral_value() else 0.0)
    return scores


def strict_format_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **columns: Any,
) -> list[float | None]:
    r"""0.5 when the text is exactly `<reasoning>\n…\n</reasoning>\n<answer>\n…\n</answer>`, else 0.0."""
    return [0.5 if _STRICT_FORMAT.fullmatch(completion_text(c)) else 0.0 for c in completions]


def soft_format_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **columns: Any,
) -> list[float | None]:
    """0.5 when the text starts `<reasoning>…</reasoning>`, then `<answer>…</answer>`, else 0.0."""
    return [0.5 if _SOFT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def count_xml(text: str) -> float:
    """0.125 per tag of `_XML_TAGS` present exactly once, minus 0.001 per character after `</answer>`.

    Whitespace around the trailing text is free; the score is not floored, so a
    long ramble after the answer goes negative, as in the original.
    """
    score = sum(0.125 for tag in _XML_TAGS if text.count(tag) == 1)
    end = text.rfind("</answer>")
    if end >= 0:
        score -= 0.001 * len(text[end + len("</answer>") :].strip())
    return score


def xmlcount_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **columns: Any,
) -> list[float | None]:
    """0.125 per well-placed tag present once (max 0.5), minus 0.001 per character after `</answer>`."""
    return [count_xml(completion_text(c)) for c in completions]


# The default reward set of the gsm8k task, in the order of the original recipe.
GSM8K_REWARDS: list[Callable[..., list[float | None]]] = [
    xmlcount_reward,
    soft_format_reward,
    strict_format_reward,
    int_reward,
    correctness_reward,
]
