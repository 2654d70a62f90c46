"""Static quantization with calibrated activation ranges (INT-FP-QSim II-B.1).

Weights use per-channel max scaling (dynamic: weights never change, so that is
the same as calibrating them once). Every activation quantizer (layer inputs,
layer outputs when `format.output` quantizes them, and the attention operands
when attention is quantized) gets one static per-tensor amax, chosen from the
float model's activations over the calibration windows by `mse.calibrator`:

- max: the largest |x| seen;
- percentile: the `mse.percentile`-th percentile of |x|;
- mse: the amax that minimises E[(Q(x) - x)^2];
- entropy: the amax that minimises KL(P || Q) between the |x| histogram and
  its quantized version (TensorRT's entropy calibrator).

Q is always the quantizer's own spec (`fake_quantize`): the target format's
grid, INT or minifloat, with its scale dtype. (The paper's tool scored MSE on
the INT grid even for FP formats.)

Statistics are a histogram of |x| per quantizer with 64 bins per octave over
2**-40 .. 2**40 (cut from the float32 bits, so binning is one shift): memory
is fixed, outliers are kept exactly, and bins are far finer than the
quantization step near zero, where a linear histogram would lump the bulk of
the values into a few bins.

A quantizer the calibration windows never reach keeps dynamic per-tensor
scaling, and one that saw only zeros gets amax 1; both are listed in the facts.
A run with no activation quantizer to calibrate is a config error, and one
where no quantizer saw data, an error.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config import ConfigError
from ..quantizer import QuantSpec, Quantizer, SameInputCache, fake_quantize
from ..capture import calib_extent, float_passes
from ..surgery import attention_quantizers, compact_names, quantized_layers, role_specs
from . import Method, MethodError, register

CALIBRATORS = ("mse", "max", "percentile", "entropy")


# ---------------------------------------------------------------- statistics

class AbsHistogram:
    """Counts of |x| in bins cut from the float32 bit pattern: an octave per
    exponent, split into 64 equal sub-bins by the top 6 mantissa bits (relative
    width 1/128 .. 1/64), over 2**LOW .. 2**HIGH. Bin 0 holds zeros and anything
    below 2**LOW; the last bin also takes anything above 2**HIGH; NaN and inf are
    dropped. Counts and max stay on the device of the values added (no sync per call)."""

    MANTISSA_BITS = 6
    LOW, HIGH = -40, 40
    SHIFT = 23 - MANTISSA_BITS
    FIRST_CODE = (127 + LOW) << MANTISSA_BITS
    N_BINS = (HIGH - LOW) << MANTISSA_BITS
    CODES = 1 << (31 - SHIFT)  # every code of |x| (sign bit clear)
    INF_CODE = 0x7F800000 >> SHIFT  # this code and above: inf and NaN

    def __init__(self):
        self.n_bins = self.N_BINS
        self.counts: torch.Tensor | None = None  # float64 [n_bins + 1], made by the first add
        self.amax: torch.Tensor | None = None  # the largest finite |x|, 0-dim fp32

    @classmethod
    def bin_counts(cls, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The counts `x` adds, and its max finite |x| (0-dim), both on x's device.

        One bincount over every code of |x| and a fold of the few thousand code counts into bins:
        no per-element clamp, and inf/NaN (the codes from INF_CODE up) fall out exactly."""
        a = x.detach().float().abs().reshape(-1)
        codes = torch.bitwise_right_shift(a.view(torch.int32), cls.SHIFT)
        by_code = torch.bincount(codes, minlength=cls.CODES)
        first, last = cls.FIRST_CODE, cls.FIRST_CODE + cls.N_BINS - 1
        counts = torch.cat([by_code[:first].sum(0, keepdim=True), by_code[first:last],
                            by_code[last:cls.INF_CODE].sum(0, keepdim=True)]).double()
        amax = a.nan_to_num_(nan=0.0, posinf=0.0).amax() if a.numel() else a.new_zeros(())
        return counts, amax

    def add_counts(self, counts: torch.Tensor, amax: torch.Tensor) -> None:
        if self.counts is None:
            self.counts, self.amax = torch.zeros_like(counts), torch.zeros_like(amax)
        self.counts += counts
        torch.maximum(self.amax, amax, out=self.amax)

    def add(self, x: torch.Tensor) -> None:
        self.add_counts(*self.bin_counts(x))

    @property
    def max(self) -> float:
        return 0.0 if self.amax is None else float(self.amax)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu") if self.counts is None else self.counts.device

    @property
    def total(self) -> float:
        return 0.0 if self.counts is None else float(self.counts.sum())

    def edges(self) -> torch.Tensor:
        """Bin i (1..n) covers [edges[i-1], edges[i])."""
        codes = torch.arange(self.n_bins + 1, dtype=torch.int32, device=self.device) + self.FIRST_CODE
        return torch.bitwise_left_shift(codes, self.SHIFT).view(torch.float32).double()

    def occupied(self, floor: float = 0.0):
        """(lower edge, upper edge, count) of the non-empty bins above zero and above `floor`."""
        edges = self.edges()
        counts = self.counts[1:]
        keep = (counts > 0) & (edges[1:] > floor)
        return edges[:-1][keep], edges[1:][keep].clamp(max=max(self.max, 1e-300)), counts[keep]

    def points(self, per_bin: int = 2, floor_ratio: float = 2.0**-20):
        """Representative values and weights: `per_bin` geometric points in each
        occupied bin. Bins below max * floor_ratio are left out: whatever the
        candidate, their error is at most their square, negligible next to the
        quantization error of the rest, and they would only slow the search."""
        lo, hi, counts = self.occupied(self.max * floor_ratio)
        frac = (torch.arange(per_bin, dtype=torch.float64, device=lo.device) + 0.5) / per_bin
        pts = lo[:, None] * (hi / lo)[:, None] ** frac[None, :]
        weights = (counts / per_bin)[:, None].expand_as(pts)
        return pts.flatten().float(), weights.flatten().float()

    def percentile(self, q: float) -> float:
        cdf = torch.cumsum(self.counts, 0)
        target = q / 100.0 * float(cdf[-1])
        i = int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64, device=cdf.device)).clamp(max=self.n_bins))
        if i == 0:
            return 0.0
        return min(float(self.edges()[i]), self.max)


