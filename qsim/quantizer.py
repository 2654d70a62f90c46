"""One fake quantizer: format x scaling x calibration mode.

Scaling granularities (the scale is amax / format max):
- "tensor": one scale;
- "channel": one scale per index of `axis` (amax over every other dim);
- "token": one scale per vector along `axis` (amax over `axis` only), i.e.
  per-token for activations [..., features] with axis=-1;
- "block": vectors of `block` elements along `axis` (ABFP, MX). A dimension
  that `block` does not divide is zero-padded; padding never changes a scale.

Scales are kept in fp32, bf16 (ABFP), E8M0 or E4M3:
- E8M0 (OCP MX v1.0): X = 2**(floor(log2 amax) - emax_elem), the exponent
  taken exactly from the bits and clamped to 2**-127 .. 2**127, so the
  largest elements may saturate (`scale_rule="ceil"`: the smallest power of
  two with amax / X <= the element max, as some hardware does to avoid that).
  A block holding inf or NaN gets a NaN scale, so the whole block is NaN.
  Integer elements are fixed point, 1.(b-2) (MXINT8: 1.6, an implicit 2**-6),
  so their emax_elem is 0 and their steps reach 2**-133.
- E4M3 (NVFP4, ModelOpt's formulas): a global fp32 scale
  s = global amax / (elem max * 448), block scales e4m3(amax_b / (elem max * s)),
  elements on scale * s. The global amax is per tensor (`global_scale="tensor"`,
  weights), per token (`"token"`: every block of one vector along the axis;
  activations, which keeps them causal), or a calibrated static amax.
Block scales can be quantized once more (`scale_format`, VS-Quant's two-level
scaling): each row's block scales are divided by one fp32 scale per row
(their max / the scale format's max), rounded to nearest on that format, and
multiplied back; elements of a block whose scale rounded down saturate. A
two-level (or E4M3) block scale that rounds to 0 decodes its block to 0.
Scaled formats (`SCALED_FORMATS`: mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2,
mxfp6_e2m3, mxfp4, mxint8, nvfp4) name their element format, block length and
scale dtype; a spec with one of those names takes them over its own
granularity, block, scale dtype and symmetry (MX scales are always dynamic).
Modes: "dynamic" (amax from the tensor) or "static" (an `amax` buffer set by a
calibrator; with E4M3 scales, the global amax). The backward is the
piecewise-linear straight-through estimator (INT-FP-QSim Eq. 5): gradient 1
where |x| <= the clip range, 0 outside; scales
are treated as constants. The clip range is scale * format max, and never
below amax for fp32/bf16 scales (whose rounding must not zero the gradient of
the largest element); E8M0's floor rule clips above it on purpose.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import nn

from . import native, reductions
from .formats import CastFormat, IntFormat, element_bits, get_format, round_integer

GRANULARITIES = ("tensor", "channel", "token", "block")
_LARGE = 1 << 16  # elements: above this, reductions avoid an |x| temporary
SCALE_DTYPES = ("fp32", "bf16", "e8m0", "e4m3")
SCALE_RULES = ("floor", "ceil")  # E8M0: OCP's floor, or round up so that no element saturates
GLOBAL_SCALES = ("tensor", "token")  # extent of the fp32 scale over E4M3 block scales
MODES = ("dynamic", "static")


@dataclass(frozen=True)
class ScaledFormat:
    """A format that carries its own scaling: element format, block length (along the
    reduction axis) and block-scale dtype (OCP MX v1.0; NVFP4)."""

    element: str
    block: int
    scale_dtype: str

    @property
    def bits_per_element(self) -> float:
        """Element bits plus the 8-bit block scale shared by `block` elements
        (NVFP4's one fp32 scale per tensor or token is not counted)."""
        return element_bits(get_format(self.element)) + 8 / self.block

    def spec_fields(self) -> dict:
        fields = dict(granularity="block", block=self.block, scale_dtype=self.scale_dtype, scale_format=None, symmetric=True)
        if self.scale_dtype == "e8m0":
            fields["mode"] = "dynamic"  # MX block scales come from each block
        return fields


SCALED_FORMATS = {
    "mxfp8_e4m3": ScaledFormat("e4m3", 32, "e8m0"),
    "mxfp8_e5m2": ScaledFormat("e5m2", 32, "e8m0"),
    "mxfp6_e3m2": ScaledFormat("e3m2", 32, "e8m0"),
    "mxfp6_e2m3": ScaledFormat("e2m3", 32, "e8m0"),
    "mxfp4": ScaledFormat("e2m1", 32, "e8m0"),
    "mxint8": ScaledFormat("int8", 32, "e8m0"),  # elements 1.6 fixed point: the int8 grid times 2**-6
    "nvfp4": ScaledFormat("e2m1", 16, "e4m3"),
}


@dataclass(frozen=True)
class QuantSpec:
    format: str = "fp32"
    granularity: str = "tensor"
    axis: int = -1
    block: int = 64
    scale_dtype: str = "fp32"
    mode: str = "dynamic"
    symmetric: bool = True
    rounding: str = "nearest"
    scale_format: str | None = None  # second-level quantization of block scales (VS-Quant)
    scale_rule: str = "floor"  # E8M0 scales: "floor" (OCP) or "ceil"
    global_scale: str = "token"  # E4M3 scales: one fp32 scale per "tensor" or per "token" (row of blocks)

    def __post_init__(self):
        if self.scaled is not None:  # the format's own scaling replaces the spec's
            for name, value in self.scaled.spec_fields().items():
                object.__setattr__(self, name, value)
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown quantizer mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.block < 1:
            raise ValueError(f"block length n must be >= 1, got {self.block}")
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"unknown scale rule {self.scale_rule!r}; valid: {', '.join(SCALE_RULES)}")
        if self.global_scale not in GLOBAL_SCALES:
            raise ValueError(f"unknown global scale {self.global_scale!r}; valid: {', '.join(GLOBAL_SCALES)}")
        fmt = self.fmt
        if not self.symmetric and not isinstance(fmt, IntFormat):
            raise ValueError(f"asymmetric quantization needs an int format, got {self.format!r}")
        if self.scale_dtype == "e4m3" and (self.granularity != "block" or not self.symmetric):
            raise ValueError("e4m3 block scales (NVFP4-style, under a global fp32 scale) need symmetric block scaling")
        if self.scale_format is not None:
            if self.granularity != "block" or not self.symmetric or self.scale_dtype not in ("fp32", "bf16"):
                raise ValueError("scale_format (two-level scales) needs symmetric block scaling with fp32 or bf16 scales")
            if isinstance(self.scale_fmt, CastFormat):
                raise ValueError(f"scale_format must be an int or minifloat format, got {self.scale_format!r}")

    @property
    def scaled(self) -> ScaledFormat | None:
        """The scaled format this spec names (mxfp4, nvfp4, ...), or None."""
        return SCALED_FORMATS.get(self.format.lower())

    @property
    def element(self) -> str:
        """The element format's name."""
        return self.scaled.element if self.scaled is not None else self.format

    @property
    def two_level(self) -> bool:
        """Block scales rounded once more (scale_format, E4M3): a scale may round to 0."""
        return self.scale_format is not None or self.scale_dtype == "e4m3"

    @cached_property
    def fmt(self):
        """The element format."""
        return get_format(self.element, self.rounding)

    @cached_property
    def scale_fmt(self):
        return None if self.scale_format is None else get_format(self.scale_format)

    @property
    def is_identity(self) -> bool:
        fmt = self.fmt
        return isinstance(fmt, CastFormat) and fmt.dtype_name == "fp32"


