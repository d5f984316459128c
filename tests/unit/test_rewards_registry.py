"""grpo_ray/rewards/__init__.py: load() by import path, its errors, and reward_name()."""

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo_ray.rewards import RewardImportError, RewardLoadError, gsm8k, load, reward_name

USER_MODULE = "grpo_ray_test_user_rewards"
BROKEN_MODULE = "grpo_ray_test_broken_rewards"

USER_SOURCE = '''
import functools
from typing import Callable

NOT_CALLABLE = 3


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def answer_reward(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]


def no_kwargs_reward(prompts, completions):
    return [0.0 for _ in completions]


def positional_only_reward(prompts, completions, /, **kwargs):
    return [0.0 for _ in completions]


def misnamed_reward(p, c, **kwargs):
    return [0.0 for _ in c]


class LengthReward:
    def __call__(self, prompts, completions, completion_ids=None, **columns):
        return [float(len(c)) for c in completions]


length_instance = LengthReward()
yes_reward = functools.partial(answer_reward, answer=["yes"])
'''


@pytest.fixture(scope="module", autouse=True)
def user_modules(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_rewards")
    (folder / f"{USER_MODULE}.py").write_text(textwrap.dedent(USER_SOURCE))
    (folder / f"{BROKEN_MODULE}.py").write_text('raise RuntimeError("boom: missing API key")\n')
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    for name in (USER_MODULE, BROKEN_MODULE):
        sys.modules.pop(name, None)


# --- happy paths ------------------------------------------------------------


def test_load_resolves_colon_and_dotted_paths():
    assert load("grpo_ray.rewards.gsm8k:correctness_reward") is gsm8k.correctness_reward
    assert load("grpo_ray.rewards.gsm8k.correctness_reward") is gsm8k.correctness_reward
    assert load("  grpo_ray.rewards.gsm8k:int_reward ") is gsm8k.int_reward


@pytest.mark.parametrize("fn", gsm8k.GSM8K_REWARDS)
def test_every_gsm8k_reward_loads(fn):
    assert load(f"grpo_ray.rewards.gsm8k:{fn.__name__}") is fn


@pytest.mark.parametrize("name", ["length_reward", "answer_reward", "length_instance", "yes_reward"])
def test_load_accepts_trl_style_user_rewards(name):
    fn = load(f"{USER_MODULE}:{name}")
    scores = fn(prompts=["p"], completions=["yes"], completion_ids=[[1]], answer=["yes"], extra=[0])
    assert scores in ([1.0], [3.0])


def test_reward_name_is_the_function_partial_or_class_name():
    assert reward_name(gsm8k.correctness_reward) == "correctness_reward"
    assert reward_name(load(f"{USER_MODULE}:yes_reward")) == "answer_reward"
    assert reward_name(load(f"{USER_MODULE}:length_instance")) == "LengthReward"


# --- errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["correctness_reward", "a:b:c", ":correctness_reward", "grpo_ray.rewards.gsm8k:", "my-pkg:f", ""]
)
def test_malformed_paths_say_what_a_path_looks_like(path):
    with pytest.raises(RewardLoadError, match="malformed reward path") as caught:
        load(path)
    assert "package.module:function" in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_a_non_string_path_is_rejected():
    with pytest.raises(RewardLoadError, match="must be a string, got int"):
        load(3)  # type: ignore[arg-type]


def test_a_missing_module_names_the_module_and_the_cause():
    with pytest.raises(RewardImportError) as caught:
        load("no_such_package_xyz.rewards:score")
    message = str(caught.value)
    assert "'no_such_package_xyz.rewards'" in message
    assert "No module named 'no_such_package_xyz'" in message
    assert "PYTHONPATH" in message
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, ValueError)


def test_a_module_that_fails_to_import_reports_its_error():
    with pytest.raises(RewardImportError) as caught:
        load(f"{BROKEN_MODULE}:score")
    message = str(caught.value)
    assert f"'{BROKEN_MODULE}'" in message
    assert "RuntimeError: boom: missing API key" in message
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_a_missing_function_suggests_the_nearest_name():
    # DESIGN.md's example path is "grpo_ray.rewards.gsm8k:correctness".
    with pytest.raises(RewardLoadError) as caught:
        load("grpo_ray.rewards.gsm8k:correctness")
    message = str(caught.value)
    assert "has no attribute 'correctness'" in message
    assert "Did you mean 'grpo_ray.rewards.gsm8k:correctness_reward'?" in message
    assert "int_reward" in message and "xmlcount_reward" in message  # the list of callables


def test_the_callables_listed_are_those_defined_in_the_module():
    with pytest.raises(RewardLoadError) as caught:
        load(f"{USER_MODULE}:zzz")
    message = str(caught.value)
    assert "Did you mean" not in message  # nothing is close to 'zzz'
    listed = message.split("Public callables in ")[1]
    assert "length_reward" in listed and "length_instance" in listed and "yes_reward" in listed
    assert "Callable" not in listed  # imported from typing
    assert "LengthReward" not in listed  # classes cannot be loaded


def test_a_non_callable_attribute_is_named_with_its_type():
    with pytest.raises(RewardLoadError, match="names a value of type 'int', not a callable") as caught:
        load(f"{USER_MODULE}:NOT_CALLABLE")
    assert "length_reward" in str(caught.value)


def test_a_module_path_asks_for_a_function_in_it():
    with pytest.raises(RewardLoadError, match="names the module 'grpo_ray.rewards.gsm8k'") as caught:
        load("grpo_ray.rewards.gsm8k")
    assert "'grpo_ray.rewards.gsm8k:<function>'" in str(caught.value)


def test_a_class_path_asks_for_an_instance():
    with pytest.raises(RewardLoadError, match="names the class 'LengthReward'.*create an instance"):
        load(f"{USER_MODULE}:LengthReward")


@pytest.mark.parametrize(
    "name, reason",
    [
        ("no_kwargs_reward", "takes no \\*\\*kwargs"),
        ("positional_only_reward", "positional only"),
        ("misnamed_reward", "no 'completions' parameter but requires \\['p', 'c'\\]"),
    ],
)
def test_a_signature_trl_cannot_call_names_the_function_and_the_fix(name, reason):
    with pytest.raises(RewardLoadError, match=reason) as caught:
        load(f"{USER_MODULE}:{name}")
    message = str(caught.value)
    assert f"{name}(" in message
    assert "fn(prompts, completions, completion_ids=None, **columns)" in message
    assert f"def {name}(prompts, completions, completion_ids=None, **columns)" in message


def test_rewards_package_does_not_import_torch():
    # Reward actors import the registry first; it must stay light.
    repo_root = Path(gsm8k.__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, grpo_ray.rewards, grpo_ray.rewards.gsm8k; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"


def test_partial_name_follows_the_wrapped_function():
    assert reward_name(functools.partial(gsm8k.int_reward)) == "int_reward"
