"""The trusted harness: a zygote (PID 1 of a warm sandbox) that forks a fresh job process per job.

Stdlib only; started by `grpo_ray.sandbox.zygote` as `python -I -S -B -c <this file's source>
CONFIG` under bubblewrap + seccomp, as uid 65534, and kept for many jobs. It never decides a
verdict: the job process runs the tests (one forked child each) and reports what happened (exit
status, output, returned values, timing) as plain JSON; the host compares with the expected
outputs, which never enter the sandbox.

Protocol (host <-> zygote), a frame being a 4-byte big-endian length and that much JSON:
    argv[1]: JSON {"arch": AUDIT_ARCH token, "syscalls": {name: number} (GUARDED_SYSCALLS),
                   "scratch": [the scratch dirs to empty after each job]}
    stdout:  "S" + frame {"clean": bool, "job": str}   the zygote is ready for a job: once at start,
                                                      then after each job ("clean": false: it quits)
    stdin:   NONCE (32 bytes) + frame request         one job, read by a fresh job process
             {"code", "tests": [spec], "timeout_s", "memory_mb", "output_limit", "nproc", "nofile",
              "fsize", "stop_on_timeout"}
             spec: {"kind": "script", "stdin": str}   run the code as __main__, stdin given
                   {"kind": "eval", "expr": str}      run the code, then eval expr; its value comes back
                   {"kind": "exec", "stmt": str}      run stmt in a process where the code never ran;
                                                      the code's functions are called over a pipe
    stdout:  "R" + NONCE + frame {"results": [result]} (or {"error": traceback}), the job's report.
    EOF on stdin: the zygote exits.

Why the report cannot be forged by the code under test:
    1. reports go to fd 1, held only by the zygote and the job process; every test child replaces
       fds 0-2 and closes all others before running untrusted code;
    2. the zygote is PID 1 of its own PID namespace (signals from inside are ignored) and every
       process is non-dumpable, so a child cannot open /proc/PID/fd or /proc/PID/mem (ptrace is
       denied by seccomp). Each child runs in its own session under a second seccomp filter, the
       guard (`guard_program`), that refuses signals, prlimit and scheduling changes aimed at the
       zygote or the job process, and kill(-1); the outer filter refuses the indirect ways
       (pidfd_send_signal, a file owned by another process: F_SETOWN). Children are killed
       between tests, so daemons cannot outlive their test;
    3. the nonce sits in a bytearray that each child zeroes before running untrusted code;
    4. for "exec" specs the statement runs in a child forked from the pristine job process, where
       the code never ran: the code's results reach it only as plain data (builtin types), so
       patched builtins, `__eq__`/`__bool__` tricks and early exits in the code cannot make an
       assert pass.

Why one job cannot see another (the sandbox is reused):
    5. the zygote never reads a job: each job process is a fresh fork of it, so no job's code,
       input or output is in the memory the next job's processes are forked from;
    6. after each job the zygote kills every process left in the namespace and empties the scratch
       dirs (files, modes, extended attributes), then checks that they are empty; when it cannot,
       it says so and quits instead of taking another job. SysV IPC and POSIX message queues,
       which outlive processes, are refused by the outer seccomp filter.
"""

import builtins
import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import stat
import struct
import sys
import time
import traceback

NONCE_LEN = 32
MEMORY_ERROR_EXIT = 86  # exit status of a child whose code raised MemoryError
NOT_PLAIN = "is not plain data"  # in the error of a value of another type
_CHUNK = 65536
_MAX_FRAME = 64 << 20
_MAX_DEPTH = 200
_PRISTINE_BUILTINS = dict(vars(builtins))
_NO_MORE_JOBS_EXIT = 3  # a job process that found EOF instead of a job: the zygote exits
# Imported once by the zygote, so that no job pays for them: typing alone costs ~12 ms, and
# HumanEval's prompts import it. Each process gets its own copy (fork), none shares state.
_PRELOADED = ("typing", "re", "collections", "functools", "itertools", "math", "heapq", "bisect", "string")


# --- plain data: builtin types only, tagged JSON ------------------------------------------


class NotPlainData(TypeError):
    pass


