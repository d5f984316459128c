"""grpo_ray.sandbox: plain-data encoding, test splitting, verdicts, limits on parallel jobs, and the
runner on right, wrong and slow programs (needs bubblewrap: `.ci/run` installs it)."""

from __future__ import annotations

import signal
import sys
import threading
import time
import types

import pytest

from grpo_ray import sandbox
from grpo_ray.sandbox import SandboxUnavailable, Verdict, run_tests
from grpo_ray.sandbox import harness, runner
from grpo_ray.sandbox.seccomp import filter_program

ADD = "def add(a, b):\n    return a + b\n"
SUM_SCRIPT = "a, b = map(int, input().split())\nprint(a + b)\n"


# --- pieces that need no sandbox ------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [None, True, 0, -(10**30), 1.5, float("inf"), "é", b"\x00\xff", [1, [2]], (1, (2,)), {1: "a", (2, 3): [4]},
     {1, 2}, frozenset({"a"}), 1 + 2j, []],
)  # fmt: skip
def test_plain_data_round_trips_with_exact_types(value):
    back = harness.decode(harness.encode(value))
    assert back == value and type(back) is type(value)


def test_nan_round_trips():
    back = harness.decode(harness.encode(float("nan")))
    assert back != back


@pytest.mark.parametrize("value", [object(), type("MyInt", (int,), {})(3), [1, lambda: 0], {"k": range(3)}])
def test_encode_rejects_anything_but_builtin_types(value):
    with pytest.raises(harness.NotPlainData, match=harness.NOT_PLAIN):
        harness.encode(value)


@pytest.mark.parametrize("data", [{"__t": 1}, {"a": 1, "b": 2}, {"__s": [[1]]}, {"__zz": []}])
def test_decode_rejects_what_encode_cannot_produce(data):
    with pytest.raises((ValueError, TypeError)):
        harness.decode(data)


@pytest.mark.parametrize(
    "statement, expr, expected",
    [
        ("assert add(1, 2) == 3", "add(1, 2)", 3),
        ("assert 3 == add(1, 2)", "add(1, 2)", 3),
        ("assert f(x=[1]) == [(1, 'a'), -2.5]", "f(x=[1])", [(1, "a"), -2.5]),
        ("assert f() == 2 / 3, 'message'", "f()", 2 / 3),
        ("assert f() == set([1, 2])", "f()", {1, 2}),
        ("assert f() == float('inf')", "f()", float("inf")),
    ],
)
def test_equality_asserts_split_into_inside_expr_and_outside_value(statement, expr, expected):
    spec, _ = runner._prepare({"assert": statement}, 0)
    assert spec == {"kind": "eval", "expr": expr}
    assert runner._split_equality(__import__("ast").parse(statement))[1] == expected


@pytest.mark.parametrize(
    "statement",
    ["assert abs(f(1) - 2) < 1e-6", "assert f(1) == g(2)", "assert f(1)", "assert f(1) is True", "x = 1\nassert f(x) == 1",
     "assert 1 == 1", "assert f() == 2 ** 10000", "assert f() == __import__('os').getpid()"],
)  # fmt: skip
def test_other_asserts_run_as_statements(statement):
    spec, _ = runner._prepare({"assert": statement}, 0)
    assert spec == {"kind": "exec", "stmt": statement}


def test_expected_outputs_never_enter_the_sandbox():
    specs = [runner._prepare(t, i)[0] for i, t in enumerate([{"stdin": "1 2", "stdout": "SECRET3"}, {"assert": "assert f() == 'SECRET4'"}])]
    assert "SECRET" not in repr(specs)


def test_malformed_tests_are_the_callers_error():
    with pytest.raises(ValueError, match="neither 'assert' nor"):
        run_tests("", [{"input": "1"}], timeout_s=1, memory_mb=64)
    with pytest.raises(ValueError, match="does not parse"):
        run_tests("", [{"assert": "assert ("}], timeout_s=1, memory_mb=64)
    assert run_tests("", [], timeout_s=1, memory_mb=64) == []


