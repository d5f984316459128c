"""YAML config groups, composed by grpo_ray.config.load_config."""