def encode(value, depth=0):
    """A JSON-able form of `value`; NotPlainData unless it is built from builtin types only."""
    if depth > _MAX_DEPTH:
        raise NotPlainData("nested too deeply")
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return value
    if kind is float:
        return value if value == value and value not in (float("inf"), float("-inf")) else {"__x": repr(value)}
    if kind is list:
        return [encode(v, depth + 1) for v in value]
    if kind is tuple:
        return {"__t": [encode(v, depth + 1) for v in value]}
    if kind is dict:
        return {"__d": [[encode(k, depth + 1), encode(v, depth + 1)] for k, v in value.items()]}
    if kind is set:
        return {"__s": [encode(v, depth + 1) for v in value]}
    if kind is frozenset:
        return {"__f": [encode(v, depth + 1) for v in value]}
    if kind is bytes:
        return {"__b": value.hex()}
    if kind is complex:
        return {"__c": [encode(value.real, depth + 1), encode(value.imag, depth + 1)]}
    raise NotPlainData(f"a value of type {kind.__name__!r} {NOT_PLAIN} (builtin types only)")


def decode(data, depth=0):
    """The inverse of `encode`; ValueError on anything `encode` cannot produce."""
    if depth > _MAX_DEPTH:
        raise ValueError("nested too deeply")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [decode(v, depth + 1) for v in data]
    if kind is dict and len(data) == 1:
        (tag, body), = data.items()
        if tag == "__x" and body in ("nan", "inf", "-inf"):
            return float(body)
        if tag == "__b" and type(body) is str:
            return bytes.fromhex(body)
        if type(body) is not list:
            raise ValueError(f"bad tag {tag!r}")
        items = [decode(v, depth + 1) for v in body]
        if tag == "__t":
            return tuple(items)
        if tag == "__s":
            return set(items)
        if tag == "__f":
            return frozenset(items)
        if tag == "__c" and len(items) == 2 and all(type(x) in (int, float) for x in items):
            return complex(items[0], items[1])
        if tag == "__d" and all(type(kv) is list and len(kv) == 2 for kv in items):
            return {k: v for k, v in items}
    raise ValueError(f"not plain data: {str(data)[:80]!r}")


# --- length-prefixed frames over pipes ------------------------------------------------------


def frame(obj):
    """`obj` as a frame: its JSON's length (4 bytes, big-endian), then the JSON."""
    data = json.dumps(obj).encode()
    return len(data).to_bytes(4, "big") + data


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_frame(fd, obj):
    write_all(fd, frame(obj))


def read_exact(fd, n):
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, _CHUNK))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd):
    size = int.from_bytes(read_exact(fd, 4), "big")
    if size > _MAX_FRAME:
        raise ValueError("frame too large")
    return json.loads(read_exact(fd, size))


# --- the guard: a seccomp filter that keeps test children off the zygote and the job process ---

# Syscalls that act on another process by pid, which the guard restricts (the host resolves
# their numbers for its architecture and passes them in CONFIG). Between processes of one uid
# the kernel allows them all: without the guard a child could kill or stop the job process, or
# lower the zygote's rlimits (prlimit64) or priority for every later job.
_PID_FIRST = (
    "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "prlimit64",
    "sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr",
)  # fmt: skip
GUARDED_SYSCALLS = ("kill", *_PID_FIRST, "setpriority", "ioprio_set")
_PRIO_PROCESS, _IOPRIO_WHO_PROCESS = 0, 1  # the `which` of setpriority and ioprio_set for one process
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_RET_ALLOW, _RET_EPERM = 0x7FFF0000, 0x00050000 | errno.EPERM
_ARCH_OFFSET, _NR_OFFSET = 4, 0  # in struct seccomp_data
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2
_PR_SET_DUMPABLE, _PR_SET_CHILD_SUBREAPER = 4, 36
_LIBC = ctypes.CDLL(None, use_errno=True)


def _guard_rules(pids):
    """{syscall: [(argument, "eq" | "ne", value)]}: the call fails with EPERM when any condition holds."""
    aimed = [(0, "eq", pid) for pid in pids]
    rules = {name: aimed for name in _PID_FIRST}
    rules["kill"] = aimed + [(0, "eq", -1)] + [(0, "eq", -pid) for pid in pids]  # -1: all; -pid: its group
    rules["setpriority"] = [(0, "ne", _PRIO_PROCESS)] + [(1, "eq", pid) for pid in pids]
    rules["ioprio_set"] = [(0, "ne", _IOPRIO_WHO_PROCESS)] + [(1, "eq", pid) for pid in pids]
    return rules


