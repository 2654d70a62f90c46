"""FPT baseline (FP-quantized transformers, Algorithm 1): per linear layer, a joint
search of the format (among `fpt.candidates` of the layer's bit width) and of the
clipping max, for the input activation and for the weight, minimising the
Fisher-weighted output error (Eq. 15):

    E[ sum_i (dL/dO_i)^2 (O^_i - O_i)^2 ],   O = X W^T,  O^ = Q(X) Q(W)^T

with dL/dO from one float forward and backward per calibration window (the
diagonal Fisher of the layer output). Both operands get one static per-tensor
max (the paper's tensor-wise scale); the max of each candidate format is searched
on `fpt.steps` points evenly spaced over [gamma1, gamma2] x the tensor's max |.|,
alternating activation then weight for `fpt.rounds` rounds. Layers are searched
independently ("parallel" scheme): each sees the float inputs of the float model.

Not done: the pre-shifted (per-channel) exponent bias (`fpt.preshift` is rejected
when true) and the attention operand products. Every layer's inputs and output
gradients over the calibration windows are kept in memory (fp32): use few windows.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ConfigError
from ..formats import CastFormat, get_format
from ..quantizer import QuantSpec, fake_quantize
from ..surgery import QuantLinear, quantization_disabled, quantized_layers
from . import Method, register
from .mofq import candidates_for
from ..capture import model_device


def _tensor_static(spec: QuantSpec) -> QuantSpec:
    return spec if spec.is_identity else replace(spec, granularity="tensor", mode="static")


def configure(plan, cfg):
    d = plan.default
    plan.default = replace(d, weight=_tensor_static(d.weight), act=_tensor_static(d.act))


def collect(model, calib, bar):
    """Per quantized linear: its float inputs X [tokens, in] and squared output gradients G2 [tokens, out]."""
    layers = [(n, m) for n, m in quantized_layers(model)]
    inputs = {n: [] for n, _ in layers}
    grads = {n: [] for n, _ in layers}
    outputs, handles = {}, []

    def hook(name):
        def fn(_module, args, out):
            inputs[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())
            out.retain_grad()
            outputs[name] = out
        return fn

    for name, layer in layers:
        handles.append(layer.register_forward_hook(hook(name)))
    device = model_device(model)
    bar.start(len(calib))
    was_training = model.training
    try:
        with quantization_disabled(model), torch.enable_grad():
            for window in calib:
                ids = window[None].to(device)
                outputs.clear()
                logits = model(input_ids=ids, use_cache=False).logits
                loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                loss.backward()
                for name, out in outputs.items():
                    grads[name].append(out.grad.detach().reshape(-1, out.shape[-1]).float().pow(2).cpu())
                model.zero_grad(set_to_none=True)
                bar.advance(1, f"{len(layers)} layers")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: (torch.cat(inputs[n]), torch.cat(grads[n])) for n, _ in layers}


def fisher_error(x, w, g2, xq, wq) -> float:
    """Eq. 15: mean over output elements of (dL/dO)^2 (O^ - O)^2."""
    d = xq @ wq.T - x @ w.T
    return float((g2 * d.pow(2)).mean(dtype=torch.float64))


def _quantize(t, spec, fmt, amax):
    return fake_quantize(t, replace(spec, format=fmt), torch.tensor(amax, device=t.device))


def search_layer(x, w, g2, x_spec, w_spec, x_cands, w_cands, cfg):
    """Alternating joint (format, max) search for the input and the weight; returns the choice and errors."""
    f = cfg.fpt
    x_max, w_max = float(x.abs().max()), float(w.abs().max())
    state = {"x": (x_cands[0], x_max) if x_cands else None, "w": (w_cands[0], w_max) if w_cands else None}

    def operands(which=None, value=None):
        xs = value if which == "x" else state["x"]
        ws = value if which == "w" else state["w"]
        xq = x if xs is None else _quantize(x, x_spec, *xs)
        wq = w if ws is None else _quantize(w, w_spec, *ws)
        return xq, wq

    wq_cache = {}
    history = []
    for _ in range(f.rounds):
        for which, cands, top, t in (("x", x_cands, x_max, x), ("w", w_cands, w_max, w)):
            if not cands or top == 0:
                continue
            best = None
            ratios = sorted({1.0, *(f.gamma1 + (f.gamma2 - f.gamma1) * k / (f.steps - 1) for k in range(f.steps))})
            for fmt in cands:
                for ratio in ratios:
                    amax = top * ratio
                    if which == "x":
                        key = state["w"]
                        if key not in wq_cache:
                            wq_cache[key] = operands()[1]
                        err = fisher_error(x, w, g2, _quantize(x, x_spec, fmt, amax), wq_cache[key])
                    else:
                        xq = operands()[0]
                        err = fisher_error(x, w, g2, xq, _quantize(w, w_spec, fmt, amax))
                    if best is None or err < best[0]:
                        best = (err, fmt, amax)
            state[which] = (best[1], best[2])
            history.append(best[0])
    return state, history


def apply(ctx):
    model, calib, cfg, bar = ctx.model, ctx.calib, ctx.cfg, ctx.bar
    f = cfg.fpt
    layers = quantized_layers(model)
    for name, layer in layers:
        if not isinstance(layer, QuantLinear):
            raise RuntimeError(f"fpt: {name} is a {type(layer).__name__}; only nn.Linear layers are supported")
    data = collect(model, calib, bar)
    chosen = {}
    for name, layer in layers:
        x, g2 = data.pop(name)
        w = layer.weight.detach().float().cpu()
        x_spec, w_spec = layer.input_quantizer.spec, layer.weight_quantizer.spec
        x_cands = candidates_for(x_spec.format, f.candidates)
        w_cands = candidates_for(w_spec.format, f.candidates)
        n = min(len(x), f.max_tokens)
        x, g2 = x[:n], g2[:n]
        float_err = fisher_error(x, w, g2, x, w)
        state, history = search_layer(x, w, g2, x_spec, w_spec, x_cands, w_cands, cfg)
        entry = {"error": history[-1] if history else float_err, "rounds": history}
        device = layer.weight.device
        for role, q in (("x", layer.input_quantizer), ("w", layer.weight_quantizer)):
            if state[role] is not None:
                fmt, amax = state[role]
                q.configure(format=fmt)
                q.set_amax(torch.tensor(amax, device=device))
                entry["act" if role == "x" else "weight"] = {"format": fmt, "amax": amax}
        chosen[name] = entry
    return {"layers": chosen, "candidates": list(f.candidates), "rounds": f.rounds, "steps": f.steps,
            "gamma": [f.gamma1, f.gamma2], "calib_windows": len(calib), "calib_tokens": int(calib.numel())}


def validate(cfg):
    f = cfg.fpt
    if f.preshift:
        raise ConfigError("fpt.preshift (pre-shifted exponent bias) is not implemented yet")
    if f.rounds < 1 or f.steps < 2 or not 0 < f.gamma1 < f.gamma2:
        raise ConfigError("fpt needs rounds >= 1, steps >= 2 and 0 < gamma1 < gamma2")
    for c in f.candidates:
        try:
            if isinstance(get_format(c), CastFormat):
                raise ConfigError(f"fpt.candidates: {c!r} is a float cast, not a quantized format")
        except ValueError as err:
            raise ConfigError(f"fpt.candidates: {err}") from None
    for role in ("weight", "act"):
        try:
            candidates_for(getattr(cfg.format, role), f.candidates)
        except ConfigError as err:
            raise ConfigError(str(err).replace("mofq", "fpt")) from None


register(Method("fpt", configure=configure, apply=apply, validate=validate, needs_calibration=True))