def _result(**overrides):
    base = {"wall_s": 0.1, "cpu_s": 0.1, "flag": None, "exit_code": 0, "signal": None, "stdout": "", "stderr": ""}
    return {**base, **overrides}


@pytest.mark.parametrize(
    "result, status",
    [
        (_result(flag="timeout", signal=signal.SIGKILL), "TLE"),
        (_result(signal=signal.SIGXCPU, exit_code=None), "TLE"),
        (_result(signal=signal.SIGKILL, exit_code=None, cpu_s=2.0), "TLE"),  # the hard CPU limit
        (_result(flag="output_limit", signal=signal.SIGKILL), "OLE"),
        (_result(signal=signal.SIGXFSZ, exit_code=None), "OLE"),
        (_result(exit_code=harness.MEMORY_ERROR_EXIT), "MLE"),
        (_result(signal=signal.SIGSEGV, exit_code=None), "RE"),
        (_result(exit_code=1), "RE"),
        (_result(stdout="3  \n\n"), "AC"),
        (_result(stdout="4\n"), "WA"),
        (_result(flag="skipped"), "TLE"),
    ],
)
def test_limits_are_judged_before_the_output(result, status):
    verdict = runner._judge(result, lambda r: runner._judge_stdout(r, "3"), timeout_s=1.5, memory_mb=64)
    assert verdict.status == status


@pytest.mark.parametrize(
    "record, status",
    [
        ({"value": 3}, "AC"),
        ({"value": 3.0}, "AC"),  # Python's == as in HumanEval's own harness
        ({"value": {"__t": [3]}}, "WA"),
        ({"not_plain": "a value of type 'A' is not plain data"}, "WA"),
        ({"error": "ZeroDivisionError: division by zero"}, "RE"),
        ({"error": "MemoryError"}, "MLE"),
        ({"ok": True}, "RE"),  # a record without a value is no answer
        (None, "RE"),  # exited before the test ran
    ],
)
def test_values_are_compared_outside(record, status):
    assert runner._judge_value(_result(record=record), 3)[0] == status


def test_install_hint_when_bubblewrap_is_missing(monkeypatch):
    monkeypatch.setattr(runner.shutil, "which", lambda name: None)
    monkeypatch.setattr(runner, "_availability_result", [])
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        run_tests(ADD, [{"assert": "assert add(1, 2) == 3"}], timeout_s=1, memory_mb=64)


def test_seccomp_program_is_a_bpf_array():
    program = filter_program()
    assert len(program) % 8 == 0 and 20 < len(program) // 8 < 4096  # struct sock_filter: 8 bytes


def test_parallel_jobs_follow_env_then_ray_then_affinity(monkeypatch):
    monkeypatch.setenv("GRPO_RAY_SANDBOX_JOBS", "3")
    assert sandbox.max_parallel() == 3
    monkeypatch.delenv("GRPO_RAY_SANDBOX_JOBS")
    context = types.SimpleNamespace(get_assigned_resources=lambda: {"CPU": 1.0})
    fake_ray = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)
    assert sandbox.max_parallel() == 1  # a RewardActor(num_cpus=1): one sandbox at a time


