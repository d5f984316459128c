"""Host side of the sandbox: turn tests into a job, run it in a warm sandbox, judge what comes out.

One call of `run_tests` is one job: a fresh process forked inside one of this process's warm
sandboxes (`zygote.py`), one forked child per test (`harness.py`). Expected outputs stay here:
the harness only reports what the code printed or returned, and `_judge` decides the verdict.
"""

from __future__ import annotations

import ast
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

from grpo_ray.sandbox import harness as _harness
from grpo_ray.sandbox import zygote as _zygote
from grpo_ray.sandbox.seccomp import SeccompUnavailable, filter_program

__all__ = [
    "STATUSES",
    "SandboxUnavailable",
    "Verdict",
    "check_available",
    "max_parallel",
    "needs_sandbox",
    "requires_sandbox",
    "run_tests",
]

STATUSES = ("AC", "WA", "TLE", "MLE", "OLE", "RE", "INFRA")
INSTALL_HINT = "install it with `apt-get install -y bubblewrap libseccomp2` (Debian/Ubuntu) or `dnf install bubblewrap libseccomp`"

OUTPUT_LIMIT = 1 << 20  # bytes of stdout per test before OLE
FSIZE_LIMIT = 8 << 20  # RLIMIT_FSIZE: largest file a test may write
NPROC_LIMIT = 16  # RLIMIT_NPROC inside the sandbox's user namespace (zygote, job process and threads included)
NOFILE_LIMIT = 64
_SANDBOX_MARK = "__requires_sandbox__"
RewardFunc = TypeVar("RewardFunc", bound=Callable[..., Any])


class SandboxUnavailable(RuntimeError):
    """bubblewrap or seccomp is missing or cannot create a sandbox here; the message says how to fix it."""


@dataclass(frozen=True)
class Verdict:
    """The outcome of one test. status: AC WA TLE MLE OLE RE, or INFRA (the sandbox failed)."""

    status: str
    time_s: float = 0.0  # wall time of the test inside the sandbox
    detail: str = ""  # why, for logs: the exception, the first differing output, the signal

    @property
    def passed(self) -> bool:
        return self.status == "AC"


# --- public API -----------------------------------------------------------------------------


def run_tests(
    code: str,
    tests: Sequence[dict[str, Any]],
    *,
    timeout_s: float,
    memory_mb: int,
    output_limit_bytes: int = OUTPUT_LIMIT,
    stop_on_timeout: bool = False,
) -> list[Verdict]:
    """Run `code` against each test in one sandbox; one Verdict per test, in order.

    A test is `{"stdin": str, "stdout": str}` (the code runs as a script; its stdout must equal
    `stdout` up to trailing whitespace on each line and at the end) or `{"assert": str}`, a
    Python statement run after the code (`assert add(1, 2) == 3`). For `assert EXPR == EXPECTED`
    with a literal EXPECTED, only EXPR runs inside and its value (builtin types only) is
    compared here; other statements run in a process where the code never ran, calling the
    code's functions over a pipe (see harness.py).

    Limits per test: `timeout_s` wall seconds (and CPU seconds, rounded up + 1), `memory_mb` MiB
    of address space per process, `output_limit_bytes` of stdout. The job runs in one of this
    process's `max_parallel()` warm sandboxes (started on first use, kept between jobs, each
    job isolated from the last: see harness.py); callers beyond that wait, so jobs do not
    oversubscribe the CPUs of a reward actor and turn right answers into TLE. With
    `stop_on_timeout` the tests after a TLE are not run and are TLE too, which bounds a looping
    program's cost.

    Raises SandboxUnavailable (with the install command) when bubblewrap or libseccomp is
    missing, and ValueError for a malformed test. A sandbox that fails gives INFRA verdicts
    (and is replaced for the next job).
    """
    if timeout_s <= 0 or memory_mb <= 0:
        raise ValueError(f"timeout_s={timeout_s} and memory_mb={memory_mb} must be positive")
    prepared = [_prepare(test, i) for i, test in enumerate(tests)]
    if not prepared:
        return []
    check_available()
    request = job_request(code, [spec for spec, _ in prepared], timeout_s, memory_mb, output_limit_bytes, stop_on_timeout)
    try:
        results = run_job(request)
    except _zygote.SandboxFailure as failure:
        return [Verdict("INFRA", detail=str(failure)) for _ in prepared]
    return [_judge(result, judge, timeout_s, memory_mb) for result, (_, judge) in zip(results, prepared)]


def requires_sandbox(fn: RewardFunc) -> RewardFunc:
    """Mark a reward function that runs completions in this sandbox (a decorator).

    A RewardActor that loads a marked function checks the sandbox when it starts and keeps a
    warm one, so a node without bubblewrap fails the run at startup with the install command
    instead of scoring None all along.
    """
    setattr(fn, _SANDBOX_MARK, True)
    return fn


