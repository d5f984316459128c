"""Attacks on grpo_ray.sandbox: each is contained, and the verdict is right.

Every attack runs through `run_tests` as a reward function would. "Contained" is checked from
outside (the host's files and environment, the harness still answering the next test) and from
inside (the program prints what it managed to do, and the expected output is the contained
world). Needs bubblewrap (`.ci/run` installs it).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from grpo_ray import sandbox
from grpo_ray.sandbox import run_tests, runner
from grpo_ray.sandbox.zygote import ZygotePool

ADD = "def add(a, b):\n    return a + b\n"
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


def _stdout(code: str, stdin: str = "") -> str:
    """The program's whole stdout, from the harness's report (verdicts keep only a prefix)."""
    return runner.run_job(runner.job_request(code, [{"kind": "script", "stdin": stdin}], timeout_s=2, memory_mb=256))[0]["stdout"]


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


def test_the_job_process_cannot_be_killed_stopped_or_limited():
    code = (
        "import fcntl, os, resource, signal, socket, struct\n"
        "job = os.getppid()\n"
        "a, b = socket.socketpair()\n"
        "def attempt(call):\n"
        "    try:\n        call()\n        return 'DONE'\n"
        "    except OSError as e:\n        return os.strerror(e.errno)\n"
        "print(*[attempt(call) for call in (\n"
        "    lambda: os.kill(job, signal.SIGKILL), lambda: os.kill(job, signal.SIGSTOP),\n"
        "    lambda: os.kill(-job, signal.SIGKILL), lambda: os.kill(-1, signal.SIGKILL), lambda: os.pidfd_open(job),\n"
        "    lambda: resource.prlimit(job, resource.RLIMIT_NOFILE, (0, 0)),\n"
        "    lambda: resource.prlimit(1, resource.RLIMIT_CPU, (1, 1)),\n"
        "    lambda: os.setpriority(os.PRIO_PROCESS, 1, 19), lambda: os.setpriority(os.PRIO_USER, 0, 19),\n"
        "    lambda: os.sched_setaffinity(1, {0}), lambda: os.sched_setscheduler(job, os.SCHED_IDLE, os.sched_param(0)),\n"
        "    lambda: signal.pidfd_send_signal(os.open(f'/proc/{job}', os.O_RDONLY), signal.SIGKILL),\n"
        "    lambda: fcntl.fcntl(a, fcntl.F_SETOWN, job),\n"  # the kernel would signal the owner on I/O
        "    lambda: fcntl.ioctl(a, 0x8901, struct.pack('i', job)),\n"  # FIOSETOWN
        ")], sep='\\n')\n"
    )
    expected = "\n".join(["Operation not permitted"] * 14)
    assert statuses(code, [{"stdin": "", "stdout": expected}, {"stdin": "", "stdout": expected}]) == ["AC", "AC"]


def test_ipc_that_outlives_its_processes_is_refused():
    code = (
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "for call in (lambda: libc.shmget(0, 4096, 0o1600), lambda: libc.semget(0, 1, 0o1600), lambda: libc.msgget(0, 0o1600)):\n"
        "    print(call(), ctypes.get_errno())\n"
    )
    assert statuses(code, [{"stdin": "", "stdout": "-1 1\n-1 1\n-1 1"}]) == ["AC"]


# --- one job cannot see or touch the next: the sandbox is reused ----------------------------------

# What the next job sees in a sandbox that was reused: only the zygote, its job process and
# itself; the three scratch dirs empty, mode 0755, no extended attribute, no block in use.
PRISTINE_PROBE = (
    "import os\n"
    "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
    "print('processes', pids == sorted({1, os.getppid(), os.getpid()}))\n"
    "for d in ('/tmp', '/sandbox', '/dev/shm'):\n"
    "    st, vfs = os.stat(d), os.statvfs(d)\n"
    "    print(d, os.listdir(d), oct(st.st_mode & 0o7777), os.listxattr(d), vfs.f_bfree == vfs.f_blocks)\n"
)
PRISTINE = "processes True\n" + "\n".join(f"{d} [] 0o755 [] True" for d in ("/tmp", "/sandbox", "/dev/shm"))
LEFTOVERS = {
    "files, links, modes and attributes": (
        "import os\n"
        "for d in ('/tmp', '/sandbox', '/dev/shm'):\n"
        "    os.makedirs(d + '/a/b/c')\n    open(d + '/a/b/c/f', 'w').write('x' * 5000)\n"
        "    os.symlink('/usr', d + '/link')\n    os.mkfifo(d + '/fifo')\n    os.chmod(d + '/a/b', 0)\n"
        "    os.setxattr(d, 'user.leak', b'1')\n    os.chmod(d, 0)\n"
    ),
    "a tree deeper than PATH_MAX": (
        "import os\nos.chdir('/tmp')\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n"
        "open('f', 'w').write('bottom')\n"
    ),
    "full scratch dirs": (
        "import os\nfor d in ('/tmp', '/sandbox', '/dev/shm'):\n"
        "    try:\n        for i in range(100):\n            open(f'{d}/f{i}', 'wb').write(b'x' * (4 << 20))\n"
        "    except OSError:\n        pass\n"
    ),
    "daemons": (
        "import os, time\nfor _ in range(3):\n    if os.fork() == 0:\n        os.setsid()\n"
        "        if os.fork() == 0:\n            time.sleep(0.3)\n            open('/tmp/late', 'w').write('x')\n"
        "        os._exit(0)\n"
    ),
    "killing every process it sees, itself last": (
        "import os\nfor pid in sorted((int(p) for p in os.listdir('/proc') if p.isdigit()), key=lambda p: p == os.getpid()):\n"
        "    for sig in (9, 19):\n        try:\n            os.kill(pid, sig)\n        except OSError:\n            pass\n"
    ),
}


@pytest.fixture(scope="module")
def pool():
    """One warm sandbox (started here), so that consecutive jobs share it."""
    pool = ZygotePool(1)
    pool.run(runner.job_request("", [], timeout_s=1, memory_mb=64), 30.0)
    yield pool
    pool.close()


def _report(pool: ZygotePool, code: str, stdin: str = "") -> dict:
    """The harness's report of `code` run once as a script and once as the code of an "exec"
    test (next to the test process), then the first report."""
    specs = [{"kind": "script", "stdin": stdin}, {"kind": "exec", "stmt": "assert True"}]
    return pool.run(runner.job_request(code, specs, timeout_s=2, memory_mb=512), 30.0)[0]


@pytest.mark.parametrize("attack", LEFTOVERS.values(), ids=LEFTOVERS.keys())
def test_nothing_of_a_job_is_left_for_the_next(pool, attack):
    started = pool.started
    _report(pool, attack)
    time.sleep(0.4)  # a daemon that survived would have written /tmp/late by now
    assert _report(pool, PRISTINE_PROBE)["stdout"].strip() == PRISTINE
    assert pool.started == started  # the same sandbox, cleaned, not a fresh one


def test_the_memory_of_a_job_is_not_inherited_by_the_next(pool):
    """The previous job's code, input and output are nowhere in the next job's memory. The
    secrets are searched as two halves, so that the search itself never holds the whole."""
    previous, current = ("zz" + uuid.uuid4().hex for _ in range(2))
    _report(pool, f"SECRET = {previous!r}\nprint(SECRET * 3)", stdin=previous * 100)
    scan = (
        "import ctypes, sys\n"
        "def found(head, tail):\n"
        "    for line in open('/proc/self/maps').read().splitlines():\n"
        "        addresses, perms = line.split()[:2]\n"
        "        if not perms.startswith('r') or 'vvar' in line:\n            continue\n"
        "        start, end = (int(x, 16) for x in addresses.split('-'))\n"
        "        data = ctypes.string_at(start, end - start)\n"
        "        i = data.find(head)\n"
        "        while i >= 0:\n"
        "            if data[i + len(head):i + len(head) + len(tail)] == tail:\n                return True\n"
        "            i = data.find(head, i + 1)\n"
        "    return False\n"
        "own_input = sys.stdin.read()\n"
        f"print(found({previous[:10].encode()!r}, {previous[10:].encode()!r}), found({current[:10].encode()!r}, {current[10:].encode()!r}))\n"
    )
    assert _report(pool, scan, stdin=current)["stdout"] == "False True\n"  # True: the search works


def _kill_sandboxes() -> None:
    """SIGKILL every bubblewrap this process started (its warm sandboxes), and wait until each is dead."""
    killed = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
        except OSError:
            continue
        comm, fields = rest.rsplit(")", 1)
        if comm == "(bwrap" and int(fields.split()[1]) == os.getpid():
            os.kill(int(pid), signal.SIGKILL)
            killed.append(stat)
    assert killed, "no sandbox to kill"
    while any(s.exists() and s.read_text().rsplit(")", 1)[1].split()[0] != "Z" for s in killed):
        time.sleep(0.01)


def test_a_sandbox_that_died_between_jobs_is_replaced_unnoticed():
    assert statuses(ADD, [{"assert": "assert add(1, 2) == 3"}]) == ["AC"]
    _kill_sandboxes()
    assert statuses(ADD, [{"assert": "assert add(1, 2) == 3"}]) == ["AC"]


def test_a_sandbox_that_dies_during_a_job_is_infra_never_the_models_fault():
    slow = ADD + "import time\ntime.sleep(3)\n"
    verdicts = []
    job = threading.Thread(target=lambda: verdicts.extend(run_tests(slow, [{"assert": "assert add(1, 2) == 3"}] * 2, timeout_s=5, memory_mb=256)))
    job.start()
    time.sleep(1.0)  # the job is running (it sleeps 3 s)
    _kill_sandboxes()
    job.join()
    assert [v.status for v in verdicts] == ["INFRA", "INFRA"] and "sandbox" in verdicts[0].detail
    assert statuses(ADD, [{"assert": "assert add(1, 2) == 3"}]) == ["AC"]  # a new one took over


def test_a_ray_reward_actor_runs_one_sandbox_at_a_time(ray_local):
    import ray

    @ray.remote(num_cpus=1)
    def slots() -> int:
        return sandbox.max_parallel()

    assert ray.get(slots.remote()) == 1
