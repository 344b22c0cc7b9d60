"""The config schema: one dataclass per group, composed into `PretrainConfig` and registered
with Hydra's ConfigStore, so that a mistyped or unknown key is an error, never a silent default.
The model and data groups' schemas are the plain dataclasses their packages build from
(`model.ModelArgs`, `data.args.DataArgs`): one schema per group, no copies. `validate()` checks
the values that the types cannot, before any model is built."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from omegaconf import MISSING, OmegaConf

from data.args import DataArgs
from model import ModelArgs
from parallel.fp8 import Fp8Config

from . import metap

from .phases import Phase, PhaseConfig, resolve_phases

# dtypes are spelled as torch spells them; the short names are accepted on input.
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class RunConfig:
    dir: str = "outputs/${run.name}"  # metrics.jsonl, config.yaml and checkpoints go here
    name: str = "${herd_preset:}"  # the model preset's name (+model=NAME); "herd" without one


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 0
    batch_size: int = 8  # rows per rank per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    max_grad_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # autocast dtype: auto (bfloat16 on CUDA, none on CPU) | float32 | bfloat16
    max_nonfinite_in_row: int = 3  # skip a step with a non-finite loss or grad norm; stop after this many in a row
    preflight: bool = True  # refuse, before building anything, a run whose memory estimate exceeds a rank's device
    faults: "FaultsConfig" = field(default_factory=lambda: FaultsConfig())


@dataclass
class FaultsConfig:
    """Deliberate faults that tests use to prove the recovery paths; leave them alone."""

    nan_steps: list[int] = field(default_factory=list)  # make the loss non-finite at these steps
    empty_steps: list[int] = field(default_factory=list)  # take every target token out of these steps' batches
    hang_rank: int = -1  # this rank sleeps hang_seconds before step hang_step
    hang_step: int = -1
    hang_seconds: float = 0.0
    crash_in_save_step: int = -1  # exit abruptly while writing this step's checkpoint


@dataclass
class OptimConfig:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # warmup-stable-decay: the last 20% of steps decay linearly
    min_lr_ratio: float = 0.0  # lr at the end of decay, as a fraction of lr
    # MetaP (train/metap.py): per-parameter init and LR/wd/eps multipliers relative to
    # model.metap_base, so an lr tuned on a proxy transfers; false: the standard parametrisation
    metap: bool = False


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # FSDP ranks; -1: world_size / dp_replicate
    dp_replicate: int = 1  # HSDP replicas (replicate across, shard within)
    ep: int = 1  # expert-parallel ranks, carved out of dp_shard
    cp: int = 1  # context-parallel ranks sharing each row (parallel/context.py), carved out of dp_shard
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    param_dtype: str = "auto"  # FSDP compute dtype: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16
    reduce_dtype: str = "float32"
    activation_checkpointing: bool = False
    # With activation checkpointing and ep > 1: the recomputation in backward reuses the rows each
    # block's all-to-alls received (true: no second exchange, 2 x top_k x dim activations per token
    # and MoE layer kept) or exchanges them again (false: that memory freed, 1.5x the all-to-all bytes)
    replay_exchanges: bool = True
    compile: bool = False  # torch.compile each transformer block
    timeout_s: int = 600  # a collective that hangs this long raises
    # FP8 matmuls in the blocks' linears and routed experts (docs/fp8.md); the schema is parallel/'s own
    fp8: Fp8Config = field(default_factory=Fp8Config)


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every N steps (and at the end); 0: only at the end
    keep: int = 3  # keep the last K checkpoints
    load: str | None = None  # start a new run from this checkpoint (another run's, or converted from HF)
    weights_only: bool = False  # with load: take the weights only (fresh optimizer, step 0)
    resume: bool = True  # a rerun continues from the latest checkpoint in run.dir
    async_save: bool = False  # write checkpoints in the background while training goes on
    export_hf: str | None = None  # at the end, also write the weights as a Hugging Face folder here


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline: files in ${run.dir}/wandb for `wandb sync` | online | disabled
    project: str = "herd"
    entity: str | None = None  # team or user; None: the account's default
    name: str | None = None  # display name; None: the last component of run.dir
    group: str | None = None  # e.g. one group per sweep
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    interval: int = 1  # steps between metrics.jsonl lines and console lines
    expert_table_interval: int = 100  # steps between full tokens-per-expert tables (expert_counts); 0: never
    # Loss per bucket of in-document position (edges, ascending), logged when seq_len passes the first
    # edge: loss/pos_0-1K, loss/pos_1K-8K, ... ([] : off)
    position_buckets: list[int] = field(default_factory=lambda: [1024, 8192, 32768, 131072])
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PlanConfig:
    """launch/plan.py only: the cluster to plan for."""

    gpus: int = 0  # plan the run for this many GPUs (0: count parameters only)
    gpu: str = "h100"  # h100 | h200 | b200: the memory per GPU (train/memory.py GPUS)
    # Also run one step of the real code at plan.gpus ranks in this process (fake process group,
    # fake tensors; train/trace.py) and print what it counted beside the estimate.
    trace: bool = False


@dataclass
class DistillConfig:
    """Distillation from a teacher (train/distill.py, docs/distillation.md)."""

    teacher: str | None = None  # a herd checkpoint or run directory, or a Hugging Face folder; null: no teacher
    temperature: float = 1.0
    weight: float = 0.5  # the soft targets' weight (1 - weight on the hard labels) at the first step
    weight_end: float | None = None  # ... moved linearly to this by the last step (null: constant)
    chunk_size: int = 4096  # tokens whose logits exist at once, for each model
    # Cached targets (launch/cache_teacher.py writes them; a run with distill.cache set trains
    # from them, without the teacher in memory): top-k probabilities or k draws per token.
    cache: str | None = None
    cache_kind: str = "sampled"  # topk | sampled
    cache_k: int = 12


@dataclass
class PretrainConfig:
    model: ModelArgs = MISSING  # choose a preset: +model=tiny | scout | maverick | behemoth
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataArgs = field(default_factory=DataArgs)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    phases: list[PhaseConfig] = field(default_factory=list)  # none: one phase of train.* (train/phases.py)
    plan: PlanConfig = field(default_factory=PlanConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def _preset_name() -> str:
    """The chosen model preset (`+model=NAME`), for run.name; "herd" outside a Hydra job or
    without a preset, so that a missing +model reaches the "choose a model preset" message."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return "herd"
    return HydraConfig.get().runtime.choices.get("model") or "herd"


