"""grpo_ray/rewards/gsm8k.py: the five GSM8K rewards, hand-scored."""

from decimal import Decimal

import pytest

from grpo_ray.rewards import gsm8k
from grpo_ray.rewards.gsm8k import (
    GSM8K_REWARDS,
    SYSTEM_PROMPT,
    correctness_reward,
    extract_answer,
    int_reward,
    parse_number,
    soft_format_reward,
    strict_format_reward,
    xmlcount_reward,
)

WELL_FORMED = "<reasoning>\nJanet sells 16 - 3 - 4 = 9 eggs.\n</reasoning>\n<answer>\n18\n</answer>\n"
MULTI_LINE = (
    "<reasoning>\n"
    "Step 1: 16 - 3 - 4 = 9 eggs are left.\n"
    "Step 2: 9 * $2 = $18.\n"
    "</reasoning>\n"
    "<answer>\n18\n</answer>"
)
NO_NEWLINES = "<reasoning>9 eggs at $2</reasoning><answer>18</answer>"
NO_TAGS = "Janet makes 18 dollars."


def _answer_block(answer: str) -> str:
    return f"<reasoning>\nwork\n</reasoning>\n<answer>\n{answer}\n</answer>"


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _score(fn, completions, **columns):
    return fn(prompts=["q"] * len(completions), completions=completions, **columns)


# --- helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, number",
    [
        ("18", Decimal(18)),
        (" 18. ", Decimal(18)),
        ("1,000", Decimal(1000)),
        ("1,234,567", Decimal(1234567)),
        ("$18", Decimal(18)),
        ("-$5", Decimal(-5)),
        ("$-5", Decimal(-5)),
        ("18.50", Decimal("18.5")),
        (".5", Decimal("0.5")),
    ],
)
def test_parse_number_reads_plain_numbers(text, number):
    assert parse_number(text) == number


@pytest.mark.parametrize("text", ["", "eighteen", "18 eggs", "1,00", "1e3", "-$-5", "3/4", "$"])
def test_parse_number_rejects_non_numbers(text):
    assert parse_number(text) is None


def test_extract_answer_takes_the_last_closed_answer():
    assert extract_answer("<answer> 3 </answer> then <answer>\n18\n</answer>") == "18"
    assert extract_answer(NO_TAGS) is None
    assert extract_answer("<reasoning>\nx\n</reasoning>\n<answer>\n18") is None  # truncated: never closed


# --- correctness_reward -----------------------------------------------------


def test_correctness_scores_2_for_the_right_answer_and_0_otherwise():
    scores = _score(correctness_reward, [WELL_FORMED, WELL_FORMED], answer=["18", "19"])
    assert scores == [2.0, 0.0]


def test_correctness_accepts_multi_line_reasoning():
    assert _score(correctness_reward, [MULTI_LINE], answer=["18"]) == [2.0]


@pytest.mark.parametrize(
    "predicted, reference",
    [
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("$18", "18"),
        ("18.0", "18"),
        ("18.50", "18.5"),
        ("18.", "18"),
        ("  18  ", "18"),
        ("-$5", "-5"),
    ],
)
def test_correctness_compares_numbers_as_numbers(predicted, reference):
    assert _score(correctness_reward, [_answer_block(predicted)], answer=[reference]) == [2.0]


@pytest.mark.parametrize("predicted, reference", [("18.5", "18"), ("180", "18"), ("1,8", "18")])
def test_correctness_rejects_different_numbers(predicted, reference):
    assert _score(correctness_reward, [_answer_block(predicted)], answer=[reference]) == [0.0]


def test_correctness_falls_back_to_normalised_strings():
    completions = [_answer_block("Tuesday."), _answer_block("the  Red car"), _answer_block("Tue")]
    scores = _score(correctness_reward, completions, answer=["tuesday", "The red car", "Tuesday"])
    assert scores == [2.0, 2.0, 0.0]


def test_correctness_is_0_without_answer_tags_even_if_the_text_holds_the_answer():
    assert _score(correctness_reward, [NO_TAGS, "18", "<answer>\n18"], answer=["18"] * 3) == [0.0] * 3


def test_correctness_scores_the_last_answer_block():
    text = "<answer>\n3\n</answer>\nOn second thought:\n<answer>\n18\n</answer>"
    assert _score(correctness_reward, [text, text], answer=["18", "3"]) == [2.0, 0.0]


def test_correctness_reads_chat_completions_and_raw_gsm8k_solutions():
    conversation = [{"role": "user", "content": "x"}, {"role": "assistant", "content": WELL_FORMED}]
    completions = [_chat(WELL_FORMED), conversation]
    answer = ["16 - 3 - 4 = <<16-3-4=9>>9\n9 * 2 = <<9*2=18>>18\n#### 18", "18"]
    assert _score(correctness_reward, completions, answer=answer) == [2.0, 2.0]


def test_correctness_accepts_extra_columns_and_completion_ids():
    scores = correctness_reward(
        prompts=["q"], completions=[WELL_FORMED], completion_ids=[[1, 2, 3]], answer=[18], question=["q"]
    )
    assert scores == [2.0]


def test_correctness_needs_one_answer_per_completion():
    with pytest.raises(ValueError):
        _score(correctness_reward, [WELL_FORMED, WELL_FORMED], answer=["18"])


# --- int_reward -------------------------------------------------------------


