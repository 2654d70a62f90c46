"""MoFQ (mixture of formats, "INT or FP?"): per layer, the weight format and the
input activation format are each chosen from the candidates of the layer's bit
width (`mofq.candidates`: by default INT4 vs E2M1 for a 4-bit layer, INT8 vs
E4M3 for an 8-bit one), by the lowest error:

- `mofq.metric=mse` (MoFQ): mean squared error of the quantized tensor itself;
  activations over the calibration windows (the layer inputs of one float pass);
- `mofq.metric=output`: mean squared error of the layer's output when only that
  operand is quantized (the other one in float), on the same inputs.

Each candidate keeps the quantizer's scaling (granularity, block, scale dtype):
after `abfp`, the candidates are ABFP-n blocks in each format. Attention operands
and layer outputs keep their configured format. The choices and every candidate's
error go into the result (`methods.mofq.layers`); `qsim export-overrides` turns
them into a `quant.overrides` file.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from .. import reductions
from ..config import ConfigError
from ..formats import CastFormat, element_bits, get_format
from ..quantizer import QuantSpec, fake_quantize
from ..surgery import QuantHFConv1D, QuantLinear, quantized_layers
from ..capture import float_passes
from . import Method, register

METRICS = ("mse", "output")
STATIC_STAGES = ("mse", "rptq")  # stages that calibrate one static range for the configured format


def format_bits(name: str) -> int:
    return element_bits(get_format(name))


def candidates_for(fmt_name: str, candidates) -> list[str]:
    """The candidates with the bit width of `fmt_name` ([] for a float cast such as fp32: not searched)."""
    if isinstance(get_format(fmt_name), CastFormat):
        return []
    bits = format_bits(fmt_name)
    found = [c for c in candidates if format_bits(c) == bits]
    if not found:
        raise ConfigError(f"mofq: no candidate of {bits} bits for format {fmt_name!r} in mofq.candidates={list(candidates)}")
    return found


def _linear(layer, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The layer's matmul without bias (the bias cancels in an output difference)."""
    if isinstance(layer, QuantHFConv1D):
        return x @ w
    return F.linear(x, w)


def weight_errors(layer, spec: QuantSpec, candidates: list[str]) -> dict[str, float]:
    """Tensor MSE of the weight on each candidate's grid (same scaling)."""
    w = layer.weight.detach()
    return {c: float(reductions.mean((fake_quantize(w, replace(spec, format=c)) - w).float().pow(2))) for c in candidates}


class _Accumulator:
    """Sums of squared errors per candidate over the calibration windows, on the input's device."""

    def __init__(self, candidates):
        self.candidates, self.sums, self.count = candidates, None, 0

    def add(self, errors: torch.Tensor, count: int) -> None:
        self.sums = errors if self.sums is None else self.sums + errors
        self.count += count

    def means(self) -> dict[str, float]:
        return {c: float(s) / self.count for c, s in zip(self.candidates, self.sums)}


def _observer(layer, metric: str, act_acc: _Accumulator | None, weight_acc: _Accumulator | None, weight_spec: QuantSpec):
    """Sees each float input of `layer`; adds every candidate's squared error."""
    w = layer.weight.detach()
    weight_q = None
    if weight_acc is not None:  # output metric only: the quantized weights once, not per window
        weight_q = [fake_quantize(w, replace(weight_spec, format=c)) for c in weight_acc.candidates]

    def observe(quantizer, x):
        x = x.detach()
        if act_acc is not None:
            errs = []
            for c in act_acc.candidates:
                d = fake_quantize(x, replace(quantizer.spec, format=c)) - x
                if metric == "output":
                    d = _linear(layer, d, w)
                errs.append(reductions.total(d.float().pow(2)))
            act_acc.add(torch.stack(errs), d.numel())
        if weight_acc is not None:
            errs = []
            for wq in weight_q:
                d = _linear(layer, x, wq - w)
                errs.append(reductions.total(d.float().pow(2)))
            weight_acc.add(torch.stack(errs), d.numel())

    return observe


def apply(ctx):
    model, calib, cfg, bar = ctx.model, ctx.calib, ctx.cfg, ctx.bar
    m = cfg.mofq
    layers = quantized_layers(model)
    plan, observed = {}, []
    for name, layer in layers:
        for q in (layer.weight_quantizer, layer.input_quantizer):
            if q.spec.mode == "static":
                raise RuntimeError(f"mofq: {name} has a calibrated (static) quantizer; run mofq before the stage that calibrates it")
        wc = candidates_for(layer.weight_quantizer.spec.format, m.candidates)
        ac = candidates_for(layer.input_quantizer.spec.format, m.candidates)
        if m.metric == "output" and (wc or ac) and not isinstance(layer, (QuantLinear, QuantHFConv1D)):
            raise RuntimeError(f"mofq.metric=output: {name} is a {type(layer).__name__}; only linear layers are supported")
        entry = {"weight_candidates": wc, "act_candidates": ac}
        entry["act_acc"] = _Accumulator(ac) if ac else None
        entry["weight_acc"] = _Accumulator(wc) if wc and m.metric == "output" else None
        plan[name] = entry
        if entry["act_acc"] or entry["weight_acc"]:
            observed.append((name, layer))
    try:
        for name, layer in observed:
            e = plan[name]
            layer.input_quantizer.observer = _observer(layer, m.metric, e["act_acc"], e["weight_acc"], layer.weight_quantizer.spec)
        if observed:
            float_passes(model, calib, bar, f"{len(observed)} layers x candidates")
    finally:
        for _, layer in observed:
            layer.input_quantizer.observer = None

    chosen_layers, counts = {}, {"weight": {}, "act": {}}
    for name, layer in layers:
        e, out = plan[name], {}
        for role, quantizer in (("weight", layer.weight_quantizer), ("act", layer.input_quantizer)):
            cands = e[f"{role}_candidates"]
            if not cands:
                continue
            if role == "weight" and m.metric == "mse":
                errors = weight_errors(layer, quantizer.spec, cands)
            else:
                acc = e[f"{role}_acc"]
                if acc.count == 0:
                    raise RuntimeError(f"mofq: {name} was never reached by the calibration windows")
                errors = acc.means()
            best = min(cands, key=lambda c: errors[c])  # ties: the first candidate listed
            quantizer.configure(format=best)
            out[role] = {"format": best, "errors": errors}
            counts[role][best] = counts[role].get(best, 0) + 1
        if out:
            chosen_layers[name] = out
    return {
        "metric": m.metric,
        "candidates": list(m.candidates),
        "chosen": counts,
        "layers": chosen_layers,
        "calib_windows": len(calib),
        "calib_tokens": int(calib.numel()),
    }


def validate(cfg):
    m = cfg.mofq
    if m.metric not in METRICS:
        raise ConfigError(f"unknown mofq.metric {m.metric!r}; valid: {', '.join(METRICS)}")
    if not m.candidates:
        raise ConfigError("mofq.candidates is empty")
    for c in m.candidates:
        try:
            fmt = get_format(c)
        except ValueError as err:
            raise ConfigError(f"mofq.candidates: {err}") from None
        if isinstance(fmt, CastFormat):
            raise ConfigError(f"mofq.candidates: {c!r} is a float cast, not a quantized format")
    for role in ("weight", "act"):
        candidates_for(getattr(cfg.format, role), m.candidates)
    steps = list(cfg.method.steps)
    late = [s for s in STATIC_STAGES if s in steps]
    if late:
        raise ConfigError(f"mofq cannot be combined with {late}: their static ranges are calibrated for one format")


register(Method("mofq", apply=apply, validate=validate, needs_calibration=True))
