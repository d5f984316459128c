"""Warm sandboxes: long-lived bubblewrap sandboxes whose harness forks a fresh process per job.

Starting bubblewrap and an interpreter costs ~30 ms, more than the tests of a typical job. A
zygote pays it once: one bubblewrap sandbox whose harness (PID 1, see `harness.py`) waits for
jobs on its stdin, forks a fresh job process for each, and after each job kills what is left and
empties its scratch dirs. A process keeps `max_parallel()` zygotes (one in a RewardActor) and
`run_job` lends one per job. A zygote that fails a job in any way (it died, missed the deadline,
broke the protocol, could not clean up) is never used again: the next job starts a new one.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import select
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

from grpo_ray.sandbox import harness as _harness
from grpo_ray.sandbox.seccomp import SeccompUnavailable, filter_program, native_arch, syscall_numbers

__all__ = ["SCRATCH_DIRS", "SandboxFailure", "Zygote", "ZygotePool", "bwrap_path", "run_job", "shutdown"]

NOBODY = 65534  # the sandbox's uid and gid, inside and (when we start as root) outside
SCRATCH_MB = 16  # size of each tmpfs
SCRATCH_DIRS = ("/tmp", "/sandbox", "/dev/shm")  # the writable places, emptied after each job
STARTUP_S = 10.0  # allowance for bubblewrap and the interpreter to start on a busy host
CLEANUP_S = 10.0  # allowance for the zygote to empty its scratch dirs after a job
_HARNESS_SOURCE = Path(_harness.__file__).read_text()
_MAX_REPORT = 256 << 20


class SandboxFailure(RuntimeError):
    """The sandbox itself failed (not the code in it); the message says how."""


class Zygote:
    """One warm sandbox: bubblewrap running the harness's zygote, one job at a time.

    `wait_ready` before each job (it reads the zygote's "clean, ready" status), then `run`.
    Any SandboxFailure leaves it unusable: `close` it.
    """

    def __init__(self) -> None:
        """Start the sandbox (without waiting for it: see wait_ready); SandboxFailure when it cannot."""
        seccomp_r, seccomp_w = os.pipe()
        try:
            os.write(seccomp_w, filter_program())  # < 64 KiB: fits the pipe buffer
            os.close(seccomp_w)
            seccomp_w = -1
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
            self._process = _spawn(_command(seccomp_r), pass_fds=(seccomp_r,), **pipes)
        except (OSError, SeccompUnavailable) as error:
            raise SandboxFailure(f"cannot start bubblewrap: {error}") from None
        finally:
            os.close(seccomp_r)
            if seccomp_w >= 0:
                os.close(seccomp_w)
        self._stdin, self._stdout = self._process.stdin.fileno(), self._process.stdout.fileno()
        os.set_blocking(self._stdin, False)
        self._ready = False  # its last status was read: it is waiting for a job

    def wait_ready(self, deadline: float) -> None:
        """Wait (until `deadline`, time.monotonic()) for the zygote's status after its start or
        its last job; SandboxFailure unless it says its scratch dirs are clean (or has died since)."""
        if self._process.poll() is not None:
            raise SandboxFailure(self._why("the sandbox exited"))
        if self._ready:
            return
        if self._read(1, deadline) != b"S":
            raise SandboxFailure(self._why("the sandbox broke the protocol (expected a status)"))
        status = self._read_frame(deadline)
        if status.get("clean") is not True:
            raise SandboxFailure(f"the sandbox could not empty its scratch dirs after a job ({status})")
        self._ready = True

    def run(self, request: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
        """The harness's result for each test of `request` (see harness.py), by `deadline`."""
        self.wait_ready(deadline)
        self._ready = False
        nonce = secrets.token_bytes(_harness.NONCE_LEN)
        self._write(nonce + _harness.frame(request), deadline)
        kind = self._read(1, deadline)
        if kind != b"R":  # a status instead of a report: the job process died
            detail = self._read_frame(deadline) if kind == b"S" else kind
            raise SandboxFailure(self._why(f"the sandbox's job process failed ({detail})"))
        if self._read(len(nonce), deadline) != nonce:
            raise SandboxFailure("the sandbox's report does not carry the job's nonce")
        report = self._read_frame(deadline)
        if "error" in report:
            raise SandboxFailure(f"the sandbox's harness failed: {str(report['error']).strip()[-500:]}")
        results = report.get("results")
        if not isinstance(results, list) or len(results) != len(request["tests"]):
            raise SandboxFailure(f"the sandbox reported {report!r:.200} for {len(request['tests'])} tests")
        return results

    def close(self) -> None:
        """Kill the sandbox (--die-with-parent takes its whole namespace down), reap it, close its pipes."""
        self._process.kill()
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout, self._process.stderr):
            pipe.close()

    def _write(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            self._wait(self._stdin, select.POLLOUT, deadline)
            try:
                view = view[os.write(self._stdin, view) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                raise SandboxFailure(self._why("the sandbox exited")) from None

    def _read(self, size: int, deadline: float) -> bytes:
        chunks, left = [], size
        while left:
            self._wait(self._stdout, select.POLLIN, deadline)
            chunk = os.read(self._stdout, min(left, 1 << 20))
            if not chunk:
                raise SandboxFailure(self._why("the sandbox exited"))
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _read_frame(self, deadline: float) -> dict[str, Any]:
        size = int.from_bytes(self._read(4, deadline), "big")
        if size > _MAX_REPORT:
            raise SandboxFailure(f"the sandbox sent a {size}-byte frame")
        try:
            return json.loads(self._read(size, deadline))
        except ValueError as error:
            raise SandboxFailure(f"unreadable sandbox frame: {error}") from None

    def _wait(self, fd: int, event: int, deadline: float) -> None:
        poller = select.poll()
        poller.register(fd, event)
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise SandboxFailure("the sandbox ran past its deadline")

    def _why(self, what: str) -> str:
        """`what`, with the sandbox's exit status and last stderr once it has exited."""
        if self._process.poll() is None:
            return what
        os.set_blocking(self._process.stderr.fileno(), False)
        try:
            err = self._process.stderr.read() or b""
        except OSError:
            err = b""
        return f"{what} (exit {self._process.returncode}): {err.decode(errors='replace').strip()[-500:]}"


class _ZygoteLike(Protocol):
    def wait_ready(self, deadline: float) -> None: ...
    def run(self, request: dict[str, Any], deadline: float) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class ZygotePool:
    """`size` zygotes, started on first use and lent one job at a time (callers beyond `size` wait)."""

    def __init__(self, size: int, factory: Callable[[], _ZygoteLike] = Zygote) -> None:
        self._factory = factory
        self.started = 0  # zygotes started so far: more than `size` means some were replaced
        self._count_lock = threading.Lock()
        self._idle: queue.LifoQueue[_ZygoteLike | None] = queue.LifoQueue()  # LIFO: the warmest first
        for _ in range(size):
            self._idle.put(None)

    def run(self, request: dict[str, Any], deadline_s: float) -> list[dict[str, Any]]:
        """Run one job on a ready zygote within `deadline_s` seconds (plus STARTUP_S when one has
        to start); SandboxFailure when the sandbox failed, after which that zygote is replaced."""
        zygote = None
        slot = self._idle.get()
        try:
            zygote = self._ready(slot)
            return zygote.run(request, time.monotonic() + deadline_s)
        except BaseException:  # a job cut short leaves the protocol mid-way: never reuse that zygote
            if zygote is not None:
                zygote.close()
                zygote = None
            raise
        finally:
            self._idle.put(zygote)

    def close(self) -> None:
        """Close the idle zygotes (those lent out are closed by nobody: call when none are)."""
        zygotes = []
        while not self._idle.empty():
            zygotes.append(self._idle.get())
        for zygote in zygotes:
            if zygote is not None:
                zygote.close()
            self._idle.put(None)

    def _ready(self, zygote: _ZygoteLike | None) -> _ZygoteLike:
        """`zygote` once it is ready for a job; a new one instead when it is missing, dead or unclean
        (closed here when it fails to get ready)."""
        if zygote is not None:
            try:
                zygote.wait_ready(time.monotonic() + CLEANUP_S)
                return zygote
            except SandboxFailure:
                zygote.close()
        fresh = self._factory()
        with self._count_lock:
            self.started += 1
        try:
            fresh.wait_ready(time.monotonic() + STARTUP_S)
        except SandboxFailure:
            fresh.close()
            raise
        return fresh


# --- the process's pool ---------------------------------------------------------------------


_lock = threading.Lock()
_state: dict[str, Any] = {}  # "pool": ZygotePool, "spawner": ThreadPoolExecutor


def run_job(request: dict[str, Any], deadline_s: float, size: int) -> list[dict[str, Any]]:
    """Run one job on this process's pool of `size` zygotes (the size is fixed by the first call)."""
    with _lock:
        if "pool" not in _state:
            _state["pool"] = ZygotePool(size)
        pool = _state["pool"]
    return pool.run(request, deadline_s)


def shutdown() -> None:
    """Close this process's idle zygotes; the next job starts new ones (a cold start)."""
    with _lock:
        pool = _state.get("pool")
    if pool is not None:
        pool.close()


def _forget_after_fork() -> None:
    """A forked child must not share its parent's sandboxes (their pipes) nor its spawner thread,
    and may have been forked while another thread held the lock."""
    global _lock
    _lock = threading.Lock()
    _state.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _spawn(command: list[str], **popen_kwargs: Any) -> subprocess.Popen:
    """Popen `command` from one long-lived thread.

    bubblewrap's --die-with-parent (PR_SET_PDEATHSIG) fires when the *thread* that started it
    exits, and reward functions run in short-lived threads: a zygote started by one of them
    would die with it. The spawner thread lives as long as the process.
    """
    with _lock:
        if "spawner" not in _state:
            _state["spawner"] = ThreadPoolExecutor(1, thread_name_prefix="sandbox-spawner")
        spawner = _state["spawner"]
    as_root = os.geteuid() == 0
    return spawner.submit(
        subprocess.Popen,
        command,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/sandbox"},
        cwd="/",
        # root's processes escape RLIMIT_NPROC: bubblewrap itself runs as nobody
        user=NOBODY if as_root else None,
        group=NOBODY if as_root else None,
        extra_groups=[] if as_root else None,
        **popen_kwargs,
    ).result()


# --- the bubblewrap command -------------------------------------------------------------------


def _command(seccomp_fd: int) -> list[str]:
    """bwrap ... python -I -S -B -c HARNESS CONFIG; bubblewrap reads the seccomp program from `seccomp_fd`."""
    python = _sandbox_python()
    command = [
        bwrap_path() or "bwrap",
        "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
        "--die-with-parent", "--new-session", "--as-pid-1",
        "--uid", str(NOBODY), "--gid", str(NOBODY), "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]  # fmt: skip
    for name in ("bin", "lib", "lib64", "lib32", "libx32", "sbin"):
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    prefix = _python_prefix(python)
    if prefix is not None:
        command += ["--ro-bind", prefix, prefix]
    command += ["--proc", "/proc", "--dev", "/dev"]
    for path in SCRATCH_DIRS:
        command += ["--size", str(SCRATCH_MB << 20), "--tmpfs", path]
    config = {"arch": native_arch(), "syscalls": syscall_numbers(_harness.GUARDED_SYSCALLS), "scratch": SCRATCH_DIRS}
    command += [
        "--chdir", "/sandbox",
        "--remount-ro", "/",  # the root tmpfs and /dev: nothing to fill outside the scratch dirs
        "--remount-ro", "/dev",
        "--seccomp", str(seccomp_fd),
        python, "-I", "-S", "-B", "-c", _HARNESS_SOURCE, json.dumps(config),
    ]  # fmt: skip
    return command


def bwrap_path() -> str | None:
    """The bubblewrap binary: $GRPO_RAY_BWRAP (for one outside PATH), else `bwrap` on PATH; None if neither."""
    return shutil.which(os.environ.get("GRPO_RAY_BWRAP") or "bwrap")


def _sandbox_python() -> str:
    """The interpreter inside: $GRPO_RAY_SANDBOX_PYTHON, else /usr/bin/python3, else this one."""
    for candidate in (os.environ.get("GRPO_RAY_SANDBOX_PYTHON"), "/usr/bin/python3"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return os.path.realpath(sys.executable)


def _python_prefix(python: str) -> str | None:
    """The installation folder to mount read-only for an interpreter outside /usr; None under /usr."""
    real = os.path.realpath(python)
    if real.startswith("/usr/"):
        return None
    return str(Path(real).parent.parent)