class Quantizer(nn.Module):
    """Fake-quantizes a tensor (quantize then dequantize), keeping its dtype."""

    def __init__(self, spec: QuantSpec | None = None):
        super().__init__()
        self.spec = spec or QuantSpec()
        self.enabled = True
        # Static calibration result: a buffer, so it moves with the model; not in the state_dict.
        self.register_buffer("amax", None, persistent=False)
        self.version = 0  # bumped on every change; weight caches key on it
        self.observer = None  # when set, forward shows x to it and passes x through

    def configure(self, **changes) -> "Quantizer":
        self.spec = replace(self.spec, **changes)
        self.version += 1
        return self

    def set_amax(self, amax: torch.Tensor) -> None:
        self.amax = amax.detach().float().clone()
        self.spec = replace(self.spec, mode="static")
        self.version += 1

    @property
    def active(self) -> bool:
        return self.enabled and not self.spec.is_identity

    def extra_repr(self) -> str:
        s = self.spec
        parts = [s.format, s.granularity]
        if s.granularity == "block":
            parts.append(f"n={s.block}")
        if s.granularity in ("channel", "token", "block"):
            parts.append(f"axis={s.axis}")
        parts += [f"scale={s.scale_dtype}", s.mode]
        if s.scale_dtype == "e8m0" and s.scale_rule != "floor":
            parts.append(f"rule={s.scale_rule}")
        if s.scale_dtype == "e4m3":
            parts.append("global=static" if s.mode == "static" else f"global per {s.global_scale}")
        if not s.symmetric:
            parts.append("asymmetric")
        if s.scale_format:
            parts.append(f"scales in {s.scale_format}")
        return ", ".join(parts) + ("" if self.enabled else ", disabled")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x)
            return x
        if not self.active:
            return x
        if self._shareable(x):
            return _shared_fake_quantize(x, self.spec)
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized x (subclasses with their own ranges override this)."""
        return fake_quantize(x, self.spec, self.amax)

    def _shareable(self, x: torch.Tensor) -> bool:
        """Whether the result depends only on x and the spec (dynamic, deterministic, no autograd).
        Not for weights: layers cache their own, and `.data` writes do not bump a version."""
        return (type(self).quantize is Quantizer.quantize and self.amax is None and not isinstance(x, nn.Parameter)
                and self.spec.rounding != "stochastic" and not (x.requires_grad and torch.is_grad_enabled()))


class SameInputCache:
    """compute(x, *key) for the last input, reused when the same tensor comes again unchanged with
    the same key: layers that read one tensor (q/k/v, gate/up) compute it once. The entry holds x
    (so its id cannot be reused) and the version counters of x and of the result (bumped by
    in-place writes); one entry per thread. Under torch.inference_mode nothing is reused:
    inference tensors have no version counter, so an in-place write could not be noticed."""

    def __init__(self, compute):
        self.compute, self._local = compute, threading.local()

    def __call__(self, x: torch.Tensor, *key):
        if torch.is_inference_mode_enabled() or x.is_inference():
            return self.compute(x, *key)
        entry = getattr(self._local, "entry", None)
        if (entry is not None and entry[0] is x and entry[1] == x._version and entry[2] == key
                and getattr(entry[3], "_version", None) == entry[4]):
            return entry[3]
        out = self.compute(x, *key)
        self._local.entry = (x, x._version, key, out, getattr(out, "_version", None))
        return out


def fake_quantize(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize `x` per `spec`; with grad enabled, the backward is the clip-range STE."""
    if spec.is_identity:
        return x
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, spec, amax)
    return _fake_quantize(x, spec, amax, want_mask=False)[0]


