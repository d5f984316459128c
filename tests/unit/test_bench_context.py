"""bench_context's length search and sweep, with the attempt (a learner step in a fresh process)
replaced by a rule: a length fits up to a ceiling, and a step over the budget by nvidia-smi fails."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_prompt_file_makes_prompts_of_the_asked_length_in_the_chat_template(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from grpo_ray.data import prompt_token_ids, to_messages

    path = tmp_path / "prompts.jsonl"
    assert bench_context.prompt_file(tiny_model_dir, 512, path, rows=3) == 512
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert len(rows) == 3 and all(len(prompt_token_ids(to_messages(r["prompt"], None), tokenizer)) == 512 for r in rows)


def test_whole_step_runs_one_colocated_grpo_ray_step_at_the_length(tiny_model_dir, tmp_path, monkeypatch):
    """Part (b): the run bench_sync starts is a valid grpo-ray config whose prompt and completion make
    up the length, with the caller's caps; its memory and failure come back as the attempt's record."""
    import shutil
    import subprocess

    import bench_sync

    from grpo_ray.config import load_config

    shutil.copytree(tiny_model_dir, tmp_path / "llama-3.1-8b")  # stands in for the saved 8B shape
    monkeypatch.setattr(bench_context, "WHOLE", bench_context.WholeStep(tmp_path, ["rollout.kv_cache_gib=11"]))
    argv = []

    class Exited:  # the run, ended with exit 1 before writing metrics
        def __init__(self, command, **kwargs):
            argv.extend(command)
            self.pid = 0

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(bench_sync, "subprocess", SimpleNamespace(Popen=Exited, TimeoutExpired=subprocess.TimeoutExpired))
    record = bench_context.attempt(bench_context.WHOLE_STEP, 40960, 24.0, 60)
    assert argv[1:3] == ["-m", "grpo_ray"]
    cfg = load_config(argv[3:])
    assert (cfg.rollout.backend, cfg.cluster.placement, cfg.model.quantization) == ("vllm", "colocate", "nf4")
    assert cfg.rollout.max_prompt_length == 512 and cfg.rollout.max_completion_length == 40960 - 512
    assert cfg.rollout.generation_kwargs["ignore_eos"] is True and cfg.rollout.kv_cache_gib == 11
    assert cfg.trainer.per_device_train_batch_size == cfg.rollout.num_generations == 4
    assert (cfg.trainer.gradient_checkpointing, cfg.trainer.sequence_chunk_tokens, cfg.loss.kernel) == ("offload", 4096, "triton")
    assert cfg.task.source == "file" and bench_context.Path(cfg.task.path).exists()
    assert record["row"] == "whole_step" and record["length"] == 40960 and record["prompt_tokens"] == 512
    assert record["error"] == "exit 1" and not bench_context.fits(record)


def test_speed_takes_the_lengths_in_turn_on_one_learner_one_sequence_a_micro_batch(monkeypatch):
    """The 32K-vs-4K comparison: warm-up at each length (longest first), then the lengths in turn,
    each step one sequence a micro-batch; tokens/s from each length's median step."""
    tiny = {**bench_context.LLAMA_31_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}  # fmt: skip
    made, stepped = [], []

    def make_learner(*args, **kwargs):
        learner = real_make_learner(*args, **kwargs)
        made.append(learner)
        train_step = learner.train_step
        learner.train_step = lambda scored: stepped.append(len(scored.rollout.completion_ids[0]) + 512) or train_step(scored)
        return learner

    real_make_learner = bench_context.make_learner
    monkeypatch.setattr(bench_context, "make_learner", make_learner)
    row = bench_context.Row("none", "offload", "reference", "sequence", sequence_chunk_tokens=256)
    record = bench_context.speed(row, [576, 1024], repeats=2, model_config=tiny)
    assert len(made) == 1 and stepped == [1024, 576, 576, 1024, 576, 1024]
    assert record["micro_batches"] == {576: 4, 1024: 4} and record["device"] == "cpu"
    for length, times in record["step_s"].items():
        assert len(times) == 2 and all(t > 0 for t in times)
        assert record["tokens_per_s_median"][length] == round(4 * length / (sum(times) / 2))
    fast = record["tokens_per_s_median"]
    assert record["slower_than_shortest"] == {576: 0.0, 1024: round(1 - fast[1024] / fast[576], 4)}
    assert record["sequence_chunk_tokens"] == 256 and record["repeats"] == 2


def test_a_missing_model_is_built_by_random_model_in_a_process_of_its_own(tmp_path, monkeypatch):
    """The benchmarks (bench_sync, bench_rollout, bench_context's whole_step) build a missing model in a
    subprocess (a CUDA context made in the benchmark's own process would count in the memory it
    measures), and reuse a saved one."""
    import random_model

    calls = []
    monkeypatch.setattr(random_model.subprocess, "run", lambda command, check: calls.append(command))
    random_model.ensure("llama-3.1-8b", tmp_path / "m")
    assert len(calls) == 1 and calls[0][0] == sys.executable and calls[0][1].endswith("random_model.py")
    assert calls[0][2:] == ["llama-3.1-8b", str(tmp_path / "m")]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    random_model.ensure("llama-3.1-8b", tmp_path / "m")
    assert len(calls) == 1
