"""Attacks on grpo_ray.sandbox: each is contained, and the verdict is right.

Every attack runs through `run_tests` as a reward function would. "Contained" is checked from
outside (the host's files and environment, the harness still answering the next test) and from
inside (the program prints what it managed to do, and the expected output is the contained
world). Needs bubblewrap (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import time
import uuid

import pytest

from grpo_ray import sandbox
from grpo_ray.sandbox import run_tests

LIMITS = {"timeout_s": 1.0, "memory_mb": 256}
ANY_OUTPUT = [{"stdin": "", "stdout": "<never printed>"}]
CONTAINED_FAILURES = {"RE", "TLE", "MLE", "OLE", "WA"}


@pytest.fixture(scope="module", autouse=True)
def available():
    sandbox.check_available()  # fails with the install command rather than skipping


def statuses(code, tests, **limits):
    return [v.status for v in run_tests(code, tests, **{**LIMITS, **limits})]


def test_fork_bomb_is_capped_and_times_out():
    start = time.monotonic()
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    assert statuses(code, ANY_OUTPUT) == ["TLE"]
    assert time.monotonic() - start < 10


def test_thread_bomb_hits_the_process_limit():
    code = "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()\n"
    assert statuses(code, ANY_OUTPUT) == ["RE"]


@pytest.mark.parametrize("code", ["x = bytearray(10**10)", "a = []\nwhile True:\n    a.append(' ' * 10**7)"])
def test_memory_bombs_are_mle(code):
    assert statuses(code, ANY_OUTPUT) == ["MLE"]


def test_infinite_loop_ignoring_signals_is_killed():
    code = (
        "import signal\nfor s in (signal.SIGTERM, signal.SIGXCPU, signal.SIGINT, signal.SIGALRM):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n"
    )
    start = time.monotonic()
    assert statuses(code, ANY_OUTPUT) == ["TLE"]
    assert time.monotonic() - start < 5


def test_no_network_through_sockets_or_raw_syscalls():
    code = (
        "import ctypes, socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 80), timeout=0.5)\n    print('connected')\n"
        "except OSError as e:\n    print(type(e).__name__)\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.syscall(41, 2, 1, 0), ctypes.get_errno())\n"  # socket(AF_INET, SOCK_STREAM) on x86_64
        "print(libc.syscall(41, 17, 3, 0), ctypes.get_errno())\n"  # a raw AF_PACKET socket
    )
    if os.uname().machine != "x86_64":
        pytest.skip("syscall numbers are x86_64's")
    assert statuses(code, [{"stdin": "", "stdout": "PermissionError\n-1 1\n-1 1"}]) == ["AC"]


def test_host_secrets_are_out_of_reach(monkeypatch):
    monkeypatch.setenv("GRPO_RAY_TEST_SECRET", "hunter2-token")
    code = (
        "import os\n"
        "for p in ['/etc/shadow', '/etc/passwd', os.path.expanduser('~/.ssh/id_rsa'), '/root/.ssh/id_rsa',\n"
        "          '/proc/1/environ', '/proc/1/mem', '/proc/1/fd/1', '/work/main/setup.cfg', '/home']:\n"
        "    try:\n        open(p, 'rb').read(64)\n        print(p, 'READ')\n"
        "    except OSError as e:\n        print(p, type(e).__name__)\n"
        "print(sorted(os.environ), os.getuid(), os.getgid())\n"
        "print(os.environ)\n"
    )
    verdict = run_tests(code, ANY_OUTPUT, **LIMITS)[0]
    assert verdict.status == "WA" and "hunter2" not in verdict.detail and "READ" not in verdict.detail
    output = _stdout(code)
    assert "hunter2" not in output and "READ" not in output
    assert "['HOME', 'LANG', 'PATH', 'PWD'] 65534 65534" in output


def _stdout(code: str) -> str:
    """The program's whole stdout, from the harness's report (verdicts keep only a prefix)."""
    from grpo_ray.sandbox import runner

    results, why = runner._run_sandbox(
        {"code": code, "tests": [{"kind": "script", "stdin": ""}], "timeout_s": 2, "memory_mb": 256, "output_limit": 1 << 20,
         "nproc": runner.NPROC_LIMIT, "nofile": runner.NOFILE_LIMIT, "fsize": runner.FSIZE_LIMIT},
        30.0,
    )  # fmt: skip
    assert results is not None, why
    return results[0]["stdout"]


def test_writes_outside_the_scratch_dirs_fail_and_nothing_reaches_the_host(tmp_path):
    marker = f"grpo_ray_escape_{uuid.uuid4().hex}"
    code = (
        "import os\n"
        f"for p in ['/usr/{marker}', '/{marker}', '/dev/{marker}', '{tmp_path}/{marker}', '/proc/sys/kernel/hostname']:\n"
        "    try:\n        open(p, 'w').write('x')\n        print('WROTE', p)\n"
        "    except OSError as e:\n        print(type(e).__name__)\n"
        f"open('/tmp/{marker}', 'w').write('x')\nopen('/sandbox/{marker}', 'w').write('x')\nprint('scratch ok')\n"
    )
    output = _stdout(code)
    assert "WROTE" not in output and "scratch ok" in output
    for host_path in (f"/tmp/{marker}", f"/{marker}", f"/usr/{marker}", str(tmp_path / marker)):
        assert not os.path.exists(host_path)


def test_filling_the_disk_stops_at_the_scratch_size():
    many_files = "i = 0\nwhile True:\n    open(f'/sandbox/f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1\n"
    one_file = "open('/tmp/big', 'wb').write(b'x' * (100 << 20))"
    assert statuses(many_files, ANY_OUTPUT) == ["RE"]  # ENOSPC
    assert statuses(one_file, ANY_OUTPUT) == ["OLE"]  # RLIMIT_FSIZE


def test_killing_or_tracing_the_harness_fails_and_it_keeps_answering():
    code = (
        "import ctypes, os, signal\n"
        "for pid in (1, os.getppid(), -1):\n"
        "    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT):\n"
        "        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.ptrace(16, 1, 0, 0), ctypes.get_errno())\n"  # PTRACE_ATTACH to the harness: EPERM
        "print('alive')\n"
    )
    tests = [{"stdin": "", "stdout": "-1 1\nalive"}, {"stdin": "", "stdout": "-1 1\nalive"}]
    assert statuses(code, tests) == ["AC", "AC"]


def test_huge_stdout_is_ole():
    assert statuses("while True:\n    print('x' * 10000)", ANY_OUTPUT) == ["OLE"]


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"])
def test_exiting_before_the_asserts_fails_them(exit_call):
    code = exit_call + "\ndef f():\n    return 1\n"
    assert statuses(code, [{"assert": "assert f() == 2"}, {"assert": "assert abs(f() - 2) < 0.5"}]) == ["RE", "RE"]


def test_printing_or_writing_fake_result_records_fails():
    code = (
        "import json, os\n"
        "frame = json.dumps({'ok': True}).encode()\n"
        "for fd in range(1, 8):\n"
        "    try:\n        os.write(fd, len(frame).to_bytes(4, 'big') + frame)\n    except OSError:\n        pass\n"
        "print(json.dumps({'results': [{'flag': None, 'exit_code': 0, 'record': {'ok': True}}]}))\n"
        "def f():\n    return 1\n"
        "os._exit(0)\n"
    )
    assert statuses(code, [{"assert": "assert f() == 2"}, {"assert": "assert abs(f() - 2) < 0.5"}]) == ["RE", "RE"]


def test_objects_that_equal_everything_are_not_answers():
    code = (
        "class Any:\n"
        "    __eq__ = __lt__ = __gt__ = __le__ = __ge__ = lambda s, o: True\n"
        "    __bool__ = lambda s: True\n"
        "    __sub__ = __rsub__ = __abs__ = __add__ = lambda s, *o: s\n"
        "def f(x):\n    return Any()\n"
    )
    tests = [{"assert": "assert f(1) == 2"}, {"assert": "assert f(1)"}, {"assert": "assert abs(f(1) - 2) < 1e-6"}]
    assert statuses(code, tests) == ["WA", "WA", "WA"]


def test_patching_builtins_changes_nothing():
    code = (
        "import builtins\n"
        "builtins.abs = lambda x: 0\n"
        "builtins.AssertionError = type('Swallowed', (BaseException,), {})\n"
        "def f(x):\n    return 7\n"
    )
    tests = [{"assert": "assert f(1) == 2"}, {"assert": "assert abs(f(1) - 2) < 1e-6"}, {"assert": "assert abs(f(1) - 7) < 1e-6"}]
    assert statuses(code, tests) == ["WA", "WA", "AC"]


def test_patching_json_or_the_harness_only_breaks_the_code_itself():
    code = (
        "import json, sys\n"
        "json.dumps = lambda *a, **k: '{\"ok\": true}'\n"
        "harness = sys.modules['__main__']\n"
        "harness.encode = lambda value, depth=0: 2\n"
        "harness.decode = lambda data, depth=0: 2\n"
        "def f(x):\n    return 7\n"
    )
    tests = [{"assert": "assert f(1) == 2"}, {"assert": "assert abs(f(1) - 2) < 1e-6"}]
    assert statuses(code, tests) == ["RE", "RE"]  # its replies are no longer readable


def test_nested_namespaces_are_refused():
    code = (
        "import ctypes, subprocess\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.unshare(0x10000000), ctypes.get_errno())\n"  # CLONE_NEWUSER
        "print(libc.unshare(0x20000), ctypes.get_errno())\n"  # CLONE_NEWNS
        "r = subprocess.run(['unshare', '-r', 'id'], capture_output=True)\n"
        "print(r.returncode != 0)\n"
    )
    assert statuses(code, [{"stdin": "", "stdout": "-1 1\n-1 1\nTrue"}], timeout_s=3) == ["AC"]


def test_daemons_do_not_outlive_their_test():
    code = (
        "import os, sys, time\n"
        "if sys.stdin.read() == 'spawn':\n"
        "    if os.fork() == 0:\n"
        "        os.setsid()\n        time.sleep(0.8)\n        open('/tmp/daemon', 'w').write('x')\n        os._exit(0)\n"
        "else:\n"
        "    time.sleep(1.2)\n    print(os.path.exists('/tmp/daemon'))\n"
    )
    verdicts = run_tests(code, [{"stdin": "spawn", "stdout": ""}, {"stdin": "check", "stdout": "False"}], timeout_s=3, memory_mb=256)
    assert [v.status for v in verdicts] == ["AC", "AC"]
    assert verdicts[0].time_s < 0.8  # the daemon held stdout open; the test did not wait for it


def test_segfault_and_deep_recursion_are_contained():
    assert statuses("import ctypes\nctypes.string_at(0)", ANY_OUTPUT) == ["RE"]
    assert statuses("def f(n):\n    return f(n + 1)\nf(0)", ANY_OUTPUT) == ["RE"]
    deep = "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1) + 1\nf(0)"
    assert statuses(deep, ANY_OUTPUT)[0] in CONTAINED_FAILURES - {"WA"}


def test_correct_solutions_still_pass_after_attacks():
    code = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(*map(int, input().split())))"
    assert statuses(code, [{"stdin": "2 3", "stdout": "5"}, {"assert": "assert add(2, 3) == 5"}]) == ["AC", "AC"]


def test_a_ray_reward_actor_runs_one_sandbox_at_a_time(ray_local):
    import ray

    @ray.remote(num_cpus=1)
    def slots() -> int:
        return sandbox.max_parallel()

    assert ray.get(slots.remote()) == 1
