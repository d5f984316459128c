"""Untrusted-code runner: bubblewrap + seccomp + rlimits, a trusted harness inside.

    from grpo_ray.sandbox import run_tests
    verdicts = run_tests(code, [{"assert": "assert add(1, 2) == 3"},
                                {"stdin": "1 2\\n", "stdout": "3"}], timeout_s=2, memory_mb=256)
    [v.status for v in verdicts]  # "AC" "WA" "TLE" "MLE" "OLE" "RE", or "INFRA" (the sandbox failed)

`runner.py` is the host side (tests in, verdicts out), `zygote.py` keeps the process's warm
sandboxes (one long-lived bubblewrap each, a fresh process per job), `harness.py` runs inside,
`seccomp.py` builds the syscall filter. Stdlib only: reward actors import it cheaply. Reward
functions that call `run_tests` are marked `@requires_sandbox`, so that reward actors check
the sandbox when they start.
"""

from grpo_ray.sandbox import runner
from grpo_ray.sandbox.runner import (
    STATUSES,
    SandboxUnavailable,
    Verdict,
    check_available,
    max_parallel,
    needs_sandbox,
    requires_sandbox,
    run_tests,
)

__all__ = runner.__all__  # the public names are runner's; listed once, there