# ---------------------------------------------------------------- amax search

def _per_candidate_spec(spec: QuantSpec) -> QuantSpec:
    """The spec with one static amax per row: row c is quantized with candidate c."""
    return replace(spec, granularity="channel", axis=0, mode="static")


def candidate_grid(amax_max: float, n: int, device=None) -> torch.Tensor:
    """About n sorted candidates in (0, amax_max]: half evenly spaced, half spaced
    geometrically down to amax_max / 2**16, for heavy tails whose best clip is
    a tiny fraction of the largest value."""
    half = max(n // 2, 1)
    k = torch.arange(half, dtype=torch.float64, device=device)
    linear = amax_max * (k + 1) / half
    geometric = amax_max * torch.exp2(-16 * k / half)
    return torch.unique(torch.cat([linear, geometric])).float()


def search_amax(score, amax_max: float, n: int, device=None) -> float:
    """Minimise score(candidates) -> scores: a coarse grid of about n candidates,
    then n/2 evenly spaced between the best one's neighbours (candidates on `device`)."""
    if amax_max <= 0:
        return 0.0
    coarse = candidate_grid(amax_max, n, device)
    i = int(torch.argmin(score(coarse)))
    best = float(coarse[i])
    lo = float(coarse[i - 1]) if i > 0 else best / 2
    hi = float(coarse[i + 1]) if i + 1 < len(coarse) else best
    cands = torch.cat([torch.linspace(lo, hi, max(n // 2, 2), device=device), torch.tensor([best], device=device)])
    return float(cands[int(torch.argmin(score(cands)))])


def mse_scores(values: torch.Tensor, weights: torch.Tensor, spec: QuantSpec, cands: torch.Tensor) -> torch.Tensor:
    """Weighted sum of squared fake-quantization errors of `values`, one per candidate amax."""
    x = values.float()[None, :].expand(len(cands), -1)
    err = (fake_quantize(x, _per_candidate_spec(spec), cands.float()) - x).pow_(2)
    return (err * weights.float()[None, :]).sum(1, dtype=torch.float64)


def mse_amax(values: torch.Tensor, weights: torch.Tensor | None, spec: QuantSpec, n: int) -> float:
    """The amax minimising the (weighted) MSE of `values` on spec's grid."""
    if weights is None:
        weights = torch.ones_like(values, dtype=torch.float32)
    amax_max = float(values.abs().max()) if values.numel() else 0.0
    return search_amax(lambda c: mse_scores(values, weights, spec, c), amax_max, n, values.device)


def entropy_scores(hist: AbsHistogram, spec: QuantSpec, cands: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per candidate amax. P: the |x| histogram clipped at amax (clipped mass
    into the last bin); Q: the mass of each quantization cell (bins whose centres
    quantize to the same grid value) spread over its non-empty bins in proportion
    to their width. The cells come from the target format's own grid."""
    lo, hi, counts = hist.occupied()
    centres = (lo * hi).sqrt()
    widths = hi - lo
    C, B = len(cands), len(centres)
    inside = centres[None, :] < cands.double()[:, None]
    n_in = counts[None, :] * inside
    outliers = (counts[None, :] * ~inside).sum(1)
    last = inside.sum(1) - 1
    device = counts.device
    rows = torch.arange(C, device=device)
    p = n_in.clone()
    p[rows, last.clamp(min=0)] += outliers
    q_vals = fake_quantize(centres.float()[None, :].expand(C, -1), _per_candidate_spec(spec), cands.float())
    cell = torch.cat([torch.zeros(C, 1, dtype=torch.long, device=device), (q_vals[:, 1:] != q_vals[:, :-1]).long().cumsum(1)], 1)
    mass = torch.zeros(C, B, dtype=torch.float64, device=device).scatter_add_(1, cell, n_in)
    nz_width = widths[None, :] * (n_in > 0)
    width_sum = torch.zeros(C, B, dtype=torch.float64, device=device).scatter_add_(1, cell, nz_width)
    q = mass.gather(1, cell) * nz_width / width_sum.gather(1, cell).clamp_min(1e-300)
    p = p / p.sum(1, keepdim=True).clamp_min(1e-300)
    q = q / q.sum(1, keepdim=True).clamp_min(1e-300)
    kl = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-12).log()), torch.zeros_like(p)).sum(1)
    return torch.where(last >= 0, kl, torch.full_like(kl, math.inf))


def choose_amax(hist: AbsHistogram, spec: QuantSpec, mse_cfg) -> float:
    """One activation amax from a histogram, by the configured calibrator."""
    kind = mse_cfg.calibrator
    if kind == "max":
        return hist.max
    if kind == "percentile":
        return hist.percentile(mse_cfg.percentile)
    if kind == "mse":
        values, weights = hist.points()
        return search_amax(lambda c: mse_scores(values, weights, spec, c), hist.max, mse_cfg.candidates, hist.device)
    if kind == "entropy":
        return search_amax(lambda c: entropy_scores(hist, spec, c), hist.max, mse_cfg.candidates, hist.device)
    raise ConfigError(f"unknown mse.calibrator {kind!r}; valid: {', '.join(CALIBRATORS)}")


# ---------------------------------------------------------------- float passes


def activation_quantizers(model: torch.nn.Module) -> list[tuple[str, Quantizer]]:
    """Every non-weight quantizer: layer inputs and outputs, attention operands."""
    found = []
    for name, layer in quantized_layers(model):
        found += [(f"{name}.input", layer.input_quantizer), (f"{name}.output", layer.output_quantizer)]
    for name, aq in attention_quantizers(model):
        found += [(f"{name}.{op}", getattr(aq, op)) for op in ("q", "k", "v", "p")]
    return found


# ---------------------------------------------------------------- the stage

def _static_tensor(spec: QuantSpec) -> QuantSpec:
    return spec if spec.is_identity else replace(spec, granularity="tensor", mode="static")


def configure(plan, cfg):
    d = plan.default
    plan.default = replace(d, weight=replace(d.weight, granularity="channel", mode="dynamic"),
                           act=_static_tensor(d.act), output=_static_tensor(d.output))
    if cfg.mse.attention or plan.attention is not None:
        plan.attention = _static_tensor(plan.attention or plan.attention_base)
    # MX operands keep dynamic block scales; NVFP4's global amax is calibrated, but the mse and
    # entropy scores quantize histogram points, which have no blocks.
    static_e4m3 = [s for s in role_specs(plan, "act") + role_specs(plan, "output") + [plan.attention]
                   if s is not None and s.scale_dtype == "e4m3" and s.mode == "static"]
    if static_e4m3 and cfg.mse.calibrator in ("mse", "entropy"):
        raise ValueError(f"mse.calibrator={cfg.mse.calibrator} cannot score the global amax of {static_e4m3[0].format} "
                         "(E4M3 block scales): use mse.calibrator=max (ModelOpt's) or percentile")
    if not any(s is not None and not s.is_identity and s.mode == "static"
               for s in role_specs(plan, "act") + role_specs(plan, "output") + [plan.attention]):
        raise ValueError("mse calibrates static activation ranges, but no activation quantizer has one "
                         f"(format.act={d.act.format}: fp32, or MX block scales, which stay dynamic)")


def collect_histograms(model, targets: list[tuple[str, Quantizer]], calib: torch.Tensor, bar) -> dict[str, AbsHistogram]:
    """The |x| histogram of each target quantizer's input over the calibration windows (float model)."""
    hists = {n: AbsHistogram() for n, _ in targets}
    counts = SameInputCache(AbsHistogram.bin_counts)

    def observer_for(name):
        return lambda _q, x: hists[name].add_counts(*counts(x))

    try:
        for name, q in targets:
            q.observer = observer_for(name)
        float_passes(model, calib, bar, f"{len(targets)} quantizers")
    finally:
        for _, q in targets:
            q.observer = None
    return hists


def apply(ctx):
    model, calib, cfg, bar = ctx.model, ctx.calib, ctx.cfg, ctx.bar
    targets = [(n, q) for n, q in activation_quantizers(model)
               if q.spec.mode == "static" and not q.spec.is_identity]
    if not targets:
        raise MethodError("mse: no static activation quantizer to calibrate in this model")
    hists = collect_histograms(model, targets, calib, bar)
    amaxes, unseen, zeros = {}, [], []
    for name, q in targets:
        h = hists[name]
        if h.total == 0:  # never reached by the calibration text: a usable (and causal) per-token dynamic range
            q.configure(mode="dynamic", granularity="token", axis=-1)
            unseen.append(name)
            continue
        amax = choose_amax(h, q.spec, cfg.mse)
        if amax <= 0:  # saw only zeros: any range quantizes them exactly
            zeros.append(name)
        q.set_amax(torch.tensor(amax if amax > 0 else 1.0, device=h.device))
        amaxes[name] = amax
    if not amaxes:
        raise MethodError(f"mse: none of the {len(targets)} activation quantizers saw calibration data")
    values = sorted(amaxes.values())
    facts = {
        "calibrator": cfg.mse.calibrator,
        "calibrated": len(amaxes),
        "attention_calibrated": sum(1 for n in amaxes if n.rsplit(".", 1)[-1] in ("q", "k", "v", "p")),
        "dynamic_fallback": compact_names(unseen),  # never reached: dynamic per-tensor scaling
        "zero_inputs": compact_names(zeros),  # saw only zeros: amax 1
        **calib_extent(calib),
    }
    if values:
        facts["amax"] = {"min": values[0], "median": values[len(values) // 2], "max": values[-1]}
    return facts


def validate(cfg):
    m = cfg.mse
    if m.calibrator not in CALIBRATORS:
        raise ConfigError(f"unknown mse.calibrator {m.calibrator!r}; valid: {', '.join(CALIBRATORS)}")
    if not 0 < m.percentile <= 100:
        raise ConfigError(f"mse.percentile must be in (0, 100], got {m.percentile}")
    if m.candidates < 2:
        raise ConfigError(f"mse.candidates must be >= 2, got {m.candidates}")


register(Method("mse", configure=configure, apply=apply, validate=validate, needs_calibration=True))
