"""`grpo-ray eval <run_dir | adapter_dir> [overrides]`: score a task's test split, write a JSON report.

What is evaluated:
- a run directory (config.yaml, final/): its final adapter, with the run's config as the base
  that overrides change (`task=gsm8k` swaps the task, `task.num_examples=200` trims it);
- an adapter folder in PEFT format: inside a run (`<run>/final`, `<run>/checkpoints/step_N`) with
  that run's config, else with the default config and the adapter's base model;
- `base=True` (`--base`): the same base model and config without the adapter (the "before" number).

Generation is the rollout actor's hf backend, in this process (no Ray): `eval.greedy=true` gives
one greedy completion per prompt; `eval.greedy=false eval.k=8` samples k per prompt at
`rollout.temperature`. Every reward function of the task scores every completion, as in
training. The report gives, per reward function, the mean score and pass@1 (the share of
completions scoring above `eval.pass_threshold`; with k samples the unbiased mean over them,
plus pass@k), the weighted total reward and completion lengths.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from grpo_ray.config import ConfigError, load_config, validate
from grpo_ray.rewards.scoring import RewardScores, score_rollout, unique_reward_names
from grpo_ray.types import Rollout

ADAPTER_CONFIG = "adapter_config.json"
RUN_CONFIG = "config.yaml"
GROUPS = ("model", "task", "rollout", "loss", "cluster")  # config groups in conf/
# peft options that the rollout's add_lora does not reproduce: such an adapter would load wrong.
_UNSUPPORTED_LORA = ("use_dora", "use_rslora", "modules_to_save", "rank_pattern", "alpha_pattern")


class EvalError(ValueError):
    """A target or option that `grpo-ray eval` cannot use; the message says what to give."""


@dataclass
class Target:
    """What `grpo-ray eval` / `export` points at, resolved to folders."""

    path: Path  # as given
    run_dir: Path | None  # the run whose config.yaml is the base config, if any
    adapter_dir: Path | None  # the PEFT adapter folder (None: a run without final/, with base=True)
    base: bool = False  # evaluate the base model: the adapter only names the model and config

    @property
    def adapter(self) -> Path | None:
        """The adapter to load into the model, None for the base model."""
        return None if self.base else self.adapter_dir

    @property
    def report_dir(self) -> Path:
        return (self.run_dir or self.adapter_dir or self.path) / "eval"


def resolve_target(path: Path | str, base: bool = False) -> Target:
    """A run directory or an adapter folder (possibly inside a run) as a Target; EvalError otherwise."""
    path = Path(path).expanduser().absolute()
    if (path / RUN_CONFIG).exists():
        adapter = path / "final"
        if (adapter / ADAPTER_CONFIG).exists():
            return Target(path, path, adapter, base)
        if base:
            return Target(path, path, None, base)
        raise EvalError(f"run directory {path} has no final adapter ({adapter}/{ADAPTER_CONFIG}); did the run finish?")
    if (path / ADAPTER_CONFIG).exists():
        run_dir = next((p for p in (path.parent, path.parent.parent) if (p / RUN_CONFIG).exists()), None)
        return Target(path, run_dir, path, base)
    raise EvalError(
        f"{path} is neither a run directory (with {RUN_CONFIG} and final/) nor a PEFT adapter folder (with {ADAPTER_CONFIG})"
    )


# --- configuration -----------------------------------------------------------------------


def eval_config(target: Target, overrides: Sequence[str] = ()) -> DictConfig:
    """The config to evaluate with: the run's (or the default) config, then `task.split=test`, then `overrides`.

    Group overrides (`task=gsm8k`) replace the run's settings of that group, as in training.
    The LoRA shape comes from the adapter's adapter_config.json, so the weights load as trained.
    """
    overrides = ["task.split=test", *overrides]
    cfg = load_run_config(target.run_dir, overrides) if target.run_dir else load_config(overrides)
    lora = read_adapter_config(target.adapter_dir) if target.adapter_dir else None
    user_set_model = any(o.lstrip("+").startswith(("model.name_or_path=", "model=")) for o in overrides)
    if lora is not None and target.run_dir is None and not user_set_model:
        cfg.model.name_or_path = lora["base_model_name_or_path"]
    if lora is not None and not target.base:
        cfg.model.lora.r, cfg.model.lora.alpha = lora["r"], lora["lora_alpha"]
        cfg.model.lora.dropout = lora.get("lora_dropout", 0.0)
        targets = lora["target_modules"]
        cfg.model.lora.target_modules = [targets] if isinstance(targets, str) else sorted(targets)
    if cfg.eval.k < 1:
        raise ConfigError(f"eval.k must be >= 1, got {cfg.eval.k}")
    # Decoding: greedy is sampling restricted to the single most likely token (top_k=1), which is
    # what do_sample=False computes, through the same backend code path as training.
    cfg.rollout.num_generations = 1 if cfg.eval.greedy else cfg.eval.k
    if cfg.eval.greedy:
        cfg.rollout.top_k = 1
    return cfg


def load_run_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """A run's saved config.yaml, composed with Hydra overrides as if it were conf/config.yaml.

    The saved config becomes the primary config (registered in Hydra's ConfigStore) and group
    overrides are appended after it (`task=gsm8k` → `+task=gsm8k`), so they replace its values.
    """
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    from grpo_ray import config as config_module

    saved = OmegaConf.load(run_dir / RUN_CONFIG)
    node = OmegaConf.merge({"defaults": [config_module._SCHEMA_NAME, "_self_"]}, saved)
    ConfigStore.instance().store(name=config_module._SCHEMA_NAME, node=config_module.Config)
    ConfigStore.instance().store(name="grpo_ray_saved_run", node=node)
    hydra_overrides = [f"+{o}" if o.split("=", 1)[0] in GROUPS else o for o in overrides]
    try:
        with initialize_config_module("grpo_ray.conf", version_base=None):
            cfg = compose("grpo_ray_saved_run", overrides=hydra_overrides)
    except HydraException as e:
        raise config_module._explain(e, list(overrides)) from e
    config_module._check_known_keys(cfg)
    validate(cfg)
    return cfg


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json, checked for options the rollout's LoRA wrapper cannot reproduce."""
    lora = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    if lora.get("peft_type", "LORA") != "LORA":
        raise EvalError(f"{adapter_dir}: peft_type {lora.get('peft_type')!r}; only LoRA adapters are supported")
    unsupported = [k for k in _UNSUPPORTED_LORA if lora.get(k)]
    if unsupported:
        raise EvalError(f"{adapter_dir}: LoRA options {unsupported} are not supported by the rollout backend")
    return lora


# --- the evaluation ----------------------------------------------------------------------


def evaluate(cfg: DictConfig, target: Target, out: Path | str | None = None) -> dict[str, Any]:
    """Generate and score the task's split with `target`'s adapter; write the report; return it.

    1. load the split's prompts (generated tasks draw them with `eval.seed`);
    2. build the rollout actor in this process and load the adapter into it (version 0);
    3. per batch of `eval.batch_size` prompts: generate, score with every reward function;
    4. aggregate (`summarize`) and write JSON to `out` (default `<run>/eval/` + `report_name`).
    """
    import torch

    from grpo_ray.actors.rollout import RolloutActor
    from grpo_ray.data import load_prompts
    from grpo_ray.models import resolve_model_path
    from grpo_ray.rewards import load as load_reward
    from grpo_ray.rewards import start_sandbox
    from grpo_ray.types import AdapterWeights

    start = time.perf_counter()
    # 1. prompts
    rows = load_prompts(cfg.task, cfg.eval.seed).to_list()
    if not rows:
        raise EvalError(f"task {cfg.task.name!r} split {cfg.task.split!r} has no rows")
    funcs = [load_reward(path) for path in cfg.task.reward_funcs]
    if not funcs:
        raise EvalError("task.reward_funcs is empty: there is nothing to score completions with")
    names = unique_reward_names(funcs)
    start_sandbox(list(cfg.task.reward_funcs), funcs)  # code rewards: no sandbox here stops now, not with None scores
    # 2. model (+ adapter)
    device = "cuda" if cfg.cluster.placement != "cpu" and torch.cuda.is_available() else "cpu"
    actor = RolloutActor(cfg, resolve_model_path(cfg.model.name_or_path), device)
    if target.adapter is not None:
        from peft.utils import load_peft_weights

        actor.update_weights(AdapterWeights(version=0, tensors=load_peft_weights(str(target.adapter))))
    # 3. generate and score
    from tqdm import tqdm

    rollouts, scores = [], []
    with tqdm(total=len(rows), unit="prompt", desc="eval", disable=None) as bar:  # a bar on terminals only
        for s in range(0, len(rows), cfg.eval.batch_size):
            # sampled eval (k > 1) repeats exactly: each batch's seed comes from eval.seed and its position
            rollout = actor.generate(rows[s : s + cfg.eval.batch_size], version=0, seed=cfg.eval.seed * 100_003 + s)
            rollouts.append(rollout)
            scores.append(score_rollout(rollout, funcs, cfg.reward.timeout_s))
            bar.update(len(rollout.prompts))
    # 4. report
    report = {
        "target": str(target.path),
        "adapter": str(target.adapter) if target.adapter else None,
        "base_model": cfg.model.name_or_path,
        "task": {"name": cfg.task.name, "source": cfg.task.source, "path": cfg.task.path, "split": cfg.task.split,
                 "num_prompts": len(rows)},
        "decoding": {"greedy": cfg.eval.greedy, "k": cfg.rollout.num_generations,
                     "temperature": None if cfg.eval.greedy else cfg.rollout.temperature,
                     "max_completion_length": cfg.rollout.max_completion_length},
        "pass_threshold": cfg.eval.pass_threshold,
        **summarize(rollouts, scores, names, cfg.task.reward_weights, cfg.eval.pass_threshold),
        "time_s": round(time.perf_counter() - start, 2),
        "samples": logged_samples(rollouts, scores, names, cfg.eval.num_logged_samples),
    }  # fmt: skip
    path = Path(out) if out else target.report_dir / report_name(cfg, target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    report["path"] = str(path)
    return report


def report_name(cfg: DictConfig, target: Target) -> str:
    """`<task>-<split>[-k<k>][-base].json`: greedy and sampled reports of the same target side by side."""
    sampled = "" if cfg.eval.greedy else f"-k{cfg.eval.k}"
    return f"{cfg.task.name}-{cfg.task.split}{sampled}{'-base' if target.base else ''}.json"


def summarize(
    rollouts: Sequence[Rollout],
    scores: Sequence[RewardScores],
    names: Sequence[str],
    weights: Sequence[float] | None,
    threshold: float,
) -> dict[str, Any]:
    """Per reward function: mean over scored completions, pass@1 and pass@k (k = completions per
    prompt), how many completions it scored and how many calls failed; the weighted total reward
    (None counted as 0, as in training); completion length in tokens and the share cut at
    rollout.max_completion_length, over all completions.
    """
    weights = list(weights) if weights is not None else [1.0] * len(names)
    k = rollouts[0].num_generations
    values = [row for part in scores for row in part.values]  # [N][F]
    per_func: dict[str, Any] = {}
    for f, name in enumerate(names):
        column = [row[f] for row in values]
        scored = [v for v in column if v is not None]
        groups = [column[i : i + k] for i in range(0, len(column), k)]
        passes = [sum(v is not None and v > threshold for v in group) for group in groups]
        per_func[name] = {
            "mean": sum(scored) / len(scored) if scored else None,
            "pass@1": _mean([pass_at_k(k, c, 1) for c in passes]),
            **({f"pass@{k}": _mean([pass_at_k(k, c, k) for c in passes])} if k > 1 else {}),
            "scored": len(scored),
            "errors": sum(part.errors.get(name, 0) for part in scores),
        }
    totals = [sum(w * v for w, v in zip(weights, row) if v is not None) for row in values]
    lengths = [len(ids) for r in rollouts for ids in r.completion_ids]
    clipped = [reason == "length" for r in rollouts for reason in r.finish_reasons]
    return {
        "num_completions": len(values),
        "reward": {"mean": _mean(totals), "std": _std(totals)},
        "rewards": per_func,
        "completions": {"mean_length": _mean(lengths), "clipped_ratio": _mean(clipped)},
    }


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def logged_samples(
    rollouts: Sequence[Rollout], scores: Sequence[RewardScores], names: Sequence[str], limit: int
) -> list[dict[str, Any]]:
    """The first `limit` completions with their prompt, answer and per-function scores."""
    from grpo_ray.metrics import prompt_text

    out: list[dict[str, Any]] = []
    for rollout, part in zip(rollouts, scores):
        for i, (text, row) in enumerate(zip(rollout.completions, part.values)):
            if len(out) >= limit:
                return out
            b = i // rollout.num_generations
            sample = {"prompt": prompt_text(rollout.prompts[b]), "completion": text, "rewards": dict(zip(names, row))}
            if "answer" in rollout.columns:
                sample["answer"] = rollout.columns["answer"][b]
            out.append(sample)
    return out


def format_report(report: dict[str, Any]) -> str:
    """A few lines for the console: the task, then one line per reward function."""
    task, dec = report["task"], report["decoding"]
    mode = "greedy" if dec["greedy"] else f"k={dec['k']} at T={dec['temperature']}"
    lines = [
        f"{task['name']} ({task['split']}, {task['num_prompts']} prompts, {mode}): "
        f"reward {report['reward']['mean']:.3f}, mean length {report['completions']['mean_length']:.1f} tokens",
    ]
    width = max(len(name) for name in report["rewards"])
    for name, r in report["rewards"].items():
        mean = "-" if r["mean"] is None else f"{r['mean']:.3f}"
        extra = "".join(f"  {key} {r[key]:.3f}" for key in r if key.startswith("pass@") and key != "pass@1")
        lines.append(f"  {name:<{width}}  mean {mean:>6}  pass@1 {r['pass@1']:.3f}{extra}  errors {r['errors']}")
    lines.append(f"report: {report['path']}")
    return "\n".join(lines)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
