"""Benchmark the code sandbox: overhead per job and per test, and reward-actor scaling.

Prints one JSON line per result.

    python scripts/bench_reward.py                       # overhead, p50/p95 (this host)
    python scripts/bench_reward.py --actors 1,2,4,8,16   # + throughput with N RewardActors (Ray)

Overhead: `run_tests` on a trivial program, wall time seen by the caller (bubblewrap, interpreter
start, harness, one fork per test, teardown); "per extra test" is the slope between jobs of 1
and 1 + K tests. Scaling: N Ray actors (num_cpus=1) each score HumanEval canonical solutions
with `pass_fraction_reward`; efficiency = throughput(N) / (N * throughput(1)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from grpo_ray.sandbox import run_tests

CODE = "def add(a, b):\n    return a + b\n"
KINDS = {
    "eval": {"assert": "assert add(1, 2) == 3"},  # EXPR inside, == outside
    "exec": {"assert": "assert abs(add(1, 2) - 3) < 1e-9"},  # statement in the test process
    "script": {"stdin": "", "stdout": ""},
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def job_times(tests: list[dict], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        verdicts = run_tests(CODE, tests, timeout_s=5, memory_mb=256)
        times.append(time.perf_counter() - start)
        assert all(v.passed for v in verdicts), verdicts
    return times


def emit(**record) -> None:
    record.update(host=platform.node(), cpus=len(os.sched_getaffinity(0)), python=platform.python_version(),
                  kernel=platform.release(), date=time.strftime("%Y-%m-%d"))  # fmt: skip
    print(json.dumps(record), flush=True)


def overhead(repeats: int, extra: int) -> None:
    job_times([KINDS["eval"]], 3)  # warm: seccomp program, availability probe, page cache
    for kind, test in KINDS.items():
        one = job_times([test], repeats)
        many = job_times([test] * (1 + extra), repeats)
        per_test = [(b - a) / extra for a, b in zip(sorted(one), sorted(many))]
        emit(bench="sandbox_job", kind=kind, tests=1, repeats=repeats,
             p50_ms=round(1e3 * percentile(one, 0.5), 2), p95_ms=round(1e3 * percentile(one, 0.95), 2))  # fmt: skip
        emit(bench="sandbox_extra_test", kind=kind, extra_tests=extra, repeats=repeats,
             p50_ms=round(1e3 * percentile(per_test, 0.5), 2), p95_ms=round(1e3 * percentile(per_test, 0.95), 2))  # fmt: skip


def scaling(actor_counts: list[int], completions_per_actor: int) -> None:
    import ray

    from grpo_ray.rewards.code import build_program, humaneval_problems

    problems = humaneval_problems()
    rows = [problems[i % len(problems)] for i in range(max(actor_counts) * completions_per_actor)]
    ray.init(num_cpus=max(actor_counts), include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Scorer:
        def score(self, batch: list[dict]) -> int:
            from grpo_ray.rewards import code

            code._run_cached.cache_clear()
            completions = [f"```python\n{build_program(p['canonical_solution'], p['prompt'], p['entry_point'])}\n```" for p in batch]
            scores = code.pass_fraction_reward([""] * len(batch), completions, tests=[p["tests"] for p in batch])
            assert all(s == 1.0 for s in scores), scores
            return len(batch)

    base = None
    for n in actor_counts:
        actors = [Scorer.remote() for _ in range(n)]
        ray.get([a.score.remote(rows[:2]) for a in actors])  # warm
        start = time.perf_counter()
        done = sum(ray.get([a.score.remote(rows[i * completions_per_actor : (i + 1) * completions_per_actor]) for i, a in enumerate(actors)]))
        seconds = time.perf_counter() - start
        throughput = done / seconds
        base = base or throughput
        emit(bench="reward_scaling", actors=n, completions=done, seconds=round(seconds, 3),
             completions_per_s=round(throughput, 2), efficiency=round(throughput / (n * base), 3))  # fmt: skip
        for a in actors:
            ray.kill(a)
    ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--extra-tests", type=int, default=10)
    parser.add_argument("--actors", default="", help="comma-separated actor counts for the scaling run, e.g. 1,2,4,8,16")
    parser.add_argument("--completions-per-actor", type=int, default=32)
    args = parser.parse_args(argv)
    overhead(args.repeats, args.extra_tests)
    if args.actors:
        scaling([int(n) for n in args.actors.split(",")], args.completions_per_actor)


if __name__ == "__main__":
    sys.exit(main())
