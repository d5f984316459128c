"""The sandbox's seccomp filter, compiled to a BPF program with libseccomp (through ctypes).

libseccomp resolves syscall names for the running architecture and rejects foreign ABIs (a
filter for x86_64 kills x32 and i386 syscalls), which a hand-written BPF table would have to
redo per architecture. The program is built once per process; bubblewrap loads it (`--seccomp
FD`) just before it execs the harness, so the harness and every test child run under it.

Default allow; the syscalls below fail with EPERM (ENOSYS for clone3, so libc falls back to
clone, whose namespace flags are checked). Namespaces, mounts and capabilities are already
taken away by bubblewrap; the filter closes what an unprivileged process could still reach,
and what would outlive a job in a reused sandbox (SysV IPC objects, POSIX message queues).
A second filter, the harness's guard, is stacked in each test child: it needs the pid of its
job process, known only inside (`harness.guard_program`, with `syscall_numbers` from here).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

__all__ = ["DENIED_SYSCALLS", "SeccompUnavailable", "filter_program", "native_arch", "syscall_numbers"]

DENIED_SYSCALLS = (
    # network: no sockets at all (the network namespace is empty anyway); socketpair stays
    "socket",
    # other processes' memory and state; signals through a pidfd (one of /proc/PID names any process)
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd", "pidfd_send_signal",
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    # kernel attack surface an untrusted program has no use for
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "name_to_handle_at", "open_by_handle_at", "lookup_dcookie",
    "fanotify_init", "quotactl", "acct", "swapon", "swapoff", "reboot", "syslog", "vhangup",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "sethostname", "setdomainname",
    "iopl", "ioperm", "personality", "uselib", "migrate_pages", "move_pages", "mbind",
    # state that outlives its processes: it would pass from one job to the next
    "shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl", "msgget", "msgsnd",
    "msgrcv", "msgctl", "ipc", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
)  # fmt: skip

# clone(2) flags that create namespaces: refused even though user namespaces are disabled.
_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
# Commands that make a file's owner some other process, which the kernel then signals (SIGIO, or
# any signal set with F_SETSIG) on I/O: F_SETOWN, F_SETOWN_EX; FIOSETOWN, SIOCSPGRP on sockets.
_SET_OWNER = {"fcntl": (8, 15), "fcntl64": (8, 15), "ioctl": (0x8901, 0x8902)}
_LOW_32 = 0xFFFFFFFF  # `cmd` is an unsigned int: the kernel ignores the register's high half, and so must we

_ACT_ALLOW = 0x7FFF0000
_CMP_MASKED_EQ = 7


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class SeccompUnavailable(RuntimeError):
    """libseccomp cannot be loaded or refused the filter."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


@functools.lru_cache(maxsize=1)
def filter_program() -> bytes:
    """The compiled BPF program (struct sock_filter[]), as bubblewrap's --seccomp reads it."""
    lib = _libseccomp()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for name in DENIED_SYSCALLS:
            _add(lib, ctx, _act_errno(errno.EPERM), name)
        _add(lib, ctx, _act_errno(errno.ENOSYS), "clone3")
        for flag in _NAMESPACE_FLAGS:
            _add(lib, ctx, _act_errno(errno.EPERM), "clone", _ArgCmp(0, _CMP_MASKED_EQ, flag, flag))
        for name, commands in _SET_OWNER.items():
            for command in commands:
                _add(lib, ctx, _act_errno(errno.EPERM), name, _ArgCmp(1, _CMP_MASKED_EQ, _LOW_32, command))
        read_fd, write_fd = os.pipe()
        try:
            rc = lib.seccomp_export_bpf(ctx, write_fd)
            os.close(write_fd)
            write_fd = -1
            if rc != 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            chunks = []
            while chunk := os.read(read_fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
    finally:
        lib.seccomp_release(ctx)
    program = b"".join(chunks)
    if not program or len(program) % 8:
        raise SeccompUnavailable(f"libseccomp exported a malformed program ({len(program)} bytes)")
    return program


def native_arch() -> int:
    """The AUDIT_ARCH token of this machine's native syscall ABI (what seccomp_data.arch holds)."""
    return int(_libseccomp().seccomp_arch_native())


def syscall_numbers(names: tuple[str, ...]) -> dict[str, int]:
    """{name: number} on the native architecture, leaving out the names it has no syscall for."""
    lib = _libseccomp()
    numbers = {name: lib.seccomp_syscall_resolve_name(name.encode()) for name in names}
    return {name: number for name, number in numbers.items() if number >= 0}


def _add(lib: ctypes.CDLL, ctx: int, action: int, name: str, *conditions: _ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # unknown to libseccomp (-1), or a pseudo-number: not a syscall of this arch
        return
    array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
    rc = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
    if rc != 0:
        raise SeccompUnavailable(f"seccomp_rule_add({name}) failed: {os.strerror(-rc)}")


@functools.lru_cache(maxsize=1)
def _libseccomp() -> ctypes.CDLL:
    path = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(path, use_errno=True)
    except OSError as error:
        raise SeccompUnavailable(f"cannot load libseccomp ({error})") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]  # fmt: skip
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    return lib