def needs_sandbox(fn: Callable[..., Any]) -> bool:
    """Whether `fn` (or the function of a functools.partial) is marked with @requires_sandbox."""
    return bool(getattr(fn, _SANDBOX_MARK, False) or getattr(getattr(fn, "func", None), _SANDBOX_MARK, False))


def check_available() -> None:
    """SandboxUnavailable unless a program runs in a sandbox here (checked once per process).

    The check starts this process's first warm sandbox, which then serves the next job: a
    RewardActor calls it when it starts (see `requires_sandbox`)."""
    error = _availability()
    if error:
        raise SandboxUnavailable(error)


def max_parallel() -> int:
    """Sandboxes this process runs at once: $GRPO_RAY_SANDBOX_JOBS, else the CPUs Ray assigned
    to this actor (a RewardActor has num_cpus=1), else the CPUs this process may run on."""
    env = os.environ.get("GRPO_RAY_SANDBOX_JOBS")
    if env:
        return max(1, int(env))
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        except Exception:
            cpus = None
        if cpus:
            return max(1, int(cpus))
    return max(1, len(os.sched_getaffinity(0)))


# --- tests in, verdicts out ---------------------------------------------------------------


Judge = Callable[[dict[str, Any]], tuple[str, str]]


def _prepare(test: dict[str, Any], index: int) -> tuple[dict[str, Any], Judge]:
    """(what enters the sandbox, how to judge the result outside) for one test dict."""
    test = {k: v for k, v in dict(test).items() if v is not None}
    if "assert" in test:
        statement = test["assert"]
        try:
            tree = ast.parse(statement, mode="exec")
        except SyntaxError as error:
            raise ValueError(f"test {index}: the assert statement does not parse: {error}") from None
        split = _split_equality(tree)
        if split is not None:
            expr, expected = split
            return {"kind": "eval", "expr": expr}, lambda result: _judge_value(result, expected)
        return {"kind": "exec", "stmt": statement}, _judge_exec
    if "stdout" in test:
        expected_out = str(test["stdout"])
        return {"kind": "script", "stdin": str(test.get("stdin", ""))}, lambda r: _judge_stdout(r, expected_out)
    raise ValueError(f"test {index} has neither 'assert' nor 'stdin'/'stdout': {sorted(test)}")


def _split_equality(tree: ast.Module) -> tuple[str, Any] | None:
    """(EXPR source, EXPECTED value) for `assert EXPR == EXPECTED` with a literal side; else None."""
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Assert):
        return None
    test = tree.body[0].test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    left, right = test.left, test.comparators[0]
    for expr, expected in ((left, right), (right, left)):
        try:
            value = _literal(expected)
        except ValueError:
            continue
        try:
            _literal(expr)
        except ValueError:
            return ast.unparse(expr), value
        return None  # both literal: nothing of the code's to evaluate
    return None


_SAFE_OPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}
_SAFE_CALLS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "float": float, "dict": dict}


