"""RPTQ (Yuan et al.): reorder activation channels into clusters of similar range.

For every linear's input, the per-channel (min, max) over the calibration
windows (float model) are clustered with k-means into `rptq.clusters` groups.
RPTQ then permutes the channels so each cluster is contiguous (permuting the
producer's output and the linear's weight columns alike, which leaves the
float function unchanged) and quantizes each cluster with its own static range.

Here the permutation is an index kept inside the layer: the input quantizer is
replaced by a ClusterQuantizer that gives each channel its cluster's range.
Quantizing x[..., order] in contiguous clusters and multiplying by
W[:, order] is exactly this, term for term, so the weights stay as they are
and the float model is untouched (`channel_order` holds the permutation a
deployment would bake into the producer and the weights). That works for
every linear, including inputs with no norm to permute (attention output ->
out_proj, fc1 -> fc2) and post-LN models, where the reference needs a
model-specific re-implementation.

Ranges are static and calibrated, as in the reference: per cluster
[min of its channels' mins, max of their maxes], asymmetric (a zero point,
grid 0 .. 2**b - 1) for INT formats with rptq.asymmetric, else symmetric
amax = max |.| (minifloats have no zero point). Weights: per-channel max.
With rptq.norm_out_8bit the inputs produced by a norm (q/k/v, fc1, gate/up)
use an 8-bit format (int8, or e4m3 for minifloat activations), as the
reference does even in W4A4. Attention matmul operands, when quantized, keep
the plan's (dynamic) scaling; the reference also reorders Q/K (not done here).
Inputs that cannot be clustered (convolutions: channels first; inputs never
reached by the calibration windows) are quantized per token, dynamically, and
listed with their reason in the facts (`dynamic_fallback`). A run whose format
does not quantize activations is a config error; one where no layer could be
clustered, an error.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..config import ConfigError
from ..formats import IntFormat
from ..quantizer import QuantSpec, Quantizer, SameInputCache, fake_quantize
from ..surgery import compact_names, quantized_layers, role_specs
from ..capture import features_last, float_passes, trace_ids, trace_input_groups
from . import Method, MethodError, register


# ---------------------------------------------------------------- k-means

def _sq_dist(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] - centres[None, :, :]).pow(2).sum(-1)


def kmeans(points: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Cluster labels of `points` [n, d] (k-means++ start, Lloyd steps), relabelled
    so cluster 0 has the smallest centroid span (last - first coordinate: max - min).
    Runs on the CPU (a few thousand points, step by step): the seeded draws then give
    the same clusters whatever device the points are on. Labels come back on it."""
    n = points.shape[0]
    k = max(1, min(k, n))
    x = points.detach().double().cpu()
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randint(n, (1,), generator=gen, device=x.device)]
    while len(centres) < k:
        d2 = _sq_dist(x, centres).amin(1)
        if float(d2.sum()) == 0:  # fewer distinct points than clusters
            pick = torch.randint(n, (1,), generator=gen, device=x.device)
        else:
            pick = torch.multinomial(d2 / d2.sum(), 1, generator=gen)
        centres = torch.cat([centres, x[pick]])
    labels = _sq_dist(x, centres).argmin(1)
    for _ in range(iters):
        sizes = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, labels, x)
        filled = sizes > 0
        centres[filled] = sums[filled] / sizes[filled, None]
        for c in torch.nonzero(~filled).flatten().tolist():  # an empty cluster takes the worst-fitted point
            far = _sq_dist(x, centres).gather(1, labels[:, None]).squeeze(1).argmax()
            centres[c] = x[far]
            labels[far] = c
        new = _sq_dist(x, centres).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
    span = centres[:, -1] - centres[:, 0]
    rank = torch.empty(k, dtype=torch.long, device=x.device)
    rank[torch.argsort(span, stable=True)] = torch.arange(k, device=x.device)
    return rank[labels].to(points.device)


# ---------------------------------------------------------------- per-cluster quantization

