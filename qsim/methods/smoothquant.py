"""SmoothQuant (Xiao et al.): move activation outliers into the weights.

For a linear's input channel j, s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)
(alpha = smoothquant.alpha), X / s and W * s: the product is unchanged in
exact arithmetic, and the activation is flatter. max|X_j| comes from the float
model (every quantizer off) over the calibration windows; max|W_j| is over all
output rows of every linear that reads that input, so q/k/v share one s.

Where the input is a normalization layer's output read by nothing but those
linears (pre-LN OPT: LayerNorm -> q/k/v, -> fc1; Llama: RMSNorm -> q/k/v,
-> gate/up), 1/s is folded into the norm's weight and bias. Such pairs are
found by matching tensors in one traced forward (the linear's input is the
norm's output, or a reshaped view of it), and each fold is then checked
numerically: random power-of-two scales are folded in and the float model's output must
not move. A norm whose output also feeds the residual (post-LN OPT, as
OPT-350m) fails that check; those linears, and any other smoothed linear,
divide their input by s explicitly in a forward pre-hook that runs before the
input quantizer (the buffer `smooth_divisor` on the layer). The explicit
multiply is what a deployment would fuse into the producer of the tensor.

Which inputs are smoothed (`smoothquant.scope`): "norm", the reference's
choice: inputs produced by a norm and inputs shared by several linears (the
q/k/v of post-LN OPT's first block read the embeddings); "all": every linear.
Convolutions (channels-first inputs) and nn.MultiheadAttention (one weight for
query, key and value) are left alone. Every quantized layer left unsmoothed is
listed with its reason in the facts (`not_smoothed`); a model where nothing
can be smoothed is an error.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError
from ..surgery import compact_names, quantization_disabled, quantized_layers
from ..capture import InputGroup, calib_extent, features_last, float_passes, model_device, smoothable, trace_ids, trace_input_groups
from . import Method, MethodError, register

SCOPES = ("norm", "all")
# Relative change of the logits that still counts as exact. The check folds
# power-of-two scales, which commute with rounding in any float dtype, so a
# valid fold reproduces the logits (bit for bit barring kernel differences)
# and an invalid one moves them by O(1).
FOLD_TOLERANCE = 1e-3


# ---------------------------------------------------------------- who reads what


def _logits(model, ids):
    out = model(ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@torch.no_grad()
def check_folds(model: nn.Module, ids: torch.Tensor, groups: list[InputGroup], seed: int = 0) -> None:
    """Mark each norm-fed group foldable iff folding a random per-channel scale
    into its norm and linears leaves the float model's output unchanged."""
    candidates = [g for g in groups if g.norm is not None]
    if not candidates:
        return
    modules = dict(model.named_modules())
    ids = ids.to(model_device(model))
    gen = torch.Generator().manual_seed(seed)
    with quantization_disabled(model):
        ref = _logits(model, ids)

        def exact(batch: list[InputGroup]) -> bool:
            # Power-of-two scales: folding 1/s back restores every weight bit for bit.
            scales = []
            for g in batch:
                n = modules[g.norm].weight.numel()
                scales.append(torch.where(torch.rand(n, generator=gen) < 0.5, 0.5, 2.0))
                fold_scale(g, modules[g.norm], scales[-1])
            try:
                out = _logits(model, ids)
                return bool(((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)) < FOLD_TOLERANCE)
            finally:
                for g, s in zip(batch, scales):
                    fold_scale(g, modules[g.norm], 1.0 / s)

        if exact(candidates):
            verdicts = {id(g): True for g in candidates}
        else:
            verdicts = {id(g): exact([g]) for g in candidates}
    for g in candidates:
        g.foldable = verdicts[id(g)]


# ---------------------------------------------------------------- the scales

def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|**alpha / max|W_j|**(1 - alpha), kept away from 0 (dead channels)."""
    a = act_max.float().clamp(min=1e-5)
    w = weight_max.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def _input_axis_shape(layer: nn.Module, n: int) -> list[int]:
    shape = [1] * layer.weight.dim()
    shape[layer.weight_axes[1]] = n
    return shape


def weight_column_max(layer: nn.Module) -> torch.Tensor:
    """max |W| over output rows, per input channel."""
    red = layer.weight_axes[1]
    w = layer.weight.detach().abs().float()
    return w.amax(dim=tuple(d for d in range(w.dim()) if d != red))


@torch.no_grad()
def scale_weight_inputs(layer: nn.Module, s: torch.Tensor) -> None:
    """W[:, j] *= s_j in place (the version bump drops the cached quantized weight)."""
    layer.weight.mul_(s.to(layer.weight).reshape(_input_axis_shape(layer, s.numel())))


@torch.no_grad()
def fold_scale(group: InputGroup, norm: nn.Module, s: torch.Tensor) -> None:
    """Norm output / s, consumers' weight columns * s."""
    norm.weight.div_(s.to(norm.weight))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(s.to(norm.bias))
    for layer in group.modules:
        scale_weight_inputs(layer, s)