_shared_fake_quantize = SameInputCache(fake_quantize)  # for Quantizer.forward


def _fake_quantize(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None, want_mask: bool):
    """(q, mask of the values inside the clip range, or None)."""
    fmt = spec.fmt
    if isinstance(fmt, CastFormat):
        return fmt.quantize(x), None  # no clip range: the STE passes every gradient
    view, restore = _blocked_view(x, spec)
    global_amax = None
    if spec.mode == "static" and amax is None:
        raise RuntimeError("static quantizer has no calibrated amax; run a calibrator first")
    if not want_mask:
        q = _native_block_quantize(view, spec, fmt, amax)
        if q is not None:
            return restore(q).to(x.dtype), None
    if spec.scale_dtype == "e4m3":  # block amaxes from the blocks; the global amax static or from them
        lo, hi = dynamic_range(view, spec)
        global_amax = _global_amax(hi, spec, amax)
    elif spec.mode == "static":
        lo, hi = static_range(amax, view, spec)
    else:
        lo, hi = dynamic_range(view, spec)
    q, inside = quantize_view(view, lo, hi, spec, fmt, want_mask=want_mask, global_amax=global_amax)
    q = restore(q).to(x.dtype)
    return q, (restore(inside) if want_mask else None)


def _native_block_quantize(view: torch.Tensor, spec: QuantSpec, fmt, amax: torch.Tensor | None):
    """_fake_quantize's symmetric token/block case in native.c's one pass (the same bits);
    None where it does not apply (then the torch ops below run)."""
    if not (spec.symmetric and spec.scale_format is None and spec.granularity in ("token", "block")):
        return None
    if spec.scale_dtype == "e4m3":
        if spec.mode == "static":
            return native.block_quantize(view, spec, fmt, tensor_scale=_tensor_scale(amax.reshape(()), fmt))
        if spec.global_scale == "tensor":
            global_amax = _global_amax(dynamic_range(view, spec)[1], spec, None)
            return native.block_quantize(view, spec, fmt, tensor_scale=_tensor_scale(global_amax, fmt))
        return native.block_quantize(view, spec, fmt)  # one scale per token, from its blocks
    if spec.mode != "dynamic":
        return None
    return native.block_quantize(view, spec, fmt)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized value. Backward: the gradient where |x| is inside the clip range, else 0.

    A Function rather than `q + (x - x.detach()) * mask`: that sum turns an inf input into NaN.
    """

    @staticmethod
    def forward(ctx, x, spec, amax):
        q, inside = _fake_quantize(x.detach(), spec, amax, want_mask=True)
        if inside is not None:
            ctx.save_for_backward(inside)
        ctx.passes_all = inside is None
        return q

    @staticmethod
    def backward(ctx, grad):
        if ctx.passes_all:
            return grad, None, None
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, torch.zeros_like(grad)), None, None


def shared_scale_axes(spec: QuantSpec, ndim: int) -> frozenset[int]:
    """The axes (0..ndim-1) of an ndim tensor along which elements share one dynamic scale:
    a scale depends on every element of its group, so on whatever those axes index.
    Static scales are constants and share nothing; casts (fp32, fp16, bf16) have no scale."""
    if isinstance(spec.fmt, CastFormat) or spec.mode == "static":
        return frozenset()
    if spec.granularity == "tensor":
        return frozenset(range(ndim))
    axis = spec.axis % ndim
    if spec.granularity == "channel":
        return frozenset(range(ndim)) - {axis}
    if spec.granularity == "block" and spec.block == 1:
        return frozenset()
    return frozenset({axis})  # token, block: a vector (or block of it) along axis


def _reduce_dims(view: torch.Tensor, spec: QuantSpec) -> tuple[int, ...] | None:
    """Dims that one scale covers, in the (possibly blocked) view; None = all."""
    if spec.granularity == "tensor":
        return None
    if spec.granularity == "channel":
        keep = spec.axis % view.dim()
        return tuple(d for d in range(view.dim()) if d != keep)
    return (-1,)  # token and block views put the scaled vector last


def _blocked_view(x: torch.Tensor, spec: QuantSpec):
    """Move the scaled axis last (token, block) and cut it into blocks; return the view and its inverse."""
    if spec.granularity in ("tensor", "channel"):
        return x, lambda t: t
    axis = spec.axis % x.dim()
    moved = x.movedim(axis, -1) if axis != x.dim() - 1 else x
    if spec.granularity == "token":
        return moved, (lambda t: t.movedim(-1, axis)) if axis != x.dim() - 1 else (lambda t: t)
    n = spec.block
    length = moved.shape[-1]
    pad = (-length) % n
    if pad:
        moved = torch.nn.functional.pad(moved, (0, pad))
    blocks = moved.reshape(*moved.shape[:-1], -1, n)

    def restore(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(*t.shape[:-2], -1)
        if pad:
            t = t[..., :length]
        return t.movedim(-1, axis) if axis != x.dim() - 1 else t

    return blocks, restore


def dynamic_range(view: torch.Tensor, spec: QuantSpec):
    dims = _reduce_dims(view, spec)
    if spec.symmetric:
        n = view.shape[-1]
        amax = native.row_amax(view) if dims == (-1,) else None  # one pass (None off the native path)
        if amax is not None:
            return None, amax
        if spec.granularity == "block" and n <= 16 and n & (n - 1) == 0 and view.numel() >= _LARGE:
            # torch reduces a last dim this short slowly; halving it is exact and ~3x faster (NVFP4's 16)
            amax = view.abs()
            while amax.shape[-1] > 1:
                half = amax.shape[-1] // 2
                amax = torch.maximum(amax[..., :half], amax[..., half:])
        elif view.numel() < _LARGE:
            amax = view.abs().amax() if dims is None else view.abs().amax(dim=dims, keepdim=True)
        elif dims is None:  # max(max x, -min x): two reads and no |x| temporary
            amax = torch.maximum(view.amax(), -view.amin())
        else:
            amax = torch.maximum(view.amax(dim=dims, keepdim=True), -view.amin(dim=dims, keepdim=True))
        return None, amax.float()
    if dims is None:
        return view.amin().float(), view.amax().float()
    return view.amin(dim=dims, keepdim=True).float(), view.amax(dim=dims, keepdim=True).float()


def static_range(amax: torch.Tensor, view: torch.Tensor, spec: QuantSpec):
    if spec.granularity == "tensor" or amax.dim() == 0:
        a = amax.reshape(())
    elif spec.granularity == "channel":
        shape = [1] * view.dim()
        shape[spec.axis % view.dim()] = -1
        a = amax.reshape(shape)
    else:
        raise ValueError("static calibration supports tensor and channel granularity")
    if spec.symmetric:
        return None, a
    return -a, a  # static asymmetric stores a symmetric clip range


def _global_amax(block_amax: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None) -> torch.Tensor:
    """The amax under E4M3 block scales: calibrated (static), over the tensor, or over each row of blocks."""
    if spec.mode == "static":
        return amax.reshape(())
    if spec.global_scale == "tensor":
        return block_amax.amax()
    return block_amax.amax(dim=-2, keepdim=True)


# The smallest positive scale each scale dtype holds: a scale that underflowed to 0 would give 0/0.
_MIN_SCALE = {"fp32": 2.0**-149, "bf16": 2.0**-133}
E8M0_EXPONENTS = (-127, 127)  # OCP E8M0: 2**-127 .. 2**127 (0xFF is NaN)
E4M3 = get_format("e4m3")  # NVFP4's block scales (max 448)


def _scale_from_amax(amax: torch.Tensor, fmt, spec: QuantSpec, global_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Scales of blocks with these amaxes. A NaN amax gives a NaN scale; an all-zero block gets
    the smallest scale (fp32, bf16: 0 / scale = 0) or a scale of 0 (two-level: see quantize_view)."""
    if spec.scale_dtype == "e8m0":
        return _e8m0_scale(amax, fmt, spec.scale_rule)
    if spec.scale_dtype == "e4m3":
        return _e4m3_scale(amax, global_amax, fmt)
    scale = amax / fmt.max
    if spec.scale_dtype == "bf16":
        scale = scale.to(torch.bfloat16).float()
    if spec.scale_format is not None:
        return _two_level(scale, spec.scale_fmt)
    return scale.clamp_(min=_MIN_SCALE[spec.scale_dtype])