@pytest.mark.parametrize("answer", ["18", "-3", "1,000", "$18", "18.0", "18."])
def test_int_reward_scores_integral_numbers(answer):
    assert _score(int_reward, [_answer_block(answer)]) == [0.5]


@pytest.mark.parametrize("answer", ["18.5", "eighteen", "18 eggs", "1,00", ""])
def test_int_reward_scores_0_for_non_integers(answer):
    assert _score(int_reward, [_answer_block(answer)]) == [0.0]


def test_int_reward_needs_answer_tags_and_reads_chat_completions():
    assert _score(int_reward, [NO_TAGS, "18", MULTI_LINE, _chat(WELL_FORMED)]) == [0.0, 0.0, 0.5, 0.5]


# --- strict_format_reward ---------------------------------------------------


def test_strict_format_scores_the_exact_layout():
    no_trailing_newline = WELL_FORMED.rstrip("\n")
    assert _score(strict_format_reward, [WELL_FORMED, no_trailing_newline]) == [0.5, 0.5]


def test_strict_format_accepts_multi_line_reasoning():
    # The original regex (no re.DOTALL) scored this 0.
    assert _score(strict_format_reward, [MULTI_LINE, _chat(MULTI_LINE)]) == [0.5, 0.5]


@pytest.mark.parametrize(
    "text",
    [
        NO_NEWLINES,
        NO_TAGS,
        "Sure!\n" + WELL_FORMED,
        WELL_FORMED + "Hope this helps.",
        "<reasoning>\nx\n</reasoning>\n<answer>\n18\n",  # never closed
        "<answer>\n18\n</answer>",
        # A second block must not hide inside the lazy `.*?` of the first.
        WELL_FORMED + "<answer>\n19\n</answer>",
        "<reasoning>\nx\n</reasoning>\n<reasoning>\ny\n</reasoning>\n<answer>\n18\n</answer>",
    ],
)
def test_strict_format_scores_0_for_other_layouts(text):
    assert _score(strict_format_reward, [text]) == [0.0]


def test_strict_format_accepts_the_system_prompt_example():
    example = SYSTEM_PROMPT.split("format:\n", 1)[1]
    assert _score(strict_format_reward, [example]) == [0.5]


# --- soft_format_reward -----------------------------------------------------


def test_soft_format_ignores_newlines_and_trailing_text():
    completions = [
        NO_NEWLINES,
        WELL_FORMED,
        MULTI_LINE,
        "  <reasoning>\na\nb\n</reasoning>\n\n<answer>18</answer> and more text",
        _chat(NO_NEWLINES),
    ]
    assert _score(soft_format_reward, completions) == [0.5] * 5


@pytest.mark.parametrize(
    "text",
    [
        NO_TAGS,
        "<answer>18</answer>",
        "Sure! <reasoning>x</reasoning><answer>18</answer>",
        "<reasoning>x</reasoning> so <answer>18</answer>",
        "<reasoning>x</reasoning><answer>18",
    ],
)
def test_soft_format_scores_0_for_missing_or_misplaced_tags(text):
    assert _score(soft_format_reward, [text]) == [0.0]


# --- xmlcount_reward --------------------------------------------------------


def test_xmlcount_scores_0_125_per_well_placed_tag():
    # WELL_FORMED and MULTI_LINE: all four tags once, nothing but a newline after </answer>.
    # NO_NEWLINES: no tag has its newlines -> 0.
    # An answer block at the very start: "\n<answer>\n" lacks its leading newline, "\n</answer>" counts.
    completions = [WELL_FORMED, MULTI_LINE, NO_NEWLINES, "<answer>\n18\n</answer>", NO_TAGS]
    assert _score(xmlcount_reward, completions) == pytest.approx([0.5, 0.5, 0.0, 0.125, 0.0])


def test_xmlcount_counts_a_repeated_tag_zero_times():
    # <reasoning>\n and \n</reasoning>\n appear twice each: only the two answer tags count.
    text = "<reasoning>\na\n</reasoning>\n<reasoning>\nb\n</reasoning>\n<answer>\n18\n</answer>"
    assert _score(xmlcount_reward, [text]) == pytest.approx([0.25])


def test_xmlcount_subtracts_0_001_per_character_after_the_answer():
    completions = [
        WELL_FORMED + "Hope this helps.",  # 16 characters: 0.5 - 0.016
        WELL_FORMED + "\n  ok  \n",  # whitespace around is free: 2 characters
        WELL_FORMED + "x" * 600,  # not floored: 0.5 - 0.6
        _chat(MULTI_LINE + "\nBye"),  # 3 characters
    ]
    assert _score(xmlcount_reward, completions) == pytest.approx([0.484, 0.498, -0.1, 0.497])


# --- the set ----------------------------------------------------------------


def test_gsm8k_rewards_is_the_five_functions():
    assert GSM8K_REWARDS == [
        gsm8k.xmlcount_reward,
        gsm8k.soft_format_reward,
        gsm8k.strict_format_reward,
        gsm8k.int_reward,
        gsm8k.correctness_reward,
    ]


def test_a_perfect_completion_scores_4_in_total():
    # 0.5 xmlcount + 0.5 soft + 0.5 strict + 0.5 int + 2.0 correct
    total = sum(_score(fn, [MULTI_LINE], answer=["18"])[0] for fn in GSM8K_REWARDS)
    assert total == pytest.approx(4.0)


def test_system_prompt_is_the_recipe_format():
    assert SYSTEM_PROMPT == (
        "Respond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>"
    )