def _arg_offset(index):
    """Offset of the low 32 bits of syscall argument `index` in struct seccomp_data (pid_t and
    int arguments live there; the kernel ignores the high half)."""
    return 16 + 8 * index + (4 if sys.byteorder == "big" else 0)


def guard_program(arch, syscalls, pids):
    """The guard as a BPF program (struct sock_filter[]): EPERM for `_guard_rules(pids)`.

    arch: the AUDIT_ARCH token the numbers in `syscalls` ({name: number}) belong to; another
    architecture's calls fail (the outer filter kills them first anyway). Layout: check arch,
    load nr, one jump per guarded syscall to its block of (load argument, compare) pairs.
    """
    rules = [(syscalls[name], conditions) for name, conditions in _guard_rules(pids).items() if name in syscalls]
    code = [("ld", _ARCH_OFFSET), ("jeq", arch, None, "deny"), ("ld", _NR_OFFSET)]
    code += [("jeq", number, i, None) for i, (number, _) in enumerate(rules)]
    code.append(("ret", _RET_ALLOW))
    for i, (_, conditions) in enumerate(rules):
        code.append(("label", i))
        for index, op, value in conditions:
            code.append(("ld", _arg_offset(index)))
            match, differ = ("deny", None) if op == "eq" else (None, "deny")
            code.append(("jeq", value & 0xFFFFFFFF, match, differ))
        code.append(("ret", _RET_ALLOW))
    code += [("label", "deny"), ("ret", _RET_EPERM)]
    return _assemble(code)


def _assemble(code):
    """BPF bytes from ("ld", offset), ("ret", value), ("jeq", k, true_label, false_label) and
    ("label", name) entries; a label of None is the next instruction."""
    labels, pc = {}, 0
    for entry in code:
        if entry[0] == "label":
            labels[entry[1]] = pc
        else:
            pc += 1
    program, pc = [], 0
    for entry in code:
        if entry[0] == "label":
            continue
        if entry[0] == "jeq":
            _, k, true, false = entry
            jt, jf = (0 if label is None else labels[label] - pc - 1 for label in (true, false))
            if not (0 <= jt < 256 and 0 <= jf < 256):
                raise ValueError("guard program too long for 8-bit jumps")
            program.append(struct.pack("=HBBI", _BPF_JEQ_K, jt, jf, k))
        else:
            program.append(struct.pack("=HBBI", _BPF_LD_W_ABS if entry[0] == "ld" else _BPF_RET_K, 0, 0, entry[1]))
        pc += 1
    return b"".join(program)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Guard:
    """A guard program ready to load: built once per job, loaded by each child (`install`)."""

    def __init__(self, program):
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // 8, ctypes.addressof(self._buffer))

    def install(self):
        """Load the filter into this process (and every process it forks); OSError when refused."""
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)
        _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._fprog))


