"""The package's promises about imports and the command line."""

import subprocess
import sys


def test_import_grpo_ray_pulls_no_gpu_or_ray_modules():
    code = (
        "import sys, grpo_ray, grpo_ray.config, grpo_ray.data, grpo_ray.grpo, grpo_ray.rewards, "
        "grpo_ray.rewards.gsm8k, grpo_ray.kernels.reference, grpo_ray.types, grpo_ray.weights, grpo_ray.cli\n"
        "bad = [m for m in ('vllm', 'bitsandbytes', 'ray') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_reports_config_typo_with_exit_code_2():
    proc = subprocess.run(
        [sys.executable, "-m", "grpo_ray", "trainer.lrr=1e-5"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "grpo-ray: error: unknown config key 'trainer.lrr' (did you mean 'lr'?)" in proc.stderr


def test_cli_help_prints_the_default_config():
    proc = subprocess.run([sys.executable, "-m", "grpo_ray", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert "num_generations: 8" in proc.stdout and "loss_type: dapo" in proc.stdout
