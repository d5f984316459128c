"""grpo_ray.rewards.code: code extraction, the three rewards, HumanEval's tests, and the task.

The HumanEval sweep runs all 164 canonical solutions (AC) and a corrupted copy of each (not
AC) in the sandbox: ~5 s on 2 cores, two warm sandboxes at a time. Needs bubblewrap.
"""

from __future__ import annotations

import functools
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from grpo_ray import rewards
from grpo_ray.rewards import code as code_rewards
from grpo_ray.rewards.code import (
    all_pass_reward,
    build_program,
    code_format_reward,
    extract_code,
    humaneval_problems,
    humaneval_tests,
    pass_fraction_reward,
)
from grpo_ray.sandbox import Verdict, needs_sandbox, run_tests

ADD_TESTS = [{"assert": "assert add(1, 2) == 3"}, {"assert": "assert add(-1, 1) == 0"}]
RIGHT = "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n"
HALF = "```python\ndef add(a, b):\n    return 3\n```"


def test_extract_code_takes_the_last_fenced_block():
    text = "```python\nfirst()\n```\nthen\n```py\nsecond()\n```\nbye"
    assert extract_code(text) == "second()\n"
    assert extract_code("```\nplain()\n```") == "plain()\n"
    assert extract_code("x = 1") == "x = 1"  # no fence: the whole text
    assert extract_code("   \n") is None and extract_code("```python\n\n```") is None


def test_build_program_replaces_or_continues_the_stub():
    prefix = "import math\n\ndef area(r):\n    \"\"\"Area.\"\"\"\n"
    whole = "def area(r):\n    return math.pi * r * r\n"
    assert build_program(whole, prefix, "area") == prefix.rstrip("\n") + "\n\n" + whole
    body = "    return math.pi * r * r\n"
    assert build_program(body, prefix, "area") == prefix + body
    assert build_program(whole) == whole


def test_rewards_follow_the_pass_fraction():
    completions = [RIGHT, HALF, "I do not know.", [{"role": "assistant", "content": RIGHT}]]
    tests = [ADD_TESTS] * 4
    kwargs = {"prompts": ["p"] * 4, "completions": completions, "tests": tests}
    assert pass_fraction_reward(**kwargs) == [1.0, 0.5, 0.0, 1.0]  # "I do not know." runs, and fails
    assert all_pass_reward(**kwargs) == [1.0, 0.0, 0.0, 1.0]
    assert code_format_reward(**kwargs) == [1.0, 1.0, 0.0, 1.0]


def test_no_code_scores_zero_without_a_sandbox_run(monkeypatch):
    monkeypatch.setattr(code_rewards, "run_tests", lambda *a, **k: pytest.fail("ran a sandbox"))
    code_rewards._run_cached.cache_clear()
    assert pass_fraction_reward(["p"], [""], tests=[ADD_TESTS]) == [0.0]
    assert code_format_reward(["p"], ["```python\ndef (:\n```"]) == [0.0]  # a block that does not parse


def test_stdin_stdout_tests_and_json_columns():
    tests = json.dumps([{"stdin": "2 3\n", "stdout": "5"}, {"stdin": "1 1\n", "stdout": "2"}])
    program = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    assert pass_fraction_reward(["p"], [program], tests=[tests]) == [1.0]


def test_sandbox_failure_scores_none_never_zero(monkeypatch):
    monkeypatch.setattr(code_rewards, "run_tests", lambda *a, **k: [Verdict("INFRA", detail="bwrap died")] * 2)
    code_rewards._run_cached.cache_clear()
    assert pass_fraction_reward(["p"], [RIGHT], tests=[ADD_TESTS]) == [None]
    assert all_pass_reward(["p"], [RIGHT], tests=[ADD_TESTS]) == [None]
    code_rewards._run_cached.cache_clear()


