"""Recovery methods as composable stages, one file each, registered by name.

A stage has two hooks:
- `configure(plan, cfg)`: before surgery, adjust the quantizer plan
  (scaling granularity, static mode, attention) from the method's config;
- `apply(model, calib, cfg)`: after surgery, do the work on the simulated
  model with the calibration windows (`calib` is None for stages that need
  none) and return a dict of facts for the result (e.g. timings).

`method.steps` lists stages in order: `[smoothquant, abfp]` is ABFP-SQ.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

METHODS: dict[str, "Method"] = {}


def _nothing(*_args, **_kwargs):
    return None


@dataclass(frozen=True)
class Method:
    name: str
    configure: Callable = _nothing
    apply: Callable = _nothing
    validate: Callable = _nothing
    needs_calibration: bool = False


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


from . import abfp, rtn  # noqa: E402,F401  (registration side effects)
