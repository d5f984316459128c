"""grpo_ray.data: every prompt source, formatting, the missing-column error and the sampler."""

import json
from types import SimpleNamespace

import datasets
import pytest

from grpo_ray.config import load_config
from grpo_ray.data import (
    DataError,
    PromptSampler,
    arithmetic_problems,
    gsm8k_answer,
    load_prompts,
    render_prompt,
)

GSM_ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7", "level": 1},
    {"question": "A farm sells 1,000 eggs twice.", "answer": "1,000*2=2,000\n#### 2,000", "level": 2},
]


def task(*overrides: str):
    return load_config(list(overrides)).task


def test_arithmetic_answers_are_exact_and_seeded():
    ds = arithmetic_problems(50, seed=3, ops="+-*")
    for row in ds:
        a, op, b = row["prompt"][len("What is ") :].split("?")[0].partition(next(c for c in "+-*" if c in row["prompt"][8:]))
        assert int(row["answer"]) == eval(f"{int(a)}{op}{int(b)}")
    assert arithmetic_problems(50, seed=3, ops="+-*")["prompt"] == ds["prompt"]
    assert arithmetic_problems(50, seed=4, ops="+-*")["prompt"] != ds["prompt"]


def test_synthetic_source_formats_chat_prompt():
    ds = load_prompts(task("task.num_examples=10"), seed=0)
    assert len(ds) == 10 and set(ds.column_names) == {"prompt", "answer"}
    assert ds[0]["prompt"][0]["role"] == "user" and ds[0]["prompt"][0]["content"].startswith("What is ")


def test_jsonl_file_source_with_gsm8k_answers_and_extra_columns(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GSM_ROWS))
    ds = load_prompts(task("task=gsm8k", "task.source=file", f"task.path={path}"), seed=0)
    assert ds["answer"] == ["7", "2000"]
    assert ds["level"] == [1, 2]  # extra columns travel to reward functions
    system, user = ds[0]["prompt"]
    assert system["role"] == "system" and "<answer>" in system["content"]
    assert user == {"role": "user", "content": GSM_ROWS[0]["question"]}


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_parquet_and_csv_sources(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    ds = datasets.Dataset.from_list([{"q": "1+1?", "a": "2"}, {"q": "2+2?", "a": "4"}])
    ds.to_parquet(str(path)) if suffix == ".parquet" else ds.to_csv(str(path), index=False)
    out = load_prompts(task("task.source=file", f"task.path={path}", "task.prompt_column=q", "task.answer_column=a"))
    assert out["answer"] == ["2", "4"]
    assert out[1]["prompt"] == [{"role": "user", "content": "2+2?"}]


def test_hf_source_from_local_folder_as_hub_layout(tmp_path):
    # The same call that takes a hub id ("openai/gsm8k", "main") reads a folder laid out like one.
    (tmp_path / "main").mkdir()
    datasets.Dataset.from_list(GSM_ROWS).to_parquet(str(tmp_path / "main" / "train-00000-of-00001.parquet"))
    ds = load_prompts(task("task=gsm8k", f"task.path={tmp_path}", "task.config_name=null", "task.split=train"))
    assert ds["answer"] == ["7", "2000"]


def test_hf_source_from_save_to_disk_folder(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(GSM_ROWS)}).save_to_disk(str(tmp_path))
    ds = load_prompts(task("task=gsm8k", f"task.path={tmp_path}", "task.split=test"))
    assert ds["answer"] == ["7", "2000"]
    with pytest.raises(DataError, match="task.split='train' not in .*splits: test"):
        load_prompts(task("task=gsm8k", f"task.path={tmp_path}", "task.split=train"))


def test_reasoning_gym_gsm_symbolic_offline():
    pytest.importorskip("reasoning_gym")
    ds = load_prompts(task("task=gsm_symbolic", "task.num_examples=4"), seed=1)
    assert len(ds) == 4
    assert all(a.lstrip("-").isdigit() for a in ds["answer"])
    assert ds[0]["prompt"][0]["role"] == "system"
    assert load_prompts(task("task=gsm_symbolic", "task.num_examples=4"), seed=1)["answer"] == ds["answer"]


def test_missing_column_names_it_and_lists_present(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "solution": "s"}))
    with pytest.raises(DataError, match=r"column 'answer' \(task.answer_column\) .* columns are: question, solution"):
        load_prompts(task("task=gsm8k", "task.source=file", f"task.path={path}"))


def test_missing_file_and_unknown_generator():
    with pytest.raises(DataError, match="no such file"):
        load_prompts(task("task.source=file", "task.path=/nonexistent/x.jsonl"))
    with pytest.raises(DataError, match="unknown synthetic task; available: arithmetic"):
        load_prompts(task("task.path=algebra"))


def test_gsm8k_answer_extraction():
    assert gsm8k_answer("step\n#### 1,234") == "1234"
    with pytest.raises(DataError, match="no '####'"):
        gsm8k_answer("42")


def test_render_prompt_uses_chat_template_when_present():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    plain = SimpleNamespace(chat_template=None)
    assert render_prompt(messages, plain) == "S\n\nU\n\n"
    templated = SimpleNamespace(
        chat_template="x",
        apply_chat_template=lambda m, tokenize, add_generation_prompt: "|".join(x["content"] for x in m) + "|A:",
    )
    assert render_prompt(messages, templated) == "S|U|A:"


def test_sampler_covers_epoch_then_reshuffles_and_resumes():
    ds = datasets.Dataset.from_list([{"i": i} for i in range(5)])
    sampler = PromptSampler(ds, seed=7)
    first = [r["i"] for r in sampler.next_batch(5)]
    assert sorted(first) == list(range(5))
    state = sampler.state_dict()
    second = [r["i"] for r in sampler.next_batch(3)]
    resumed = PromptSampler(ds, seed=0)
    resumed.load_state_dict(state)
    assert [r["i"] for r in resumed.next_batch(3)] == second
