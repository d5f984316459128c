"""grpo_ray.sandbox: plain-data encoding, test splitting, verdicts, the pool of warm sandboxes, the
guard filter, the scratch wipe, and the runner on right, wrong and slow programs (needs
bubblewrap: `.ci/run` installs it)."""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
import threading
import time
import types

import pytest

from grpo_ray import sandbox
from grpo_ray.sandbox import SandboxUnavailable, Verdict, harness, run_tests, runner
from grpo_ray.sandbox.seccomp import filter_program, native_arch, syscall_numbers
from grpo_ray.sandbox.zygote import SandboxFailure, ZygotePool

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
    monkeypatch.setenv("GRPO_RAY_BWRAP", "/nonexistent/bwrap")
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


class FakeZygote:
    """A zygote without a sandbox: each job sleeps `job_s`; `fail_ready` / `fail_run` make the
    wait_ready calls / runs with those numbers (1-based) raise SandboxFailure."""

    running = peak = 0
    lock = threading.Lock()

    def __init__(self, job_s=0.0, fail_ready=(), fail_run=()):
        self.job_s, self.fail_ready, self.fail_run = job_s, fail_ready, fail_run
        self.readies = self.runs = 0
        self.closed = False

    def wait_ready(self, deadline):
        self.readies += 1
        if self.readies in self.fail_ready:
            raise SandboxFailure("could not empty its scratch dirs")

    def run(self, request, deadline):
        self.runs += 1
        with FakeZygote.lock:
            FakeZygote.running += 1
            FakeZygote.peak = max(FakeZygote.peak, FakeZygote.running)
        time.sleep(self.job_s)
        with FakeZygote.lock:
            FakeZygote.running -= 1
        if self.runs in self.fail_run:
            raise SandboxFailure("died")
        return [{"request": request}]

    def close(self):
        self.closed = True


def test_jobs_beyond_the_pool_size_wait_their_turn(monkeypatch):
    monkeypatch.setattr(FakeZygote, "peak", 0)
    pool = ZygotePool(2, factory=lambda: FakeZygote(job_s=0.05))
    threads = [threading.Thread(target=pool.run, args=({"tests": []}, 5.0)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert FakeZygote.peak == 2 and pool.started == 2  # two at a time, each zygote reused


def test_a_zygote_that_failed_a_job_is_closed_and_replaced():
    made = []
    pool = ZygotePool(1, factory=lambda: made.append(FakeZygote(fail_run=(2,))) or made[-1])
    assert pool.run({"job": 1}, 5.0) == [{"request": {"job": 1}}]
    with pytest.raises(SandboxFailure, match="died"):
        pool.run({"job": 2}, 5.0)
    assert pool.run({"job": 3}, 5.0) == [{"request": {"job": 3}}]
    assert [z.closed for z in made] == [True, False] and pool.started == 2


def test_a_zygote_that_cannot_clean_up_is_replaced_before_the_job():
    made = []
    pool = ZygotePool(1, factory=lambda: made.append(FakeZygote(fail_ready=(2,))) or made[-1])
    pool.run({"job": 1}, 5.0)
    assert pool.run({"job": 2}, 5.0) == [{"request": {"job": 2}}]  # on a new zygote, not INFRA
    assert [(z.closed, z.runs) for z in made] == [(True, 1), (False, 1)]


def _errno_of(call) -> str:
    try:
        call()
    except OSError as error:
        return errno.errorcode[error.errno]
    return "ok"


def test_guard_refuses_what_a_child_could_do_to_the_zygote_or_its_job_process():
    protected = os.getpid()  # stands for the job process: the forked child below is its "test"

    def attempts() -> str:
        return " ".join(_errno_of(call) for call in (
            lambda: os.kill(protected, 0),
            lambda: os.kill(-protected, 0),
            lambda: os.kill(-1, 0),
            lambda: resource.prlimit(protected, resource.RLIMIT_NOFILE),
            lambda: os.sched_setaffinity(protected, os.sched_getaffinity(0)),
            lambda: os.setpriority(os.PRIO_PROCESS, protected, 0),
            lambda: os.setpriority(os.PRIO_USER, 0, 0),
            lambda: os.pidfd_open(protected),
            lambda: os.kill(os.getpid(), 0),  # itself: allowed
            lambda: resource.prlimit(0, resource.RLIMIT_NOFILE),
            lambda: os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0)),
        ))  # fmt: skip

    numbers = syscall_numbers(harness.GUARDED_SYSCALLS)
    assert set(numbers) == set(harness.GUARDED_SYSCALLS)
    guard = harness.Guard(harness.guard_program(native_arch(), numbers, (1, protected)))
    assert _in_a_child(lambda: (guard.install(), attempts())[1]) == " ".join(["EPERM"] * 8 + ["ok"] * 3)


def _in_a_child(body) -> str:
    """What `body()` returns, run in a forked child (so that a filter it loads dies with it)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read)
            os.write(write, body().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    return text


def test_wipe_empties_deep_and_locked_trees_without_following_links(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("keep")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    fd = os.open(scratch, os.O_RDONLY)
    for _ in range(3000):  # deeper than any recursion limit, and than PATH_MAX as a path
        os.mkdir("d", dir_fd=fd)
        deeper = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = deeper
    os.close(fd)
    (scratch / "locked").mkdir()
    (scratch / "locked" / "f").write_text("x")
    (scratch / "locked").chmod(0)
    (scratch / "link").symlink_to(outside)
    (scratch / "dirlink").symlink_to(outside / "keep")
    os.mkfifo(scratch / "fifo")
    root = os.open(scratch, os.O_RDONLY | os.O_DIRECTORY)
    try:
        harness._empty(root)
    finally:
        os.close(root)
    assert os.listdir(scratch) == [] and (outside / "keep").read_text() == "keep"


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


def test_a_warm_sandbox_outlives_the_thread_that_started_it(available):
    """bubblewrap's --die-with-parent follows the starting thread; reward calls run in short-lived threads."""
    pool = ZygotePool(1)
    request = runner.job_request(ADD, [{"kind": "eval", "expr": "add(1, 2)"}], timeout_s=2, memory_mb=128)
    try:
        thread = threading.Thread(target=pool.run, args=(request, 10.0))
        thread.start()
        thread.join()
        time.sleep(0.2)  # PDEATHSIG would have killed it by now
        assert pool.run(request, 10.0)[0]["record"] == {"value": 3}
        assert pool.started == 1
    finally:
        pool.close()


def test_a_harness_error_is_a_sandbox_failure_and_the_sandbox_is_replaced(available):
    pool = ZygotePool(1)
    request = runner.job_request(ADD, [{"kind": "eval", "expr": "add(1, 2)"}], timeout_s=2, memory_mb=128)
    broken = {k: v for k, v in request.items() if k != "memory_mb"}
    try:
        with pytest.raises(SandboxFailure, match="(?s)harness failed.*KeyError: 'memory_mb'"):
            pool.run(broken, 10.0)
        assert pool.run(request, 10.0)[0]["record"] == {"value": 3}
        assert pool.started == 2
    finally:
        pool.close()