def asymmetric_fake_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned grid 0 .. 2**bits - 1 with a zero point over [lo, hi] (0 kept inside),
    lo/hi broadcast against x; round half to even."""
    levels = 2**bits - 1
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.where(hi > lo, hi - lo, torch.ones_like(hi)) / levels
    zero = torch.round(-lo / scale)
    xf = x.float()
    codes = torch.clamp(torch.round(xf / scale) + zero, 0, levels)
    return ((codes - zero) * scale).to(x.dtype)


class ClusterQuantizer(Quantizer):
    """Static per-cluster ranges over the last axis: channel j uses the range of
    cluster labels[j]. `channel_order` sorts the channels cluster by cluster."""

    def __init__(self, spec: QuantSpec, labels: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
        super().__init__(replace(spec, granularity="channel", axis=-1, mode="static"))
        self.register_buffer("labels", labels.long().clone())
        self.register_buffer("cluster_lo", lo.float().clone())
        self.register_buffer("cluster_hi", hi.float().clone())
        self.register_buffer("channel_order", torch.argsort(labels, stable=True))
        del self.amax  # a plain attribute in Quantizer; a buffer here, so it moves with the model
        self.register_buffer("amax", torch.maximum(lo.abs(), hi.abs()).float()[self.labels])

    @property
    def clusters(self) -> int:
        return len(self.cluster_lo)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", clusters={self.clusters}"

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.spec.fmt, IntFormat) and not self.spec.symmetric:
            q = asymmetric_fake_quantize(x, self.cluster_lo[self.labels], self.cluster_hi[self.labels], self.spec.fmt.bits)
        else:
            q = fake_quantize(x, self.spec, self.amax)
        if torch.is_grad_enabled() and x.requires_grad:
            return x + (q - x).detach()  # plain straight-through estimator
        return q


def cluster_ranges(ch_min: torch.Tensor, ch_max: torch.Tensor, labels: torch.Tensor, k: int):
    """Per-cluster [min of mins, max of maxes]."""
    lo = ch_min.new_zeros(k, dtype=torch.float32).scatter_reduce(0, labels, ch_min.float(), "amin", include_self=False)
    hi = ch_max.new_zeros(k, dtype=torch.float32).scatter_reduce(0, labels, ch_max.float(), "amax", include_self=False)
    return lo, hi  # an empty cluster (no channel uses it) keeps 0


def eight_bit_spec(spec: QuantSpec) -> QuantSpec:
    """The same quantizer at 8 bits: int8 for INT formats, e4m3 for minifloats."""
    if isinstance(spec.fmt, IntFormat):
        return replace(spec, format="int8")
    return replace(spec, format="e4m3", symmetric=True)


def bits(spec: QuantSpec) -> int:
    fmt = spec.fmt
    if isinstance(fmt, IntFormat):
        return fmt.bits
    return 1 + getattr(fmt, "exp_bits", 31) + getattr(fmt, "man_bits", 0)


# ---------------------------------------------------------------- the stage

def configure(plan, cfg):
    # Symmetry is chosen per layer in apply (a per-layer override may pick a minifloat).
    d = plan.default
    scaled = [s.format for s in role_specs(plan, "act") if s.scaled is not None]
    if scaled:
        raise ValueError(f"rptq scales activation channel clusters; {scaled[0]} carries its own block scales")
    if all(s.is_identity for s in role_specs(plan, "act")):
        raise ValueError(f"rptq clusters activation ranges, but format.act is {d.act.format} (nothing to cluster)")
    act = d.act if d.act.is_identity else replace(d.act, granularity="channel", axis=-1, mode="static")
    plan.default = replace(d, weight=replace(d.weight, granularity="channel", mode="dynamic"), act=act)


@torch.no_grad()
def collect_channel_ranges(model, names, calib, bar):
    """Per-input-channel (min, max) of each named layer's input on the float model."""
    layers = dict(quantized_layers(model))
    ranges: dict[str, list[torch.Tensor]] = {}
    stats = SameInputCache(lambda x: torch.aminmax(x.detach().float().reshape(-1, x.shape[-1]), dim=0))

    def observer_for(name):
        def observe(_q, x):
            lo, hi = stats(x)
            if name in ranges:
                ranges[name] = [torch.minimum(ranges[name][0], lo), torch.maximum(ranges[name][1], hi)]
            else:
                ranges[name] = [lo, hi]
        return observe

    try:
        for n in names:
            layers[n].input_quantizer.observer = observer_for(n)
        float_passes(model, calib, bar, f"{len(names)} inputs")
    finally:
        for n in names:
            layers[n].input_quantizer.observer = None
    return ranges