def test_jobs_beyond_max_parallel_wait_their_turn(monkeypatch):
    monkeypatch.setenv("GRPO_RAY_SANDBOX_JOBS", "2")
    monkeypatch.setattr(runner, "_slot_state", {})
    monkeypatch.setattr(runner, "_availability_result", [""])
    running, peak, lock = [0], [0], threading.Lock()

    def fake_sandbox(request, deadline_s):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return [_result(stdout="3")], ""

    monkeypatch.setattr(runner, "_run_sandbox", fake_sandbox)
    threads = [threading.Thread(target=run_tests, args=("", [{"stdin": "", "stdout": "3"}]), kwargs={"timeout_s": 1, "memory_mb": 64}) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 2


# --- the sandbox itself ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def available():
    sandbox.check_available()  # fails with the install command rather than skipping


def test_right_wrong_and_slow_scripts(available):
    tests = [{"stdin": "1 2\n", "stdout": "3"}, {"stdin": "2 2\n", "stdout": "5\n"}]
    assert [v.status for v in run_tests(SUM_SCRIPT, tests, timeout_s=2, memory_mb=128)] == ["AC", "WA"]
    slow = "import time\ntime.sleep(5)\n" + SUM_SCRIPT
    assert [v.status for v in run_tests(slow, tests[:1], timeout_s=0.5, memory_mb=128)] == ["TLE"]


def test_output_compared_up_to_trailing_whitespace(available):
    code = "print('1 2   ')\nprint('3')\nprint()\nprint()"
    verdicts = run_tests(code, [{"stdin": "", "stdout": "1 2\n3"}, {"stdin": "", "stdout": "1 2 3"}], timeout_s=2, memory_mb=128)
    assert [v.status for v in verdicts] == ["AC", "WA"]


def test_asserts_right_wrong_raising_and_slow(available):
    code = ADD + "def loop(n):\n    while True:\n        pass\n"
    tests = [
        {"assert": "assert add(1, 2) == 3"},
        {"assert": "assert add(1, 2) == 4"},
        {"assert": "assert abs(add(0.1, 0.2) - 0.3) < 1e-9"},  # runs as a statement
        {"assert": "for i in range(5):\n    assert add(i, i) == 2 * i"},
        {"assert": "assert add(1, 'a') == 3"},
        {"assert": "assert loop(1) == 1"},
    ]
    verdicts = run_tests(code, tests, timeout_s=1.0, memory_mb=128)
    assert [v.status for v in verdicts] == ["AC", "WA", "AC", "AC", "RE", "TLE"]
    assert "TypeError" in verdicts[4].detail


def test_exceptions_the_test_expects_still_pass(available):
    code = "def checked(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n"
    test = "try:\n    checked(-1)\n    raise AssertionError('no error')\nexcept ValueError:\n    pass"
    assert run_tests(code, [{"assert": test}], timeout_s=2, memory_mb=128)[0].status == "AC"


def test_main_block_runs_for_scripts_not_for_asserts(available):
    code = ADD + "if __name__ == '__main__':\n    print(add(*map(int, input().split())))\n"
    verdicts = run_tests(code, [{"stdin": "1 2", "stdout": "3"}, {"assert": "assert add(2, 2) == 4"}], timeout_s=2, memory_mb=128)
    assert [v.status for v in verdicts] == ["AC", "AC"]


def test_syntax_error_is_a_runtime_error(available):
    verdicts = run_tests("def add(a, b)\n    return a + b", [{"assert": "assert add(1, 2) == 3"}], timeout_s=2, memory_mb=128)
    assert verdicts[0].status == "RE" and "SyntaxError" in verdicts[0].detail


def test_stop_on_timeout_skips_the_rest(available):
    code = "import time\ndef f(x):\n    time.sleep(x)\n    return x\n"
    tests = [{"assert": "assert f(0) == 0"}, {"assert": "assert f(9) == 9"}, {"assert": "assert f(0) == 0"}]
    start = time.monotonic()
    verdicts = run_tests(code, tests, timeout_s=0.5, memory_mb=128, stop_on_timeout=True)
    assert [v.status for v in verdicts] == ["AC", "TLE", "TLE"] and verdicts[2].detail.startswith("not run")
    assert time.monotonic() - start < 3


def test_verdict_reports_time(available):
    verdict = run_tests("import time\ntime.sleep(0.2)", [{"stdin": "", "stdout": ""}], timeout_s=2, memory_mb=128)[0]
    assert verdict == Verdict("AC", verdict.time_s, "") and 0.2 <= verdict.time_s < 1.5