def _literal(node: ast.AST) -> Any:
    """The value of a literal expression: constants, containers, unary -/+, + - * / // % on
    numbers, set()/tuple()/float('inf')...; ValueError for anything else (names, calls of code)."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        items = [_literal(e) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError("dict unpacking")
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _literal(node.operand)
        if type(value) not in (int, float, complex):
            raise ValueError("unary op on a non-number")
        return -value if isinstance(node.op, ast.USub) else +value
    if isinstance(node, ast.BinOp) and type(node.op) in _SAFE_OPS:
        a, b = _literal(node.left), _literal(node.right)
        if type(a) not in (int, float) or type(b) not in (int, float):
            raise ValueError("arithmetic on non-numbers")
        if any(type(x) is int and abs(x) > 10**100 for x in (a, b)):
            raise ValueError("number too large")
        try:
            return _SAFE_OPS[type(node.op)](a, b)
        except ArithmeticError:
            raise ValueError("arithmetic error") from None
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _SAFE_CALLS
        and not node.keywords and len(node.args) <= 1
    ):  # fmt: skip
        args = [_literal(a) for a in node.args]
        if node.func.id == "float" and not (args and isinstance(args[0], (str, int, float))):
            raise ValueError("float() of a non-literal")
        try:
            return _SAFE_CALLS[node.func.id](*args)
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from None
    raise ValueError(f"not a literal: {type(node).__name__}")


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _judge_stdout(result: dict[str, Any], expected: str) -> tuple[str, str]:
    if result["exit_code"] != 0:
        return "RE", f"exit status {result['exit_code']}: {_tail(result['stderr'])}"
    if _normalise_output(result["stdout"]) == _normalise_output(expected):
        return "AC", ""
    return "WA", f"stdout {result['stdout'][:200]!r} != expected {expected[:200]!r}"


def _judge_value(result: dict[str, Any], expected: Any) -> tuple[str, str]:
    record = result.get("record")
    if not isinstance(record, dict):
        if result["exit_code"] == 0:
            return "RE", "exited before the test ran"
        return "RE", f"exit status {result['exit_code']}: {_tail(result['stderr'])}"
    if "error" in record:
        return ("MLE" if str(record["error"]).startswith("MemoryError") else "RE"), str(record["error"])[:300]
    if "not_plain" in record:
        return "WA", str(record["not_plain"])[:300]
    if "value" not in record:
        return "RE", "malformed result record"
    try:
        value = _harness.decode(record["value"])
    except (ValueError, TypeError, RecursionError) as error:
        return "WA", f"unreadable value: {error}"
    try:
        equal = bool(value == expected)  # both are builtin-type data: == cannot be overridden
    except RecursionError:
        equal = False
    return ("AC", "") if equal else ("WA", f"got {_short(value)}, expected {_short(expected)}")


def _judge_exec(result: dict[str, Any]) -> tuple[str, str]:
    record = result.get("record")
    if not isinstance(record, dict):
        return "RE", f"the test process did not report (exit {result['exit_code']}, signal {result['signal']})"
    if record.get("ok") is True:
        return "AC", ""
    if "assertion" in record:
        return "WA", str(record["assertion"])[:300]
    error = str(record.get("error", "unknown error"))
    if _harness.NOT_PLAIN in error:
        return "WA", error[:300]
    return ("MLE" if error.startswith("MemoryError") else "RE"), error[:300]


def _judge(result: dict[str, Any], judge: Judge, timeout_s: float, memory_mb: int) -> Verdict:
    """Limits first (they explain any failure), then the test's own judgement."""
    wall = float(result.get("wall_s", 0.0))
    flag, sig, exit_code = result.get("flag"), result.get("signal"), result.get("exit_code")
    if flag == "skipped":
        return Verdict("TLE", 0.0, "not run: an earlier test timed out")
    if flag == "timeout" or sig == signal.SIGXCPU or (sig == signal.SIGKILL and result["cpu_s"] >= math.ceil(timeout_s)):
        return Verdict("TLE", wall, f"over {timeout_s:g} s")
    if flag == "output_limit" or sig == signal.SIGXFSZ:
        return Verdict("OLE", wall, "output limit exceeded")
    if exit_code == _harness.MEMORY_ERROR_EXIT:
        return Verdict("MLE", wall, f"MemoryError under {memory_mb} MiB")
    if sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return Verdict("RE", wall, f"killed by {name}")
    status, detail = judge(result)
    return Verdict(status, wall, detail)


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:300] if lines else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


# --- the job ----------------------------------------------------------------------------------


_JOB_MARGIN_S = 5.0  # allowance per job beyond its tests' limits: fork, pipes, a busy host


def job_request(
    code: str,
    specs: list[dict[str, Any]],
    timeout_s: float,
    memory_mb: int,
    output_limit_bytes: int = OUTPUT_LIMIT,
    stop_on_timeout: bool = False,
) -> dict[str, Any]:
    """The request the harness runs: the code, the test specs (`_prepare`), the limits."""
    return {
        "code": code,
        "tests": specs,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "output_limit": output_limit_bytes,
        "nproc": NPROC_LIMIT,
        "nofile": NOFILE_LIMIT,
        "fsize": FSIZE_LIMIT,
        "stop_on_timeout": stop_on_timeout,
    }


def run_job(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The harness's raw result per test of `request` (zygote.SandboxFailure if the sandbox failed)."""
    deadline_s = _JOB_MARGIN_S + len(request["tests"]) * (float(request["timeout_s"]) + 1.0)
    return _zygote.run_job(request, deadline_s, max_parallel())


_availability_lock = threading.Lock()
_availability_result: list[str] = []


def _availability() -> str:
    """"" when a trivial job runs in a sandbox, else the error message (computed once per process)."""
    with _availability_lock:
        if not _availability_result:
            _availability_result.append(_probe())
        return _availability_result[0]


def _probe() -> str:
    """Why no sandbox can run here, or "" after one ran an empty program (and stays warm)."""
    if _zygote.bwrap_path() is None:
        where = os.environ.get("GRPO_RAY_BWRAP") or "`bwrap` on PATH"
        return f"the code sandbox needs bubblewrap, and found no {where}: {INSTALL_HINT}"
    try:
        filter_program()
    except SeccompUnavailable as error:
        return f"the code sandbox needs libseccomp for its seccomp filter ({error}): {INSTALL_HINT}"
    try:
        results = run_job(job_request("", [{"kind": "script", "stdin": ""}], timeout_s=5, memory_mb=256))
        if results[0].get("exit_code") != 0:
            raise _zygote.SandboxFailure(f"an empty program failed in it: {results[0]}")
    except _zygote.SandboxFailure as why:
        return (
            f"bubblewrap is installed but cannot create a sandbox here ({why}). It needs unprivileged user "
            "namespaces: `sysctl -w kernel.unprivileged_userns_clone=1` (Debian), "
            "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` (Ubuntu 24.04+), "
            "or in a container `--security-opt seccomp=unconfined`"
        )
    return ""
