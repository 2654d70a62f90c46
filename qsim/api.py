"""Python API: quantize a model you already hold, and evaluate it, as `qsim run` would.

    import qsim
    model, report = qsim.quantize(model, format="w4a8", method="abfp", tokenizer=tok, abfp__n=32)
    out = qsim.evaluate(model, tok, task="wikitext2", task__max_windows=8)

Keyword settings are config keys with "__" for "." (`abfp__n=32` is `abfp.n=32`); `overrides=`
takes Hydra override strings as typed on the command line. The config is validated as the CLI
validates it (a bad value raises config.ConfigError with the CLI's one-line message), the surgery
and the method stages are the CLI's, and a non-causal quantization is refused unless
`quant__causal=False`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import data
from .config import ConfigError, compose_config, validate
from .methods import METHODS
from .models import LoadedModel, family_of_model
from .presets import check_user_keys, user_keys
from .run import Bar, build_plan, calibrate, check_causal, check_positions
from .surgery import SurgeryReport, model_leaks, plan_leaks, quantize_model
from .tasks import TASKS, calibration_source


def _args(settings: dict, overrides) -> list[str]:
    """The settings and overrides as the command line would give them."""
    return [*(f"{key.replace('__', '.')}={_value(v)}" for key, v in settings.items()), *overrides]


def _config(settings: dict, overrides) -> object:
    from .cli import explain_compose_error

    args = _args(settings, overrides)
    try:
        return compose_config(args)
    except Exception as err:  # Hydra's errors, as the CLI words them
        raise ConfigError(explain_compose_error(err, args)) from None


def _value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "null"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


@dataclass
class Report:
    """What the simulation did to the model: the surgery's report, each method stage's facts, the
    resolved config, and whether every scale is causal."""
    surgery: SurgeryReport
    methods: dict
    config: object
    causal: bool
    causal_leaks: list[str] = field(default_factory=list)
    method_set: list[dict] = field(default_factory=list)  # what the method chose of the keys left to it

    @property
    def layers(self) -> list[str]:
        return self.surgery.layers

    @property
    def attention_sites(self) -> list[str]:
        return self.surgery.attention_sites


def quantize(model: torch.nn.Module, format: str = "w4a8", method: str = "abfp", *, tokenizer=None,
             calib: torch.Tensor | None = None, overrides=(), **settings) -> tuple[torch.nn.Module, Report]:
    """Quantize `model` in place with a format preset (or `format__weight=...`) and a method preset;
    calibration windows come from `calib` ([n, seq_len] token ids) or, with `tokenizer`, from
    `calib__dataset` as the CLI reads them. Returns the model and a Report."""
    cfg = _config({"format": format, "method": method, **settings}, overrides)
    validate(cfg)
    steps = [METHODS[s] for s in cfg.method.steps]
    needs_calib = any(m.needs_calibration for m in steps)
    if needs_calib and calib is None:
        if tokenizer is None:
            raise ConfigError(f"method {cfg.method.name!r} needs calibration data: pass calib= token windows or tokenizer=")
        data.check_available(*calibration_source(cfg))
    try:
        plan = build_plan(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    chosen = check_user_keys(cfg, user_keys(_args(settings, overrides)))  # a setting given here is the user's
    check_causal(plan_leaks(plan), cfg, ConfigError)
    config = getattr(model, "config", None)
    if needs_calib:
        length = cfg.calib.seq_len if calib is None else calib.shape[-1]
        check_positions(_with(cfg, "calib.seq_len", length), getattr(config, "max_position_embeddings", None),
                        reads="calib", model_name=type(model).__name__)
    torch.manual_seed(cfg.seed)
    surgery = quantize_model(model, plan)
    facts = calibrate(model, tokenizer, cfg, calib=calib)
    leaks = model_leaks(model)
    check_causal(leaks, cfg, ConfigError)
    return model, Report(surgery, facts, cfg, causal=not leaks, causal_leaks=leaks, method_set=chosen)


def _with(cfg, key: str, value):
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.update(out, key, value)
    return out


def evaluate(model: torch.nn.Module, tokenizer, task: str = "wikitext2", *, overrides=(), **settings) -> dict:
    """Score `model` on a task as `qsim run` does (task.* settings, e.g. `task__max_windows=8`);
    returns the task's output with its metric name."""
    family = family_of_model(model)
    cfg = _config({"task": task, **settings}, (*overrides, f"model.family={family}"))
    validate(cfg)  # the task scores this family, names and ranges
    spec = TASKS[cfg.task.name]
    spec.check(cfg)
    check_positions(cfg, getattr(getattr(model, "config", None), "max_position_embeddings", None),
                    model_name=type(model).__name__)
    lm = LoadedModel(model, tokenizer, source=type(model).__name__, family=family)
    out = spec.evaluate(lm, cfg, Bar(None, f"evaluate {task}"))
    return {"metric": spec.metric, **out}
