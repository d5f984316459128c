"""Untrusted-code runner: bubblewrap + seccomp + rlimits, a trusted harness inside.

    from grpo_ray.sandbox import run_tests
    verdicts = run_tests(code, [{"assert": "assert add(1, 2) == 3"},
                                {"stdin": "1 2\\n", "stdout": "3"}], timeout_s=2, memory_mb=256)
    [v.status for v in verdicts]  # "AC" "WA" "TLE" "MLE" "OLE" "RE", or "INFRA" (the sandbox failed)

`runner.py` is the host side (command line, limits, verdicts), `harness.py` runs inside,
`seccomp.py` builds the syscall filter. Stdlib only: reward actors import it cheaply.
"""

from grpo_ray.sandbox.runner import (
    STATUSES,
    SandboxUnavailable,
    Verdict,
    check_available,
    max_parallel,
    run_tests,
)

__all__ = ["STATUSES", "SandboxUnavailable", "Verdict", "check_available", "max_parallel", "run_tests"]
