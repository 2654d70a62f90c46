"""Structured (typed) Hydra config. Hydra checks keys and types against these
dataclasses; `validate` checks names and ranges. Both run before any model loads."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import MISSING

# formats and quantizer (torch) are imported where used: `qsim tables` reads the
# schema's defaults (result identity) without loading torch.

# The repo's conf/, beside the code: qsim/conf is a symlink to it in a checkout and a copy
# (package data) in an installed wheel, so one path serves every install.
CONF_DIR = Path(__file__).resolve().parent / "conf"
ROUNDINGS = ("nearest", "away", "stochastic")


class ConfigError(ValueError):
    """A bad name or value in the run config; the CLI prints it on one line, exit 2."""


@dataclass
class ModelConfig:
    name: str = MISSING
    source: str = "gguf"  # gguf | hub | tiny-opt | sbert (a sentence-embedding encoder)
    hf_id: str = ""
    checkpoint: str = "base"  # base | paper
    paper_hf_id: str = ""
    dtype: str = "float32"
    device_map: Optional[str] = None  # e.g. "auto": accelerate spreads a big model over devices
    revision: Optional[str] = None
    post_ln: bool = False  # tiny-opt only
    seed: int = 0  # tiny-opt and tiny only
    # causal-lm | code-lm | qa-encoder | sentence-encoder | seq-classifier | image-classifier;
    # null = what the source implies (sbert: sentence-encoder, else causal-lm)
    family: Optional[str] = None
    arch: str = ""  # source=tiny: llama | codegen | bert | vit (random weights, 2 layers, 64 wide)


@dataclass
class FormatConfig:
    name: str = MISSING
    weight: str = "fp32"
    act: str = "fp32"
    attn: Optional[str] = None  # attention matmul operands; None = same as act
    output: str = "fp32"


@dataclass
class QuantizerConfig:
    granularity: str = "tensor"
    axis: int = -1
    block: int = 64
    scale_dtype: str = "fp32"
    symmetric: bool = True


@dataclass
class QuantConfig:
    weight: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(granularity="channel"))
    act: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(granularity="token"))
    rounding: str = "nearest"
    scale_rule: str = "floor"  # E8M0 (MX) scales: floor (OCP v1.0) | ceil (no element saturates)
    attention: bool = False
    v_axis: str = "head_dim"  # attention V scaled per token along head_dim (causal), or along seq
    causal: bool = True  # false: allow scales that see later tokens or other samples (result says causal: false)
    accum: str = "fp32"  # accumulator of quantized matmuls: fp32 | bf16 | fp16 (qsim/accum.py)
    accum_chunk: Optional[int] = None  # with bf16/fp16: products per partial sum promoted to fp32; null: none
    skip: list[str] = field(default_factory=lambda: ["lm_head", "*embed*", "*project_in", "*project_out"])
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    name: str = MISSING
    steps: list[str] = field(default_factory=list)


@dataclass
class AbfpConfig:
    n: int = 64
    scale_dtype: str = "bf16"
    act_axis: int = -1  # the reduction axis of the following matmul
    attention: bool = True
    scale_format: Optional[str] = None  # second-level (VS-Quant) quantization of the scales


@dataclass
class MseConfig:
    calibrator: str = "mse"  # mse | max | percentile | entropy (activations; weights use per-channel max)
    percentile: float = 99.99
    candidates: int = 100  # amax candidates of the coarse search (half linear, half geometric); a fine grid of half as many follows
    attention: bool = True  # also quantize (and calibrate) the attention matmul operands, as the paper's simulator does


@dataclass
class MofqConfig:
    # per layer, weight and input formats are chosen among the candidates of the layer's bit width
    candidates: list[str] = field(default_factory=lambda: ["int4", "e2m1", "int8", "e4m3"])
    metric: str = "mse"  # mse: the tensor's own error (MoFQ) | output: the layer output's error


@dataclass
class FptConfig:
    # formats searched per operand among those of the layer's bit width (FP4: E2M1, E1M2, E3M0; FP8: E4M3, E5M2, E3M4)
    candidates: list[str] = field(default_factory=lambda: ["e2m1", "e1m2", "e3m0", "e4m3", "e5m2", "e3m4"])
    rounds: int = 3
    steps: int = 100  # max candidates, evenly over [gamma1, gamma2] x max|tensor| (plus the max itself)
    gamma1: float = 0.01
    gamma2: float = 1.2
    preshift: bool = False  # pre-shifted per-channel exponent bias (FPT; the fpt preset turns it on); false = FPT baseline
    max_tokens: int = 4096  # calibration tokens per layer the search scores (first ones)
    weight_granularity: str = "tensor"  # static weight max per tensor, or per output channel (the paper's; the fpt preset)
    attention: bool = False  # also search the attention products QK^T and PV (quantizes them, static per tensor)


@dataclass
class SensitivityConfig:
    windows: int = 4  # calibration windows (calib.dataset, calib.split, calib.seed) the loss is measured on
    seq_len: int = 256  # tokens per window (4 x 256 on SmolLM2: under 15 minutes on 2 cores; 4 x 512 took 30)
    top: int = 10  # layers printed
    units: list[str] = field(default_factory=lambda: ["*"])  # fnmatch patterns of the layers / attention sites measured


@dataclass
class SmoothQuantConfig:
    alpha: float = 0.5
    scope: str = "norm"  # norm: linears reading a norm's output or sharing one input (q/k/v), as the reference; all: every linear


@dataclass
class GPTQConfig:
    block_size: int = 128
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    act_order: bool = False
    group_size: Optional[int] = None  # None: one scale per output row
    symmetric: bool = False  # the reference GPTQ uses asymmetric INT4
    granularity: Optional[str] = None  # None: channel (or group_size); "block" follows abfp.n
    max_blocks: Optional[int] = None  # quantize only the first k decoder blocks (quick looks); later ones keep RTN


@dataclass
class RPTQConfig:
    clusters: int = 8
    norm_out_8bit: bool = False  # the reference keeps LayerNorm outputs at 8 bits even in W4A4
    kmeans_iters: int = 25
    asymmetric: bool = True  # per-cluster zero point for INT activation formats (the reference); minifloats are symmetric


@dataclass
class QATConfig:
    steps: int = 200
    lr: float = 1e-5
    weight_decay: float = 0.0
    seq_len: int = 256
    batch_size: int = 1
    grad_checkpointing: bool = True
    freeze_embeddings: bool = True  # embeddings and LM head fixed (tied in SmolLM2): less memory, faster steps
    dataset: str = "sst2"  # training text disjoint from the WikiText-2 evaluation text
    split: str = "train"


@dataclass
class RotateConfig:
    seed: int = 0  # random signs of the residual Hadamard (or the random orthogonal matrix)
    residual: str = "hadamard"  # hadamard (randomized; Kronecker of known orders for other sizes) | random (orthogonal)
    # | online (norms keep their scales; the randomized Hadamard runs online on each norm's output, see methods/rotate.py)
    # | none (only the online / ov / qk rotations below)
    online: bool = True  # Hadamard on down_proj / fc2 inputs, applied at run time, inverse fused into the weight
    ov: bool = True  # head-wise Hadamard on V (fused into v_proj) and O (fused into o_proj)
    qk: bool = True  # head-dim Hadamard on Q and K after RoPE, when the attention matmuls are quantized


@dataclass
class LorcConfig:
    rank: int = 8  # rank of the correction factors of W - W_quantized; 0 = no correction
    format: str = "fp16"  # format of the factors (fp16, bf16, fp32, or an int/minifloat format with per-row scales)


@dataclass
class TaskConfig:
    name: str = MISSING
    protocol: str = "gptq"  # gptq | paper
    split: str = "test"
    seq_len: int = 512
    max_windows: Optional[int] = 40
    batch_size: int = 1
    max_samples: Optional[int] = None  # tasks scored per sample (stsb, sst2, squad, humaneval): how many; null = all
    max_new_tokens: int = 32  # generative tasks: greedy tokens per answer (squad) or completion (humaneval: 512)
    stride: int = 128  # extractive squad: overlap of the context windows of seq_len tokens
    max_answer_tokens: int = 30  # extractive squad: longest answer span
    timeout: float = 10.0  # humaneval: seconds each generated program may run
    # humaneval: run generated code with limits only when its sandbox cannot be set up (result.json records it)
    allow_unsandboxed: bool = False
    # lm_eval: lm-evaluation-harness task names (a YAML path only inside task.include_path)
    tasks: List[str] = field(default_factory=list)
    # lm_eval: a folder of extra lm-eval task YAMLs. They are code: `!function` imports Python and
    # prompt templates render unsandboxed, with your rights; name only a folder you trust.
    include_path: Optional[str] = None
    # lm_eval: lm-eval's confirm_run_unsafe_code (tasks that execute model output); off unless set here
    confirm_run_unsafe_code: bool = False


@dataclass
class CalibConfig:
    dataset: str = "ptb"
    split: str = "test"
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0


@dataclass
class RunConfig:
    model: ModelConfig = MISSING
    format: FormatConfig = MISSING
    method: MethodConfig = MISSING
    task: TaskConfig = MISSING
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    abfp: AbfpConfig = field(default_factory=AbfpConfig)
    mse: MseConfig = field(default_factory=MseConfig)
    mofq: MofqConfig = field(default_factory=MofqConfig)
    fpt: FptConfig = field(default_factory=FptConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    rptq: RPTQConfig = field(default_factory=RPTQConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    rotate: RotateConfig = field(default_factory=RotateConfig)
    lorc: LorcConfig = field(default_factory=LorcConfig)
    seed: int = 0
    progress: bool = True


PROTOCOLS = ("gptq", "paper")
MODEL_SOURCES = ("gguf", "hub", "tiny-opt", "sbert", "tiny")
DTYPES = ("float32", "bfloat16", "float16")


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="format", name="format_schema", node=FormatConfig)
    cs.store(group="method", name="method_schema", node=MethodConfig)
    cs.store(group="task", name="task_schema", node=TaskConfig)


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _choice(what: str, value, valid) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


def _check_format(where: str, name: str) -> None:
    from .formats import UnknownFormat, get_format
    from .quantizer import SCALED_FORMATS

    if name.lower() in SCALED_FORMATS:
        return
    try:
        get_format(name)
    except UnknownFormat as err:
        raise ConfigError(f"{where}: {err}, or a scaled format: {', '.join(SCALED_FORMATS)}") from None
    except ValueError as err:  # e.g. int1: bits out of range
        raise ConfigError(f"{where}={name!r}: {err}") from None


def validate(cfg) -> None:
    """Check every name and range; raise ConfigError with the valid choices."""
    from .methods import METHODS
    from .quantizer import GRANULARITIES, SCALE_DTYPES, SCALE_RULES, QuantSpec
    from .surgery import V_AXES
    from .tasks import TASKS

    from .models import FAMILIES, TINY_ARCHS, family_of

    _choice("model source", cfg.model.source, MODEL_SOURCES)
    if cfg.model.family is not None:
        _choice("model.family", cfg.model.family, FAMILIES)
    if cfg.model.source == "tiny":
        _choice("model.arch", cfg.model.arch, TINY_ARCHS)
        if family_of(cfg.model) not in TINY_ARCHS[cfg.model.arch]:
            raise ConfigError(f"model.arch={cfg.model.arch} has no {family_of(cfg.model)}; set model.family to one of: "
                              + ", ".join(TINY_ARCHS[cfg.model.arch]))
    _choice("model.dtype", cfg.model.dtype, DTYPES)
    _choice("model.checkpoint", cfg.model.checkpoint, ("base", "paper"))
    if cfg.model.checkpoint == "paper" and not cfg.model.paper_hf_id:
        raise ConfigError(f"model {cfg.model.name!r} has no paper checkpoint; only opt-* models do")
    for role in ("weight", "act", "output"):
        _check_format(f"format.{role}", getattr(cfg.format, role))
    if cfg.format.attn is not None:
        _check_format("format.attn", cfg.format.attn)
    for role in ("weight", "act"):
        q = getattr(cfg.quant, role)
        _choice(f"quant.{role}.granularity", q.granularity, GRANULARITIES)
        _choice(f"quant.{role}.scale_dtype", q.scale_dtype, SCALE_DTYPES)
        if q.block < 1:
            raise ConfigError(f"quant.{role}.block must be >= 1, got {q.block}")
    _choice("quant.rounding", cfg.quant.rounding, ROUNDINGS)
    _choice("quant.scale_rule", cfg.quant.scale_rule, SCALE_RULES)
    _choice("quant.v_axis", cfg.quant.v_axis, V_AXES)
    from .accum import Accumulator  # torch: not at import (qsim tables never loads it)

    try:
        Accumulator(cfg.quant.accum, cfg.quant.accum_chunk)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    for pattern, override in (cfg.quant.overrides or {}).items():
        if not hasattr(override, "keys"):
            raise ConfigError(f"quant.overrides[{pattern!r}] must map weight/act/output to a format")
        for role, value in override.items():
            _choice(f"quant.overrides[{pattern!r}] key", role, ("weight", "act", "output"))
            _check_format(f"quant.overrides[{pattern!r}].{role}", value if isinstance(value, str) else value.get("format", "fp32"))
    for step in cfg.method.steps:
        _choice("method step", step, sorted(METHODS))
    if cfg.abfp.n < 1:
        raise ConfigError(f"abfp.n (block length) must be >= 1, got {cfg.abfp.n}")
    _choice("abfp.scale_dtype", cfg.abfp.scale_dtype, SCALE_DTYPES)
    if cfg.abfp.scale_format is not None:
        _check_format("abfp.scale_format", cfg.abfp.scale_format)
        try:  # the quantizer's own rule for two-level scales
            QuantSpec("int4", "block", scale_dtype=cfg.abfp.scale_dtype, scale_format=cfg.abfp.scale_format)
        except ValueError as err:
            raise ConfigError(f"abfp.scale_format={cfg.abfp.scale_format!r}: {err} (e.g. int8, e4m3)") from None
    _choice("task", cfg.task.name, sorted(TASKS))
    from .data import TEXT_DATASETS
    from .tasks import TASK_CALIBRATION

    _choice("calib.dataset", cfg.calib.dataset, (*TEXT_DATASETS, TASK_CALIBRATION))
    own = TASKS[cfg.task.name].calibration
    if cfg.calib.dataset == TASK_CALIBRATION and cfg.calib.split != CalibConfig.split:
        raise ConfigError(f"calib.split={cfg.calib.split} names a corpus split; with calib.dataset=task the task's "
                          f"own is read ({f'{own.dataset} {own.split}' if own else f'task {cfg.task.name} has none'})")
    if family_of(cfg.model) not in TASKS[cfg.task.name].families:
        raise ConfigError(f"task={cfg.task.name} scores {' or '.join(TASKS[cfg.task.name].families)} models; "
                          f"model {cfg.model.name!r} is a {family_of(cfg.model)} (model.family)")
    _choice("task.protocol", cfg.task.protocol, PROTOCOLS)
    if cfg.task.seq_len < 2:
        raise ConfigError(f"task.seq_len must be >= 2, got {cfg.task.seq_len}")
    if cfg.task.max_windows is not None and cfg.task.max_windows < 1:
        raise ConfigError(f"task.max_windows must be >= 1 or null (all), got {cfg.task.max_windows}")
    if cfg.task.batch_size < 1:
        raise ConfigError(f"task.batch_size must be >= 1, got {cfg.task.batch_size}")
    if cfg.task.max_samples is not None and cfg.task.max_samples < 1:
        raise ConfigError(f"task.max_samples must be >= 1 or null (all), got {cfg.task.max_samples}")
    if cfg.task.max_new_tokens < 1:
        raise ConfigError(f"task.max_new_tokens must be >= 1, got {cfg.task.max_new_tokens}")
    if not (math.isfinite(cfg.task.timeout) and cfg.task.timeout > 0):
        raise ConfigError(f"task.timeout must be a positive number of seconds, got {cfg.task.timeout}")
    _check_lm_eval_keys(cfg.task)
    if cfg.task.allow_unsandboxed and cfg.task.name != "humaneval":
        raise ConfigError(f"task.allow_unsandboxed is read by task=humaneval only; task={cfg.task.name} would ignore it")
    if cfg.calib.n_samples < 1 or cfg.calib.seq_len < 2:
        raise ConfigError("calib.n_samples must be >= 1 and calib.seq_len >= 2")
    for step in cfg.method.steps:
        METHODS[step].validate(cfg)


def _check_lm_eval_keys(task) -> None:
    """The lm_eval-only keys: refused where they would be ignored; include_path must exist."""
    if task.name != "lm_eval":
        for key, default in (("include_path", None), ("confirm_run_unsafe_code", False)):
            if task[key] != default:
                raise ConfigError(f"task.{key} is read by task=lm_eval only; task={task.name} would ignore it")
        return
    if task.include_path is not None and not Path(task.include_path).expanduser().is_dir():
        raise ConfigError(f"task.include_path={task.include_path} is not a folder (lm-eval task YAMLs)")


def compose_config(overrides=()):
    """The run config for a list of Hydra overrides, without running Hydra's app
    (for tests and the Python API): `compose_config(["format=w4a8"])`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qsim"):
            return compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()
