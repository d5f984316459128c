"""grpo_ray.config: composition, override syntax, and the error messages users see."""

import pytest
from omegaconf import DictConfig

from grpo_ray.config import ConfigError, load_config, to_yaml


def test_default_composes_the_embedded_job():
    cfg = load_config()
    assert isinstance(cfg, DictConfig)
    assert cfg.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert cfg.task.name == "arithmetic"
    assert cfg.rollout.backend == "hf"
    assert cfg.loss.loss_type == "dapo" and cfg.loss.epsilon_high == 0.28
    assert cfg.cluster.placement == "cpu"


def test_dotted_override_sets_value_with_schema_type():
    cfg = load_config(["trainer.lr=5e-6", "rollout.num_generations=4", "rollout.stop=[a,'</answer>']"])
    assert cfg.trainer.lr == 5e-6 and isinstance(cfg.trainer.lr, float)
    assert cfg.rollout.num_generations == 4
    assert list(cfg.rollout.stop) == ["a", "</answer>"]


def test_group_override_selects_option_and_group_defaults_inherit():
    cfg = load_config(["task=gsm_symbolic", "loss=gspo"])
    assert cfg.task.source == "reasoning_gym" and cfg.task.answer_format == "plain"
    # inherited from task/gsm8k.yaml through the defaults list
    assert cfg.task.system_prompt.startswith("Respond in the following format")
    assert len(cfg.task.reward_funcs) == 5
    assert cfg.loss.importance_sampling_level == "sequence" and cfg.loss.epsilon == 3e-4


def test_plus_adds_and_tilde_removes_free_form_entries():
    cfg = load_config(["+model.init_kwargs.attn_implementation=sdpa", "+task.generator_kwargs.max_operand=20"])
    assert cfg.model.init_kwargs.attn_implementation == "sdpa"
    assert cfg.task.generator_kwargs.max_operand == 20
    cfg = load_config(["+model.init_kwargs.a=1", "+model.init_kwargs.b=2", "~model.init_kwargs.a"])
    assert dict(cfg.model.init_kwargs) == {"b": 2}


def test_misspelled_key_names_nearest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.lrr' \(did you mean 'lr'\?\)"):
        load_config(["trainer.lrr=1e-5"])
    with pytest.raises(ConfigError, match=r"'traner' \(did you mean 'trainer'\?\)"):
        load_config(["traner.lr=1e-5"])


def test_plus_on_schema_node_is_still_a_typo():
    with pytest.raises(ConfigError, match=r"'model.lora.rr' \(did you mean 'r'\?\)"):
        load_config(["+model.lora.rr=8"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'trainer.lr' got 'abc' but expects float"):
        load_config(["trainer.lr=abc"])
    with pytest.raises(ConfigError, match=r"'trainer.max_steps' got 1.5 but expects int"):
        load_config(["trainer.max_steps=1.5"])
    with pytest.raises(ConfigError, match=r"'model.revision' .* expects str or null"):
        load_config(["model.revision=[1]"])


def test_unknown_group_option_lists_available():
    with pytest.raises(ConfigError, match=r"no option 'gsm9k' in config group 'task' \(did you mean 'gsm8k'\?\).*arithmetic"):
        load_config(["task=gsm9k"])


def test_value_outside_choices_lists_them():
    with pytest.raises(ConfigError, match=r"loss.loss_type='grpoo'.*dr_grpo.*did you mean 'grpo'"):
        load_config(["loss.loss_type=grpoo"])


def test_removing_a_schema_key_says_what_to_do():
    with pytest.raises(ConfigError, match=r"'~trainer.lr': keys of the schema cannot be removed"):
        load_config(["~trainer.lr"])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="num_generations=3 must divide"):
        load_config(["rollout.num_generations=3"])
    with pytest.raises(ConfigError, match="reward_weights has 3 values but task.reward_funcs has 2"):
        load_config(["task.reward_weights=[1,2,3]"])
    with pytest.raises(ConfigError, match="trainer.max_tokens_per_microbatch must be >= 0"):
        load_config(["trainer.max_tokens_per_microbatch=-1"])


def test_resolved_yaml_round_trips():
    from omegaconf import OmegaConf

    cfg = load_config(["task=gsm8k"])
    assert OmegaConf.create(to_yaml(cfg)).task.system_prompt == cfg.task.system_prompt
