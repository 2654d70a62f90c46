"""FPT (FP-quantized transformers, Algorithm 1 and Sec. 4.3): per linear layer, a joint
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

Pre-shifted exponent bias (`fpt.preshift`, Eqs. 17-22): input channel j gets an
integer exponent s_j = clip(floor(log2(M / m_j)), 0, 2^e - 1), m_j its max |.| over
the calibration tokens, M the largest m_j, e the candidate format's exponent bits
(0 for INT). The input is quantized as X * 2^s with one per-tensor max (the searched
rho), and the quantized weight's input channels are multiplied by 2^-s (Eq. 21: the
weight's exponents shifted, its mantissas kept), so O^ = Q(X 2^s) (Q(W) 2^-s)^T.
`fpt.preshift=false` is the paper's FPT baseline.

`fpt.attention=true` also searches the attention products (Alg. 1 on "O = XY"): QK^T with
X = Q, Y = K and PV with X = P, Y = V, per-tensor static maxima, no exponent shift (the paper
keeps activation-activation products per tensor); with it false, attention operands keep their
configured quantizers.

Every layer's inputs and output gradients of the first `fpt.max_tokens` calibration
tokens are kept in memory (fp32); the windows after those run forward only (channel maxima).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .. import reductions
from ..config import ConfigError
from ..formats import CastFormat, FloatFormat, get_format
from ..quantizer import QuantSpec, fake_quantize
from ..surgery import QuantLinear, attention_quantizers, quantization_disabled, quantized_layers
from . import Method, register
from .mofq import candidates_for
from ..capture import model_device


def _static(spec: QuantSpec, granularity: str) -> QuantSpec:
    return spec if spec.is_identity else replace(spec, granularity=granularity, mode="static")


def configure(plan, cfg):
    d = plan.default
    plan.default = replace(d, weight=_static(d.weight, cfg.fpt.weight_granularity), act=_static(d.act, "tensor"))
    if cfg.fpt.attention:  # searched: one static max per operand
        plan.attention = _static(plan.attention or plan.attention_base, "tensor")


def collect(model, calib, bar, max_tokens: int, sites=()):
    """Per quantized linear: its float inputs X [tokens, in], squared output gradients G2 [tokens, out]
    (the first `max_tokens` tokens of the windows) and each input channel's max |x| over every token.
    Per attention site in `sites` (name, AttentionQuantizers): for "qk" and "pv", the two operands and
    the squared gradients of the product (whole windows, while fewer than `max_tokens` are stored)."""
    layers = [(n, m) for n, m in quantized_layers(model)]
    inputs = {n: [] for n, _ in layers}
    grads = {n: [] for n, _ in layers}
    channel_max = {}
    products = {(n, p): {"a": [], "b": [], "g2": []} for n, _ in sites for p in ("qk", "pv")}
    outputs, handles = {}, []
    kept = 0  # tokens stored per layer so far

    def hook(name):
        def fn(_module, args, out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            seen = x.abs().amax(dim=0).cpu()
            channel_max[name] = seen if name not in channel_max else torch.maximum(channel_max[name], seen)
            if kept < max_tokens:
                inputs[name].append(x[: max_tokens - kept].cpu())
                out.retain_grad()
                outputs[name] = out
        return fn

    def observer(site):
        def fn(product, a, b, out):
            if kept < max_tokens:
                store = products[(site, product)]
                store["a"].append(a.detach().float().cpu())
                store["b"].append(b.detach().float().cpu())
                out.retain_grad()
                outputs[(site, product)] = out
        return fn

    for name, layer in layers:
        handles.append(layer.register_forward_hook(hook(name)))
    for name, aq in sites:
        aq.observe = observer(name)
    device = model_device(model)
    was_training = model.training
    try:
        with quantization_disabled(model), torch.enable_grad():
            for window in calib:
                ids = window[None].to(device)
                outputs.clear()
                logits = model(input_ids=ids, use_cache=False).logits
                if kept < max_tokens:  # the gradients are only needed for the stored tokens
                    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
                    loss.backward()
                    for key, out in outputs.items():
                        if isinstance(key, tuple):
                            products[key]["g2"].append(out.grad.detach().float().pow(2).cpu())
                        else:
                            g = out.grad.detach().reshape(-1, out.shape[-1])[: max_tokens - kept]
                            grads[key].append(g.float().pow(2).cpu())
                    model.zero_grad(set_to_none=True)
                    kept += ids.shape[1]
                bar.advance(1, "float forward + backward")
    finally:
        for h in handles:
            h.remove()
        for _, aq in sites:
            aq.observe = None
        model.train(was_training)
    data = {n: (torch.cat(inputs[n]), torch.cat(grads[n]), channel_max[n]) for n, _ in layers}
    for key, store in products.items():
        data[key] = tuple(torch.cat(store[k]) for k in ("a", "b", "g2"))
    return data


def fisher_error(x, w, g2, xq, wq, out=None) -> float:
    """Eq. 15: mean over output elements of (dL/dO)^2 (O^ - O)^2 (`out` = X W^T if known)."""
    d = xq @ wq.transpose(-1, -2) - (x @ w.transpose(-1, -2) if out is None else out)
    return float(reductions.mean(g2 * d.pow(2)))


def _quantize(t, spec, fmt, amax):
    return fake_quantize(t, replace(spec, format=fmt), torch.as_tensor(amax, device=t.device))


def exponent_bits(fmt: str) -> int:
    f = get_format(fmt)
    return f.exp_bits if isinstance(f, FloatFormat) else 0


def channel_shifts(channel_max: torch.Tensor, exp_bits: int) -> torch.Tensor:
    """Eqs. 17-18 with rho at its initial value (the largest channel): s_j = clip(floor(log2(M / m_j)), 0, 2^e - 1)."""
    top = 2 ** exp_bits - 1
    ratio = channel_max.max() / channel_max.clamp_min(torch.finfo(channel_max.dtype).tiny)
    return torch.floor(torch.log2(ratio)).clamp(0, top)


def search_layer(x, w, g2, x_spec, w_spec, x_cands, w_cands, cfg, channel_max=None):
    """Alternating joint (format, max) search for the input and the weight; returns the choice and errors.

    With `channel_max` (pre-shifted exponent bias) each input candidate format has its own
    channel shifts s and its max is searched for X 2^s; an input state is (format, max, s)."""
    f = cfg.fpt
    out = x @ w.transpose(-1, -2)
    shifts = {fmt: None if channel_max is None else channel_shifts(channel_max, exponent_bits(fmt)) for fmt in x_cands}
    shifted = {fmt: x if s is None else x * torch.exp2(s) for fmt, s in shifts.items()}

    def quantize_input(fmt, amax, s):
        xq = _quantize(shifted[fmt], x_spec, fmt, amax)
        return xq if s is None else xq * torch.exp2(-s)

    # the weight's max: one per tensor, or one per output channel (searched as one ratio for all)
    w_top = w.abs().amax(dim=1) if w_spec.granularity == "channel" else float(w.abs().max())
    state = {"x": (x_cands[0], float(shifted[x_cands[0]].abs().max()), shifts[x_cands[0]]) if x_cands else None,
             "w": (w_cands[0], w_top) if w_cands else None}
    ratios = sorted({1.0, *(f.gamma1 + (f.gamma2 - f.gamma1) * k / (f.steps - 1) for k in range(f.steps))})
    history = []
    for _ in range(f.rounds):
        if x_cands:
            wq = w if state["w"] is None else _quantize(w, w_spec, *state["w"])
            best = None
            for fmt in x_cands:
                top = float(shifted[fmt].abs().max())
                for ratio in ratios if top > 0 else [1.0]:
                    err = fisher_error(x, w, g2, quantize_input(fmt, top * ratio, shifts[fmt]), wq, out)
                    if best is None or err < best[0]:
                        best = (err, (fmt, top * ratio, shifts[fmt]))
            state["x"] = best[1]
            history.append(best[0])
        if w_cands:
            xq = x if state["x"] is None else quantize_input(*state["x"])
            best = None
            for fmt in w_cands:
                for ratio in ratios if float(torch.as_tensor(w_top).max()) > 0 else [1.0]:
                    err = fisher_error(x, w, g2, xq, _quantize(w, w_spec, fmt, w_top * ratio), out)
                    if best is None or err < best[0]:
                        best = (err, (fmt, w_top * ratio))
            state["w"] = best[1]
            history.append(best[0])
    return state, history


def apply(ctx):
    model, calib, cfg, bar = ctx.model, ctx.calib, ctx.cfg, ctx.bar
    f = cfg.fpt
    layers = quantized_layers(model)
    for name, layer in layers:
        if not isinstance(layer, QuantLinear):
            raise RuntimeError(f"fpt: {name} is a {type(layer).__name__}; only nn.Linear layers are supported")
    sites = attention_quantizers(model) if f.attention else []
    if f.attention and not sites:
        raise RuntimeError("fpt.attention: the model has no quantized attention site to search")
    bar.start(len(calib) + len(layers) + len(sites))  # a float forward+backward per window, a search per layer / site
    data = collect(model, calib, bar, f.max_tokens, sites)
    chosen = {}
    formats = {"act": {}, "weight": {}}
    for name, layer in layers:
        x, g2, channel_max = data.pop(name)
        w = layer.weight.detach().float().cpu()
        x_spec, w_spec = layer.input_quantizer.spec, layer.weight_quantizer.spec
        x_cands = candidates_for(x_spec.format, f.candidates)
        w_cands = candidates_for(w_spec.format, f.candidates)
        state, history = search_layer(x, w, g2, x_spec, w_spec, x_cands, w_cands, cfg,
                                      channel_max if f.preshift else None)
        entry = {"error": history[-1] if history else 0.0, "rounds": history}
        device = layer.weight.device
        if state["x"] is not None:
            fmt, amax, shift = state["x"]
            entry["act"] = {"format": fmt, "amax": amax}
            if shift is not None and bool(shift.any()):
                layer.input_shift = shift.to(device)
                entry["act"]["shift"] = {"channels": int((shift > 0).sum()), "max": int(shift.max()),
                                         "mean": round(float(shift.mean()), 4)}
        amaxes = {"act": None if state["x"] is None else torch.tensor(state["x"][1])}
        if state["w"] is not None:
            fmt, amax = state["w"]
            amaxes["weight"] = amax = torch.as_tensor(amax)
            entry["weight"] = {"format": fmt, "amax": float(amax.max())}  # per channel: the largest
            if amax.dim():
                entry["weight"]["ratio"] = round(float((amax / w.abs().amax(dim=1).clamp_min(1e-30)).max()), 6)
        for role, q in (("act", layer.input_quantizer), ("weight", layer.weight_quantizer)):
            if role in entry:
                q.configure(format=entry[role]["format"])
                q.set_amax(amaxes[role].to(device))
                formats[role][entry[role]["format"]] = formats[role].get(entry[role]["format"], 0) + 1
        layer.drop_weight_cache()
        chosen[name] = entry
        bar.advance(1, name)
    attention = {name: search_site(name, aq, data, cfg, formats, bar, model_device(model)) for name, aq in sites}
    return {"layers": chosen, "attention": attention, "formats": formats, "preshift": f.preshift, "candidates": list(f.candidates),
            "rounds": f.rounds, "steps": f.steps, "gamma": [f.gamma1, f.gamma2], "max_tokens": f.max_tokens,
            "calib_windows": len(calib), "calib_tokens": int(calib.numel())}


def search_site(name, aq, data, cfg, formats, bar, device) -> dict:
    """QK^T (X = Q, Y = K) and PV (X = P, Y = V^T, so O = X Y^T as for a linear), per-tensor static,
    no exponent shift (the paper keeps activation-activation products per tensor)."""
    entry = {}
    for product, (qx, qy) in (("qk", (aq.q, aq.k)), ("pv", (aq.p, aq.v))):
        x, y, g2 = data.pop((name, product))
        if product == "pv":
            y = y.transpose(-1, -2)
        x_cands = candidates_for(qx.spec.format, cfg.fpt.candidates)
        y_cands = candidates_for(qy.spec.format, cfg.fpt.candidates)
        state, history = search_layer(x, y, g2, qx.spec, qy.spec, x_cands, y_cands, cfg)
        entry[f"error_{product}"] = history[-1] if history else 0.0
        entry[f"rounds_{product}"] = history
        for operand, q, chosen in ((product[0], qx, state["x"]), (product[1], qy, state["w"])):
            if chosen is not None:
                fmt, amax = chosen[0], float(chosen[1])
                q.configure(format=fmt)
                q.set_amax(torch.tensor(amax, device=device))
                entry[operand] = {"format": fmt, "amax": amax}
                formats["attention"] = formats.get("attention", {})
                formats["attention"][fmt] = formats["attention"].get(fmt, 0) + 1
    bar.advance(1, name)
    return entry


def validate(cfg):
    f = cfg.fpt
    if f.weight_granularity not in ("tensor", "channel"):
        raise ConfigError(f"fpt.weight_granularity must be tensor or channel, got {f.weight_granularity!r}")
    if f.rounds < 1 or f.steps < 2 or not 0 < f.gamma1 < f.gamma2:
        raise ConfigError("fpt needs rounds >= 1, steps >= 2 and 0 < gamma1 < gamma2")
    for c in f.candidates:
        try:
            if isinstance(get_format(c), CastFormat):
                raise ConfigError(f"fpt.candidates: {c!r} is a float cast, not a quantized format")
        except ValueError as err:
            raise ConfigError(f"fpt.candidates: {err}") from None
    roles = {"format.weight": cfg.format.weight, "format.act": cfg.format.act}
    if f.attention:
        roles["format.attn"] = cfg.format.attn or cfg.format.act
    for key, fmt in roles.items():
        try:
            found = candidates_for(fmt, f.candidates)
        except ConfigError as err:
            raise ConfigError(str(err).replace("mofq", "fpt")) from None
        if key == "format.attn" and not found:
            raise ConfigError(f"fpt.attention=true searches the attention operands, but {key}={fmt} leaves them in float")


register(Method("fpt", configure=configure, apply=apply, validate=validate, needs_calibration=True))