def _e8m0_scale(amax: torch.Tensor, fmt, rule: str) -> torch.Tensor:
    """OCP MX: X = 2**(floor(log2 amax) - emax_elem) ("floor"), or the smallest power of two with
    amax <= elem max * X ("ceil"); clamped to E8M0's range; NaN for a block holding inf or NaN.
    Integer elements are fixed point 1.(b-2) (emax_elem 0), so the step on the int grid is X * 2**-(b-2)."""
    int_elements = isinstance(fmt, IntFormat)
    frac_bits = fmt.max_exponent if int_elements else 0
    mant, e = torch.frexp(amax)  # amax = mant * 2**e, mant in [0.5, 1): exact, where log2 rounds
    if rule == "floor":
        exponent = e - 1 - (0 if int_elements else fmt.emax)
    else:
        max_mant, max_e = math.frexp(fmt.max * 2.0**-frac_bits)
        exponent = e - max_e + (mant > max_mant).to(e.dtype)
    scale = _power_of_two(exponent)
    if frac_bits:
        scale.mul_(2.0**-frac_bits)  # exact: fp32 subnormals reach 2**-149
    return scale.add_(amax - amax)  # + 0, or NaN where amax is inf or NaN


def _e4m3_scale(amax: torch.Tensor, global_amax: torch.Tensor, fmt) -> torch.Tensor:
    """NVFP4 (ModelOpt's formulas, in fp32): s = global amax / (elem max * 448), block scale
    e4m3(amax / (elem max * s)) (saturating at 448), scale = block scale * s. A global amax of 0
    gives zero scales; a non-finite amax or global amax gives NaN."""
    s = _tensor_scale(global_amax, fmt)
    block = E4M3.quantize(amax / (fmt.max * s)).add_(amax - amax)  # NaN where a block holds inf or NaN
    return block * s  # an inf s gives 0 * inf = NaN