def _prctl(option, arg2, arg3=0):
    if _LIBC.prctl(option, arg2, arg3, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


# --- children -------------------------------------------------------------------------------


def _enter_child(fd_map, job):
    """In a fresh child of `job`: fds per fd_map {target: source} (everything else closed), its
    own session, rlimits set, the guard loaded."""
    job.nonce[:] = bytes(len(job.nonce))  # 3. the nonce never reaches untrusted code
    high = {target: fcntl.fcntl(source, fcntl.F_DUPFD, 100 + target) for target, source in fd_map.items()}
    for target, source in high.items():
        os.dup2(source, target)  # dup2'd fds are inheritable; only the child holds these
    os.closerange(max(fd_map) + 1, 1 << 20)
    os.setsid()  # kill(0) reaches its own processes only
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    for name, value in job.limits.items():
        resource.setrlimit(getattr(resource, name), (value, value))
    job.guard.install()


def _exit_code(error):
    """Exit status for a SystemExit (as the interpreter would), printing its message if any."""
    code = error.code
    if code is None:
        return 0
    if type(code) is int:
        return code & 0xFF
    try:
        sys.stderr.write(f"{code}\n")
    except Exception:
        pass
    return 1


def _run_code(code, name):
    """Compile and run the untrusted code in a fresh namespace; returns the namespace."""
    namespace = {"__name__": name, "__builtins__": builtins}
    exec(compile(code, "<solution>", "exec"), namespace)
    return namespace


def _child_main(body):
    """Run body() in a child and exit: 0, SystemExit's code, MEMORY_ERROR_EXIT, or 1 on error."""
    status = 1
    try:
        body()
        status = 0
    except SystemExit as error:
        status = _exit_code(error)
    except MemoryError:
        status = MEMORY_ERROR_EXIT
    except BaseException:
        try:
            traceback.print_exc()
        except BaseException:
            pass
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    os._exit(status)


def _script_child(code):
    _child_main(lambda: _run_code(code, "__main__"))


def _eval_child(code, expr):
    def body():
        namespace = _run_code(code, "solution")
        compiled = compile(expr, "<test>", "eval")
        try:
            record = {"value": encode(eval(compiled, namespace))}
        except MemoryError:
            raise
        except NotPlainData as error:
            record = {"not_plain": str(error)}
        except BaseException as error:  # the code's failure, reported; SystemExit included
            record = {"error": _describe(error)}
        write_frame(3, record)

    _child_main(body)


def _server_child(code):
    """The code's side of an "exec" test: load the code, then answer lookups and calls from fd 3 on fd 4."""

    def body():
        namespace = _run_code(code, "solution")
        while True:
            try:
                request = read_frame(3)
            except EOFError:
                return
            write_frame(4, _serve(namespace, request))

    _child_main(body)


def _serve(namespace, request):
    name = request.get("name")
    if name not in namespace:
        return {"missing": True}
    target = namespace[name]
    try:
        if request["op"] == "lookup":
            if callable(target):
                return {"callable": True}
            return {"value": encode(target)}
        args = decode(request["args"])
        kwargs = decode(request["kwargs"])
        return {"value": encode(target(*args, **kwargs))}
    except MemoryError:
        raise
    except NotPlainData as error:
        return {"not_plain": str(error)}
    except BaseException as error:
        return {"raise": type(error).__name__, "message": _describe(error)}


def _describe(error):
    try:
        return f"{type(error).__name__}: {str(error)[:300]}"
    except BaseException:
        return type(error).__name__


class RemoteError(Exception):
    """The code failed in a way the test cannot catch (not plain data, or it died)."""


class _Remote:
    """A function of the code, called from the test process over the pipes."""

    def __init__(self, name):
        self._name = name

    def __call__(self, *args, **kwargs):
        _request({"op": "call", "name": self._name, "args": encode(list(args)), "kwargs": encode(kwargs)})
        return _answer(self._name)

    def __repr__(self):
        return f"<solution function {self._name}>"


def _request(frame):
    try:
        write_frame(3, frame)
    except OSError:  # EPIPE: the solution's process is gone
        raise RemoteError(f"the solution exited before {frame['name']} could be used") from None


def _answer(name):
    try:
        reply = read_frame(4)
    except (EOFError, OSError):
        raise RemoteError(f"the solution exited while computing {name}") from None
    if "value" in reply:
        return decode(reply["value"])
    if "raise" in reply:
        exc_type = _PRISTINE_BUILTINS.get(reply["raise"])
        if isinstance(exc_type, type) and issubclass(exc_type, Exception) and exc_type is not AssertionError:
            raise exc_type(reply.get("message", ""))
        raise RemoteError(reply.get("message", reply["raise"]))
    if "missing" in reply:
        raise NameError(f"name {name!r} is not defined")
    raise RemoteError(f"{name}: {reply.get('not_plain', 'bad reply')}")


class _TestGlobals(dict):
    """Globals of an "exec" test: pristine builtins, then the code's names, fetched on first use."""

    def __missing__(self, name):
        if name in _PRISTINE_BUILTINS:
            return _PRISTINE_BUILTINS[name]
        _request({"op": "lookup", "name": name})
        try:
            reply = read_frame(4)
        except (EOFError, OSError):
            raise RemoteError(f"the solution exited before defining {name}") from None
        if reply.get("callable"):
            value = _Remote(name)
        elif "value" in reply:
            value = decode(reply["value"])
        elif "missing" in reply:
            raise NameError(f"name {name!r} is not defined")
        else:
            raise RemoteError(f"{name}: {reply.get('not_plain', 'bad reply')}")
        self[name] = value
        return value


def _test_child(stmt):
    """The trusted side of an "exec" test (4.): never runs the code, only talks to it."""

    def body():
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a dead solution is an error, not our death
        namespace = _TestGlobals(__name__="test", __builtins__=_PRISTINE_BUILTINS)
        try:
            exec(compile(stmt, "<test>", "exec"), namespace)
            record = {"ok": True}
        except AssertionError as error:
            record = {"assertion": _describe(error)}
        except MemoryError:
            record = {"error": "MemoryError"}
        except BaseException as error:
            record = {"error": _describe(error)}
        write_frame(5, record)

    _child_main(body)


# --- supervision ----------------------------------------------------------------------------


def _fork(fd_map, job, target, *args):
    pid = os.fork()
    if pid == 0:
        try:
            _enter_child(fd_map, job)
            target(*args)
        finally:
            os._exit(1)
    return pid


def _kill_others():
    """SIGKILL every process in the namespace but this one and PID 1, and reap them.

    Called by the job process (a subreaper: orphans of its tests come back to it) after each
    test, and by the zygote after each job. kill(-1) again after each reap, in case one forked.
    """
    while True:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _supervise(main_pid, readers, stdin_data, stdin_fd, deadline, output_limit):
    """Pump pipes until main_pid exits or the deadline; returns (status, rusage, outputs, flag)."""
    poller = select.poll()
    pidfd = os.pidfd_open(main_pid)
    poller.register(pidfd, select.POLLIN)
    outputs = {fd: bytearray() for fd in readers}
    for fd in readers:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    pending = memoryview(stdin_data) if stdin_fd is not None else None
    if stdin_fd is not None:
        os.set_blocking(stdin_fd, False)
        if pending:
            poller.register(stdin_fd, select.POLLOUT)
        else:
            os.close(stdin_fd)
            stdin_fd = None
    flag, exited = None, False
    while not exited:
        left = deadline - time.monotonic()
        if left <= 0:
            flag = "timeout"
            break
        for fd, event in poller.poll(left * 1000):
            if fd == pidfd:
                exited = True
            elif fd == stdin_fd:
                try:
                    pending = pending[os.write(fd, pending[:_CHUNK]):]
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:  # the child closed its stdin
                    pending = pending[:0]
                if not pending:
                    poller.unregister(fd)
                    os.close(fd)
                    stdin_fd = None
            else:
                if not _drain(fd, outputs, readers, poller):
                    continue
                if sum(len(outputs[f]) for f in readers if readers[f] == "stdout") > output_limit:
                    flag = "output_limit"
                    exited = True
        if flag:
            break
    if exited and not flag:
        for fd in readers:  # what the main child wrote before it exited
            _drain(fd, outputs, readers, poller)
    if flag:
        try:
            os.kill(main_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, status, rusage = os.wait4(main_pid, 0)
    os.close(pidfd)
    if stdin_fd is not None:
        os.close(stdin_fd)
    return status, rusage, outputs, flag


def _drain(fd, outputs, readers, poller):
    """Read what fd holds now (stderr kept to its last 4 KiB); False once it hit EOF."""
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            chunk = b""
        if not chunk:
            try:
                poller.unregister(fd)
            except KeyError:
                pass
            return False
        buf = outputs[fd]
        buf += chunk
        if readers[fd] == "stderr" and len(buf) > 8192:
            del buf[:-4096]
        if readers[fd] == "stdout" and len(buf) > (64 << 20):
            return True


class Job:
    """One job in its job process: the request, the rlimits of its children, the nonce they
    zero and the guard they load."""

    def __init__(self, request, nonce, guard):
        self.request, self.nonce, self.guard = request, nonce, guard
        self.limits = {
            "RLIMIT_CPU": int(float(request["timeout_s"])) + 1,
            "RLIMIT_AS": int(request["memory_mb"]) << 20,
            "RLIMIT_NPROC": int(request["nproc"]),
            "RLIMIT_FSIZE": int(request["fsize"]),
            "RLIMIT_NOFILE": int(request["nofile"]),
            "RLIMIT_CORE": 0,
        }

    def run(self):
        """The result of each test, in order (after a timeout, "skipped" with stop_on_timeout)."""
        results = []
        for spec in self.request["tests"]:
            if self.request.get("stop_on_timeout") and results and results[-1]["flag"] in ("timeout", "skipped"):
                results.append({"flag": "skipped", "wall_s": 0.0, "cpu_s": 0.0, "exit_code": None, "signal": None})
            else:
                results.append(run_one(spec, self))
        return results


def run_one(spec, job):
    """Run one test spec of `job`; its result record (outputs, status, value, timing)."""
    code = job.request["code"]
    timeout_s = float(job.request["timeout_s"])
    kind = spec["kind"]
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe()
    opened = [out_r, out_w, err_r, err_w, in_r, in_w]
    fd_map = {0: in_r, 1: out_w, 2: err_w}
    readers = {out_r: "stdout", err_r: "stderr"}
    record_fd, stdin_data = None, b""
    start = time.monotonic()
    if kind == "script":
        stdin_data = spec.get("stdin", "").encode()
        main_pid = _fork(fd_map, job, _script_child, code)
    elif kind == "eval":
        res_r, res_w = os.pipe()
        opened += [res_r, res_w]
        main_pid = _fork({**fd_map, 3: res_w}, job, _eval_child, code, spec["expr"])
        readers[res_r] = "record"
        record_fd = res_r
    else:
        req_r, req_w = os.pipe()  # test -> code
        rep_r, rep_w = os.pipe()  # code -> test
        res_r, res_w = os.pipe()  # test -> harness
        t_out_r, t_out_w = os.pipe()
        opened += [req_r, req_w, rep_r, rep_w, res_r, res_w, t_out_r, t_out_w]
        _fork({**fd_map, 3: req_r, 4: rep_w}, job, _server_child, code)
        test_fds = {0: in_r, 1: t_out_w, 2: t_out_w, 3: req_w, 4: rep_r, 5: res_w}
        main_pid = _fork(test_fds, job, _test_child, spec["stmt"])
        readers[res_r] = "record"
        readers[t_out_r] = "stderr"
        record_fd = res_r
    for fd in opened:
        if fd not in readers and fd != in_w:
            os.close(fd)
    status, rusage, outputs, flag = _supervise(
        main_pid, readers, stdin_data, in_w, start + timeout_s, int(job.request["output_limit"])
    )
    wall = time.monotonic() - start
    _kill_others()  # daemons, the code's server process, grandchildren
    for fd in readers:
        os.close(fd)
    result = {
        "wall_s": round(wall, 6),
        "cpu_s": round(rusage.ru_utime + rusage.ru_stime, 6),
        "maxrss_kb": rusage.ru_maxrss,
        "flag": flag,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "stdout": bytes(next(outputs[fd] for fd in readers if readers[fd] == "stdout")).decode("utf-8", "replace"),
        "stderr": bytes(b"".join(outputs[fd] for fd in readers if readers[fd] == "stderr")[-2000:]).decode(
            "utf-8", "replace"
        ),
    }
    if record_fd is not None:
        raw = bytes(outputs[record_fd])
        try:
            size = int.from_bytes(raw[:4], "big")
            result["record"] = json.loads(raw[4 : 4 + size]) if len(raw) == 4 + size else None
        except ValueError:
            result["record"] = None
    return result


# --- the job process ---------------------------------------------------------------------


def _job_process(config):
    """Run one job in a fresh fork of the zygote: read it from fd 0, run it, report on fd 1.

    Never returns: exits 0 after a job, _NO_MORE_JOBS_EXIT at EOF. A subreaper in its own process
    group: its tests' orphans come back to it, and the guard of its children names its pid.
    """
    status = 1
    try:
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        os.setpgid(0, 0)
        nonce = bytearray(NONCE_LEN)
        if _read_nonce(nonce):
            _run_and_report(config, nonce)
            status = 0
        else:
            status = _NO_MORE_JOBS_EXIT
    finally:
        os._exit(status)


def _run_and_report(config, nonce):
    """Read the job after its nonce, run it, write "R" + nonce + report (the error, if it failed)."""
    try:
        guard = Guard(guard_program(config["arch"], config["syscalls"], (1, os.getpid())))
        report = {"results": Job(read_frame(0), nonce, guard).run()}
    except Exception:
        report = {"error": traceback.format_exc()[-2000:]}
    write_all(1, b"R" + bytes(nonce) + frame(report))


def _read_nonce(nonce):
    """Fill `nonce` (a bytearray, never copied into other objects) from fd 0; False at EOF."""
    view, got = memoryview(nonce), 0
    while got < len(nonce):
        n = os.readv(0, [view[got:]])
        if n == 0:
            return False
        got += n
    return True


# --- emptying the scratch dirs between jobs ----------------------------------------------------


def _wipe(scratch):
    """Empty each scratch dir ({path: mode}) and restore its mode, dropping its extended
    attributes; True when all are then pristine (no entry, no block in use, no attribute).

    Runs after every process of the job is dead, so nothing changes under it; links are never
    followed. Not recursive: deep trees are flattened into the root (`_flatten`), two fds at a time.
    """
    try:
        for path, mode in scratch.items():
            os.chmod(path, mode)  # the job may have made it unreadable
            root = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                for name in os.listxattr(root):
                    os.removexattr(root, name)
                _empty(root)
            finally:
                os.close(root)
        return all(_pristine(path) for path in scratch)
    except OSError:
        return False


def _empty(root):
    """Remove every entry of the directory open at `root`."""
    moved = 0
    for batch in _batches(root):
        for name, is_dir in batch:
            if is_dir:
                moved = _flatten(root, name, moved)
                os.rmdir(name, dir_fd=root)
            else:
                os.unlink(name, dir_fd=root)


def _flatten(root, name, moved):
    """Unlink the files of root/name and move its subdirectories up into root (as ".wipeN");
    returns the last N used."""
    os.chmod(name, 0o700, dir_fd=root)
    directory = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root)
    try:
        for batch in _batches(directory):
            for child, is_dir in batch:
                if not is_dir:
                    os.unlink(child, dir_fd=directory)
                    continue
                os.chmod(child, 0o700, dir_fd=directory)  # moving a directory rewrites its ".."
                while True:
                    moved += 1
                    try:
                        os.rename(child, f".wipe{moved}", src_dir_fd=directory, dst_dir_fd=root)
                        break
                    except OSError as error:  # the name is taken by a file or a non-empty directory
                        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                            raise
    finally:
        os.close(directory)
    return moved


def _batches(directory):
    """Up to 4096 (name, is_dir) entries at a time of the directory open at `directory`, until
    it is empty: the caller removes each batch before the next (memory stays bounded)."""
    while True:
        with os.scandir(directory) as entries:
            batch = [(entry.name, entry.is_dir(follow_symlinks=False)) for _, entry in zip(range(4096), entries)]
        if not batch:
            return
        yield batch


def _pristine(path):
    usage = os.statvfs(path)
    return not os.listdir(path) and usage.f_bfree == usage.f_blocks and not os.listxattr(path)


# --- the zygote ----------------------------------------------------------------------------


def _describe_status(status):
    """A wait status in words, for the host's error messages."""
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


def main():
    """The zygote: fork a job process, wait for it, clean up, say so; until EOF or a failed wipe."""
    config = json.loads(sys.argv[1])
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as PID 1, signals without a handler are dropped
    _prctl(_PR_SET_DUMPABLE, 0)  # 2. no /proc/PID/fd, /proc/PID/mem for the children (inherited by forks)
    for name in _PRELOADED:
        __import__(name)
    scratch = {path: stat.S_IMODE(os.stat(path).st_mode) for path in config["scratch"]}
    write_all(1, b"S" + frame({"clean": True, "job": "none yet"}))
    while True:
        pid = os.fork()
        if pid == 0:
            _job_process(config)
        _, status = os.waitpid(pid, 0)
        _kill_others()
        clean = _wipe(scratch)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == _NO_MORE_JOBS_EXIT:
            return
        write_all(1, b"S" + frame({"clean": clean, "job": _describe_status(status)}))
        if not clean:
            return


if __name__ == "__main__":
    main()
