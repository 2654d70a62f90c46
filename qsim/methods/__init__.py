"""Recovery methods as composable stages, one file each, registered by name.

A stage has these hooks:
- `configure(plan, cfg)`: before surgery, adjust the quantizer plan
  (scaling granularity, static mode, attention) from the method's config;
- `apply(ctx)`: after surgery, do the work on `ctx.model` (a StageContext:
  the simulated model, its tokenizer, the calibration windows `ctx.calib` (a
  LongTensor [n_samples, seq_len], None for stages that need none), the run
  config `ctx.cfg`, and a progress bar `ctx.bar` (`start(total)`,
  `advance(n, info)`)), and return a dict of facts for the result. A stage
  takes what it needs from the context and never reloads it;
- `validate(cfg)`: raise config.ConfigError for bad values (runs before any
  model loads);
- `reads(cfg)`: the (dataset, split) pairs `apply` reads itself (beyond the
  calibration windows), for the result's identity.
A stage that needs each weight as it was before an earlier stage rounded it
in place (LoRC after GPTQ) sets `reads_float_weights`; such a stage keeps a
float copy on the layer (`layer.float_weight`, [out, in]) for it.

`method.steps` lists stages in order: `[smoothquant, abfp]` is ABFP-SQ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

METHODS: dict[str, "Method"] = {}


from ..capture import StopForward  # noqa: E402,F401  (re-exported: stages raise it from hooks)


class MethodError(RuntimeError):
    """A stage cannot do what was asked on this model (nothing to smooth, calibrate, round or train):
    one line, and the run stops instead of reporting a number the stage did not shape."""



def _nothing(*_args, **_kwargs):
    return None


class SilentBar:
    """A progress bar that shows nothing (tests, benches, the Python API)."""

    def start(self, total: int) -> None:
        pass

    def advance(self, n: int = 1, info: str = "") -> None:
        pass


@dataclass
class StageContext:
    """What a stage works on: the simulated model, the calibration windows, the run config, a
    progress bar and the model's tokenizer (QAT reads its training text with it)."""
    model: Any
    calib: Any  # LongTensor [n_samples, seq_len] or None
    cfg: Any
    bar: Any = None
    tokenizer: Any = None

    def __post_init__(self):
        if self.bar is None:
            self.bar = SilentBar()


def _no_data(_cfg):
    return []


@dataclass(frozen=True)
class Method:
    name: str
    configure: Callable = _nothing
    apply: Callable = _nothing
    validate: Callable = _nothing
    needs_calibration: bool = False
    reads: Callable = _no_data
    reads_float_weights: bool = False


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def _register_all() -> None:
    """Import every module in this package: each registers its stage(s)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()