def _tensor_scale(global_amax: torch.Tensor, fmt) -> torch.Tensor:
    """NVFP4's fp32 scale over the E4M3 block scales; 1 where the global amax is 0 (every block
    amax is 0 then: their scales are 0)."""
    s = global_amax.float() / (fmt.max * E4M3.max)
    return torch.where(s == 0, torch.ones_like(s), s)


def _two_level(scale: torch.Tensor, scale_fmt) -> torch.Tensor:
    """Block scales [..., blocks, 1] on `scale_fmt`'s grid times one fp32 scale per row."""
    row = scale.amax(dim=-2, keepdim=True) / scale_fmt.max
    row = torch.where(row > 0, row, torch.ones_like(row))
    return scale_fmt.quantize(scale / row) * row


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    exponent = exponent.clamp(*E8M0_EXPONENTS)
    return torch.ldexp(torch.ones(exponent.shape, dtype=torch.float32, device=exponent.device), exponent)


def quantize_view(view, lo, hi, spec: QuantSpec, fmt, want_mask: bool, global_amax=None):
    xf = view.float()
    if lo is None:  # symmetric
        scale = _scale_from_amax(hi, fmt, spec, global_amax)
        if spec.two_level:  # a block scale that rounded to 0 decodes its block to 0
            nonzero = scale != 0
            q = fmt.quantize_scaled(xf, torch.where(nonzero, scale, torch.ones_like(scale)))
            q.mul_(nonzero)  # keeps the sign of zero; unconditional: no host sync (meta, CUDA)
        else:
            q = fmt.quantize_scaled(xf, scale)  # = fmt.quantize(xf / scale) * scale, in one pass
        inside = None
        if want_mask:
            clip = scale * fmt.max
            if spec.scale_dtype in ("fp32", "bf16") and spec.scale_format is None:
                # A rounded fp32/bf16 scale can land a hair below amax / max; amax itself stays inside.
                # (E8M0's floor rule and two-level scales clip the top elements on purpose.)
                clip = torch.maximum(clip, hi)
            inside = xf.abs() <= clip
        return q, inside
    # Asymmetric integer grid 0 .. 2**b - 1 with a zero point.
    levels = 2**fmt.bits - 1
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    scale = span / levels
    if spec.scale_dtype == "e8m0":
        # The smallest power of two that covers the span (the floor rule would clip one end).
        mant, e = torch.frexp(scale)
        scale = _power_of_two(torch.where(mant == 0.5, e - 1, e))
    elif spec.scale_dtype == "bf16":
        scale = scale.to(torch.bfloat16).float()
    scale = scale.clamp(min=_MIN_SCALE.get(spec.scale_dtype, 0.0))
    zero = torch.round(-lo / scale)
    codes = torch.clamp(round_integer(xf / scale, fmt.rounding) + zero, 0, levels)
    q = (codes - zero) * scale
    inside = ((xf >= lo) & (xf <= hi)) if want_mask else None
    return q, inside


def quant_error(x: torch.Tensor, spec: QuantSpec, amax: torch.Tensor | None = None) -> float:
    """Mean squared fake-quantization error (used by calibrators and tests)."""
    with torch.no_grad():
        return float(reductions.mean((fake_quantize(x, spec, amax) - x).float().pow(2)))