def apply(ctx):
    model, calib, cfg, bar = ctx.model, ctx.calib, ctx.cfg, ctx.bar
    r = cfg.rptq
    layers = dict(quantized_layers(model))
    active = [n for n, m in layers.items() if not m.input_quantizer.spec.is_identity]
    if not active:
        raise MethodError("rptq: no quantized layer quantizes its input (every input format is fp32)")
    names = [n for n in active if features_last(layers[n])]
    channels_first = [n for n in active if not features_last(layers[n])]
    for n in channels_first:  # convolutions: per-token dynamic instead (recorded)
        layers[n].input_quantizer.configure(granularity="token", axis=1, mode="dynamic", symmetric=True)
    norm_fed = set()
    if r.norm_out_8bit:
        for g in trace_input_groups(model, trace_ids(calib)):
            if g.norm is not None:
                norm_fed.update(g.layers)
    ranges = collect_channel_ranges(model, names, calib, bar)
    sizes, raised, unseen = [], [], []
    labels_of: dict[bytes, torch.Tensor] = {}
    kinds = set()
    for n in names:
        layer = layers[n]
        if n not in ranges:  # never reached by the calibration text
            unseen.append(n)
            layer.input_quantizer.configure(granularity="token", axis=-1, mode="dynamic", symmetric=True)
            continue
        ch_min, ch_max = ranges[n]
        key = torch.cat([ch_min, ch_max]).cpu().numpy().tobytes()  # q/k/v (gate/up) share one input
        if key not in labels_of:
            labels_of[key] = kmeans(torch.stack([ch_min, ch_max], 1), r.clusters, r.kmeans_iters, seed=cfg.seed)
        labels = labels_of[key]
        k = max(1, min(r.clusters, len(labels)))
        lo, hi = cluster_ranges(ch_min, ch_max, labels, k)
        spec = layer.input_quantizer.spec
        if n in norm_fed and bits(spec) < 8:
            spec = eight_bit_spec(spec)
            raised.append(n)
        asymmetric = r.asymmetric and isinstance(spec.fmt, IntFormat)
        spec = replace(spec, symmetric=not asymmetric)
        kinds.add("asymmetric (zero point)" if asymmetric else "symmetric")
        layer.input_quantizer = ClusterQuantizer(spec, labels, lo, hi)  # buffers on the input's device
        sizes.append(int(labels.unique().numel()))
    if not sizes:
        raise MethodError(f"rptq clustered no layer: {len(channels_first)} convolution inputs, "
                          f"{len(unseen)} inputs not reached by the calibration windows")
    fallback = {"channels-first input (convolution): per-token dynamic": channels_first,
                "not reached by the calibration windows: per-token dynamic": unseen}
    return {
        "clusters": r.clusters,
        "clusters_used": {"min": min(sizes), "max": max(sizes)} if sizes else None,
        "layers": len(sizes),
        "ranges": "static per cluster: " + " and ".join(sorted(kinds)),
        "reorder": "index (channel_order buffer); weights unchanged",
        "norm_out_8bit": bool(r.norm_out_8bit),
        "norm_out_8bit_layers": len(raised),
        "dynamic_fallback": {reason: compact_names(names) for reason, names in fallback.items() if names},
        "calib_windows": len(calib),
    }


def validate(cfg):
    if cfg.rptq.clusters < 1:
        raise ConfigError(f"rptq.clusters must be >= 1, got {cfg.rptq.clusters}")
    if cfg.rptq.kmeans_iters < 1:
        raise ConfigError(f"rptq.kmeans_iters must be >= 1, got {cfg.rptq.kmeans_iters}")


register(Method("rptq", configure=configure, apply=apply, validate=validate, needs_calibration=True))