def test_one_sandbox_run_serves_both_rewards(monkeypatch):
    calls = []

    def counting(program, tests, **limits):
        calls.append(program)
        return run_tests(program, tests, **limits)

    monkeypatch.setattr(code_rewards, "run_tests", counting)
    code_rewards._run_cached.cache_clear()
    pass_fraction_reward(["p"], [RIGHT], tests=[ADD_TESTS])
    all_pass_reward(["p"], [RIGHT], tests=[ADD_TESTS])
    assert len(calls) == 1
    code_rewards._run_cached.cache_clear()


def test_rewards_that_run_code_are_marked_as_needing_the_sandbox():
    assert needs_sandbox(pass_fraction_reward) and needs_sandbox(all_pass_reward)
    assert needs_sandbox(functools.partial(all_pass_reward, timeout_s=1))
    assert not needs_sandbox(code_format_reward)  # parses, runs nothing: no actor check needed


@pytest.mark.parametrize("name", ["pass_fraction_reward", "all_pass_reward", "code_format_reward"])
def test_rewards_load_by_import_path(name):
    assert rewards.load(f"grpo_ray.rewards.code:{name}") is getattr(code_rewards, name)


def test_humaneval_check_becomes_one_test_per_asserting_statement():
    source = (
        "METADATA = {'author': 'x'}\n"
        "import math\n"
        "def check(candidate):\n"
        "    assert candidate(1) == 2\n"
        "    rng = 3\n"
        "    assert math.fabs(candidate(rng) - 4) < 1e-6, 'close'\n"
        "    for x in range(3):\n"
        "        assert candidate(x) == x + 1\n"
    )
    assert humaneval_tests(source, "inc") == [
        {"assert": "assert inc(1) == 2"},
        {"assert": "import math\nrng = 3\nassert math.fabs(inc(rng) - 4) < 1e-06, 'close'"},
        {"assert": "for x in range(3):\n    assert inc(x) == x + 1"},
    ]


CORRUPT = """
_canonical = {name}


def {name}(*args, **kwargs):
    result = _canonical(*args, **kwargs)
    if isinstance(result, bool):
        return not result
    if isinstance(result, (int, float)):
        return result + 1
    if isinstance(result, (str, list, tuple)):
        return result + result[:1] if result else result * 2 + type(result)("x" if isinstance(result, str) else [0])
    return 0 if result is None else None
"""


def _verdicts(programs_and_tests):
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(lambda pt: run_tests(pt[0], pt[1], timeout_s=5, memory_mb=512), programs_and_tests))


def test_every_humaneval_canonical_solution_is_ac_and_a_corrupted_one_is_not():
    problems = humaneval_problems()
    assert len(problems) == 164 and sum(len(p["tests"]) for p in problems) > 1000
    canonical = _verdicts([(build_program(p["canonical_solution"], p["prompt"], p["entry_point"]), p["tests"]) for p in problems])
    failing = {p["task_id"]: [v for v in vs if not v.passed] for p, vs in zip(problems, canonical) if not all(v.passed for v in vs)}
    assert failing == {}
    # corrupted: the canonical solution, its every result made slightly wrong (off by one, negated, ...)
    corrupted = [(build_program(p["canonical_solution"], p["prompt"], p["entry_point"]) + CORRUPT.format(name=p["entry_point"]), p["tests"]) for p in problems]
    passing = [p["task_id"] for p, vs in zip(problems, _verdicts(corrupted)) if all(v.passed for v in vs)]
    assert passing == []


def test_humaneval_task_loads_offline():
    from grpo_ray.config import load_config
    from grpo_ray.data import load_prompts

    cfg = load_config(["task=humaneval"])
    dataset = load_prompts(cfg.task)
    assert len(dataset) == 164 and {"tests", "entry_point", "code_prefix"} <= set(dataset.column_names)
    row = dataset[0]
    assert row["prompt"][-1]["content"].startswith("Complete the following Python function")
    assert json.loads(row["tests"])[0]["assert"].startswith("assert has_close_elements(")
    assert [rewards.load(path) for path in cfg.task.reward_funcs]