def _muldiv(value: int, num: int, den: int = 1) -> int:
    """`${herd_muldiv:${model.dim},3,2}` = dim x 3 / 2, for shapes derived from a swept width
    (configs/experiment/metap_width.yaml); a result that is not whole is an error, not a rounding."""
    if (value * num) % den:
        raise ValueError(f"herd_muldiv: {value} x {num} / {den} is not a whole number; choose a value "
                         f"whose multiple by {num} divides by {den}")
    return value * num // den


def register_configs() -> None:
    """The primary schema types every group (`model: ModelArgs`, `data: DataArgs`, ...), so the
    group files need no schema of their own and Hydra lists only real choices in its errors."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pretrain_schema", node=PretrainConfig)
    if not OmegaConf.has_resolver("herd_preset"):
        OmegaConf.register_new_resolver("herd_preset", _preset_name)
    if not OmegaConf.has_resolver("herd_muldiv"):
        OmegaConf.register_new_resolver("herd_muldiv", _muldiv)


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def validate(cfg: PretrainConfig) -> list[Phase]:
    """Values the schema's types cannot check. Raises ValueError naming the key and value.
    Returns the run's resolved phases (train/phases.py), which the checks build anyway."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    t, o, p = cfg.train, cfg.optim, cfg.parallel
    for group, key in (("train", "dtype"), ("parallel", "param_dtype"), ("parallel", "reduce_dtype"),
                       ("data", "image_dtype")):
        value = cfg[group][key]
        cfg[group][key] = DTYPE_ALIASES.get(value, value)
    for key in ("steps", "batch_size", "grad_accum", "seq_len"):
        need(getattr(t, key) > 0, f"train.{key}={getattr(t, key)} must be positive")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm={t.max_grad_norm} must be >= 0")
    need(t.max_nonfinite_in_row >= 0, f"train.max_nonfinite_in_row={t.max_nonfinite_in_row} must be >= 0")
    _choice("train.device", t.device, ("auto", "cpu", "cuda"))
    _choice("train.dtype", t.dtype, ("auto", "float32", "bfloat16"))
    need(t.seq_len <= cfg.model.max_seq_len,
         f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    need(o.lr > 0, f"optim.lr={o.lr} must be positive")
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    need(o.eps > 0, f"optim.eps={o.eps} must be positive")
    need(p.timeout_s > 0, f"parallel.timeout_s={p.timeout_s} must be positive (seconds a collective may take)")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim betas ({o.beta1}, {o.beta2}) must be in [0, 1)")
    need(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    need(0 <= o.decay_fraction <= 1, f"optim.decay_fraction={o.decay_fraction} must be in [0, 1]")
    need(0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _choice("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
    _choice("parallel.param_dtype", p.param_dtype, ("auto", "float32", "bfloat16"))
    _choice("parallel.reduce_dtype", p.reduce_dtype, ("float32", "bfloat16"))
    need(p.ep >= 1, f"parallel.ep={p.ep} must be >= 1")
    need(p.cp >= 1, f"parallel.cp={p.cp} must be >= 1")
    need(p.dp_replicate >= 1, f"parallel.dp_replicate={p.dp_replicate} must be >= 1")
    Fp8Config(p.fp8.recipe, p.fp8.backend, p.fp8.all_gather).validate()
    phases = resolve_phases(cfg, model_args(cfg), data_args(cfg))  # ModelArgs, DataArgs and every phase
    for phase in phases:
        need(phase.seq_len % (2 * p.cp) == 0,
             f"seq_len {phase.seq_len} (phase {phase.name}) must be a multiple of 2 x parallel.cp = {2 * p.cp}: "
             "each context-parallel rank holds two equal pieces of every row; change the seq_len or parallel.cp")
    need(cfg.checkpoint.interval >= 0, f"checkpoint.interval={cfg.checkpoint.interval} must be >= 0")
    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep={cfg.checkpoint.keep} must be >= 1")
    need(cfg.logging.interval >= 1, f"logging.interval={cfg.logging.interval} must be >= 1")
    need(cfg.logging.expert_table_interval >= 0,
         f"logging.expert_table_interval={cfg.logging.expert_table_interval} must be >= 0")
    edges = list(cfg.logging.position_buckets)
    need(all(e > 0 for e in edges) and edges == sorted(set(edges)),
         f"logging.position_buckets={edges} must be positive and ascending")
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, ("online", "offline", "disabled"))
    d = cfg.distill
    need(d.temperature > 0, f"distill.temperature={d.temperature} must be positive")
    for key in ("weight", "weight_end"):
        value = d[key]
        need(value is None or 0 <= value <= 1, f"distill.{key}={value} must be in [0, 1]")
    need(d.chunk_size > 0, f"distill.chunk_size={d.chunk_size} must be positive")
    _choice("distill.cache_kind", d.cache_kind, ("topk", "sampled"))
    need(d.cache_k > 0, f"distill.cache_k={d.cache_k} must be positive")
    if d.teacher is not None and not os.path.exists(d.teacher):
        raise FileNotFoundError(f"distill.teacher={d.teacher!r} does not exist")
    return phases


def config_for_disk(cfg) -> dict:
    """The resolved config as a plain dict for config.yaml and wandb, except that values read
    from the environment (`${oc.env:...}`, e.g. a token in a pipe: url) keep their interpolation:
    a secret never reaches a file."""
    def merge(resolved, raw):
        if isinstance(raw, str) and ("${oc.env:" in raw or "${env:" in raw):
            return raw
        if isinstance(resolved, dict) and isinstance(raw, dict):
            return {k: merge(v, raw.get(k)) for k, v in resolved.items()}
        if isinstance(resolved, list) and isinstance(raw, list) and len(resolved) == len(raw):
            return [merge(v, r) for v, r in zip(resolved, raw)]
        return resolved

    return merge(OmegaConf.to_container(cfg, resolve=True), OmegaConf.to_container(cfg, resolve=False))


def model_args(cfg) -> ModelArgs:
    """The validated ModelArgs of a composed config (with MetaP's forward multipliers when
    optim.metap is on)."""
    args = ModelArgs(**OmegaConf.to_container(cfg.model, resolve=True))
    if cfg.optim.metap:
        args = metap.with_multipliers(args)
    return args.validate()


def data_args(cfg) -> DataArgs:
    """The validated DataArgs of a composed config (sources become `Source` objects)."""
    return OmegaConf.to_object(cfg.data).validate()