def _divide_input(module: nn.Module, args, kwargs):
    if args:
        x = args[0]
        return (x / module.smooth_divisor.to(x.dtype),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["input"] = kwargs["input"] / module.smooth_divisor.to(kwargs["input"].dtype)
    return args, kwargs


@torch.no_grad()
def smooth_explicitly(layer: nn.Module, s: torch.Tensor) -> None:
    """x / s before the input quantizer (a pre-hook), W * s; a second call compounds."""
    scale_weight_inputs(layer, s)
    if hasattr(layer, "smooth_divisor"):
        layer.smooth_divisor.mul_(s.to(layer.smooth_divisor.device))
        return
    layer.register_buffer("smooth_divisor", s.detach().float().to(layer.weight.device, copy=True))
    layer.register_forward_pre_hook(_divide_input, with_kwargs=True)


# ---------------------------------------------------------------- the stage

def select_groups(groups: list[InputGroup], scope: str) -> list[InputGroup]:
    if scope == "all":
        return groups
    return [g for g in groups if g.norm is not None or len(g.layers) > 1]


@torch.no_grad()
def collect_act_max(model: nn.Module, groups: list[InputGroup], calib: torch.Tensor, bar) -> list[torch.Tensor]:
    """Per-input-channel max |x| of each group's input on the float model."""
    maxes: list[torch.Tensor | None] = [None] * len(groups)
    handles = []

    def hook_for(i):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs["input"]
            m = x.detach().abs().float().reshape(-1, x.shape[-1]).amax(0)
            maxes[i] = m if maxes[i] is None else torch.maximum(maxes[i], m)
        return hook

    try:
        for i, g in enumerate(groups):
            handles.append(g.modules[0].register_forward_pre_hook(hook_for(i), with_kwargs=True))
        float_passes(model, calib, bar, f"{len(groups)} inputs")
    finally:
        for h in handles:
            h.remove()
    return maxes


NOT_SMOOTHED = {
    "conv": "channels-first input (convolution)",
    "mha": "nn.MultiheadAttention: one in-projection weight for query, key and value",
    "untraced": "not called by the trace forward",
    "unseen": "not reached by the calibration windows",
}


def _smoothable_only(groups: list[InputGroup]) -> list[InputGroup]:
    """The groups without their unsmoothable readers; a norm whose output also feeds one of those
    then fails the fold check (folding would change that reader's input) and is smoothed explicitly."""
    kept = []
    for g in groups:
        pairs = [(n, m) for n, m in zip(g.layers, g.modules) if smoothable(m)]
        if pairs:
            kept.append(InputGroup([n for n, _ in pairs], g.norm, modules=[m for _, m in pairs]))
    return kept


def apply(ctx):
    model, calib, cfg, bar = ctx.model, ctx.calib, ctx.cfg, ctx.bar
    alpha = float(cfg.smoothquant.alpha)
    scope = cfg.smoothquant.scope
    ids = trace_ids(calib)
    layers = quantized_layers(model)
    groups = trace_input_groups(model, ids)
    traced = {n for g in groups for n in g.layers}
    not_smoothed = {
        NOT_SMOOTHED["conv"]: [n for n, m in layers if not features_last(m)],
        NOT_SMOOTHED["mha"]: [n for n, m in layers if features_last(m) and not smoothable(m)],
        NOT_SMOOTHED["untraced"]: [n for n, m in layers if smoothable(m) and n not in traced],
    }
    groups = _smoothable_only(groups)
    check_folds(model, ids, groups, seed=cfg.seed)
    chosen = select_groups(groups, scope)
    chosen_ids = {id(g) for g in chosen}
    not_smoothed[f"scope {scope!r}: input neither a norm's output nor shared"] = [
        n for g in groups if id(g) not in chosen_ids for n in g.layers]
    act_max = collect_act_max(model, chosen, calib, bar)
    modules = dict(model.named_modules())
    folded, explicit, unseen, norms_folded = [], [], [], set()
    for g, amax in zip(chosen, act_max):
        if amax is None:
            unseen += g.layers
            continue
        wmax = torch.stack([weight_column_max(m) for m in g.modules]).amax(0)
        s = smoothing_scales(amax, wmax, alpha).to(model_device(model))
        if g.foldable:
            fold_scale(g, modules[g.norm], s)
            folded += g.layers
            norms_folded.add(g.norm)
        else:
            for layer in g.modules:
                smooth_explicitly(layer, s)
            explicit += g.layers
    not_smoothed[NOT_SMOOTHED["unseen"]] = unseen
    not_smoothed = {reason: names for reason, names in not_smoothed.items() if names}
    if not folded and not explicit:
        why = "; ".join(f"{reason}: {len(names)}" for reason, names in not_smoothed.items()) or "no quantized layer"
        raise MethodError(f"smoothquant found nothing to smooth in {type(model).__name__} ({why})")
    return {
        "alpha": alpha,
        "scope": scope,
        "folded_into_norm": len(folded),
        "explicit_scale": len(explicit),
        "explicit_layers": compact_names(explicit),
        "not_smoothed": {reason: compact_names(names) for reason, names in not_smoothed.items()},
        "norms_folded": compact_names(sorted(norms_folded)),
        **calib_extent(calib),
    }


def validate(cfg):
    alpha = cfg.smoothquant.alpha
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"smoothquant.alpha (migration strength) must be in [0, 1], got {alpha}")
    if cfg.smoothquant.scope not in SCOPES:
        raise ConfigError(f"unknown smoothquant.scope {cfg.smoothquant.scope!r}; valid: {', '.join(SCOPES)}")


register(Method("smoothquant", apply=apply, validate=validate, needs_calibration=True))
