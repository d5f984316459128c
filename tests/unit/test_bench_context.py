"""bench_context's length search and sweep, with the attempt (a learner step in a fresh process)
replaced by a rule: a length fits up to a ceiling, and a step over the budget by nvidia-smi fails."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_context  # noqa: E402


@pytest.fixture
def ceiling(monkeypatch):
    """Steps up to `ceiling[0]` tokens fit; past it the step goes over a 24 GiB budget by nvidia-smi."""
    limit, tried = [61440], []

    def attempt(config, length, cap_gib, timeout_s):
        tried.append(length)
        return {"row": config, "length": length, "cap_gib": cap_gib, "smi_peak_gib": 20.0 if length <= limit[0] else 24.2}

    monkeypatch.setattr(bench_context, "attempt", attempt)
    monkeypatch.setattr(bench_context, "log", lambda record: None)
    return limit, tried


def test_search_doubles_then_bisects_to_the_granularity(ceiling):
    limit, tried = ceiling
    sink = io.StringIO()
    assert bench_context.search("ours", 24.0, 4096, 4096, 131072, 60, sink) == 61440
    assert tried == [4096, 8192, 16384, 32768, 65536, 49152, 57344, 61440]
    records = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [r["fits"] for r in records] == [True] * 4 + [False] + [True] * 3


def test_search_stops_at_the_limit_when_everything_fits(ceiling):
    limit, tried = ceiling
    limit[0] = 10**6
    assert bench_context.search("ours", 79.6, 4096, 4096, 131072, 60, io.StringIO()) == 131072
    assert tried == [4096, 8192, 16384, 32768, 65536, 131072]


def test_sweep_tries_the_given_lengths_until_one_fails(ceiling):
    _, tried = ceiling
    assert bench_context.sweep("no_offload", 24.0, [65536, 8192, 16384, 131072], 60, io.StringIO()) == 16384
    assert tried == [8192, 16384, 65536]
