"""Exact number formats: INT-b and minifloat EkMm specs, in a registry by name.

A format quantizes an already-scaled fp32 tensor onto its own grid (no scaling
here; see quantizer.py). Every format here is exact: `quantize(x)` returns the
nearest representable value, ties broken by the rounding mode, and the tests
check that against an enumeration of all code points.

Conventions (documented in README "Formats"):
- INT-b is symmetric narrow range, +-(2**(b-1) - 1), as TensorRT and the
  INT-FP-QSim paper's Eq. (1)-(3). Asymmetric (zero-point) integer
  quantization is a quantizer option, on the unsigned grid 0 .. 2**b - 1.
- EkMm has bias 2**(k-1) - 1, except E1Mm, whose bias is 1 so that E1M2 is
  {0, .25, ..., 1.75}: the same uniform 15-level grid as INT4, up to scale.
- Special values: "ieee" reserves the top exponent for inf/NaN (E5M2);
  "fn" keeps only the all-ones code as NaN (OCP E4M3, max 448); "finite" has
  no inf/NaN codes at all (OCP FP4/FP6: E2M1 max 6, E3M2 max 28, E2M3 max 7.5).
  A bare `eKmM` name is "finite" except e4m3 ("fn"), e5m2 and e8m7 ("ieee",
  so e8m7 is bf16); suffixes `_ieee`, `_fn`, `_finite` and `_b<bias>` pick
  others. `e4m3_finite` (max 480) is what qtorch and the INT-FP-QSim tool
  call E4M3. fp32 carries the simulation: a format whose max exceeds fp32's
  is refused; subnormals below 2**-149 round to fp32's.
- Saturation to +-max is on by default (inf -> +-max); without it, a value
  that rounds past max becomes inf ("ieee") or NaN ("fn"). NaN propagates;
  the sign of zero is kept.
- Two implementations, bit-identical: `quantize_reference` (frexp/ldexp, the
  readable definition) and the default fast kernel (fp32 magic-number
  rounding in cache-sized chunks, see `FloatFormat._kernel`); stochastic
  rounding and formats with no mantissa bits use the reference.
- Rounding: "nearest" (ties to the even code, i.e. the even mantissa; with
  no mantissa bits, the even exponent code; with subnormals off, a tie
  between 0 and min_normal, both even, goes to 0), "away" (ties away from
  zero, qtorch's and microxcaling's), "stochastic" (P(up) = the fraction).
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, replace

import torch

from . import native

ROUNDINGS = ("nearest", "away", "stochastic")
SPECIALS = ("ieee", "fn", "finite")
FP32_MAX = float(torch.finfo(torch.float32).max)


def round_integer(y: torch.Tensor, mode: str) -> torch.Tensor:
    """Round fp32 values to integers: "nearest" (ties to even), "away" (ties away from zero), "stochastic".

    "away" uses trunc(y) + trunc(2 * frac): floor(y + 0.5) is wrong at y = 0.5 - 2**-25, where the
    sum rounds up to 1. "stochastic" compares a uniform draw with the fraction, so an integer never
    moves and P(up) = frac; floor(y + u) rounds the sum and can move integers.
    """
    if mode == "nearest":
        return torch.round(y)
    if mode == "away":
        whole = torch.trunc(y)
        return whole + torch.trunc(2 * (y - whole))  # y - whole is exact
    if mode == "stochastic":
        low = torch.floor(y)
        return low + (torch.rand_like(y) < y - low).to(y.dtype)
    raise ValueError(f"unknown rounding {mode!r}; valid: {', '.join(ROUNDINGS)}")


# ---------------------------------------------------------------- fast kernels
# A kernel is a few in-place torch ops on one chunk; chunks are small enough to stay in the
# cache between passes, so a kernel costs little more than one pass over memory. Each fast
# kernel is bit-identical to its format's quantize_reference (the tests run both).

CHUNK = 1 << 20  # elements: 4 MiB per fp32 buffer, in L3; few chunks, so few thread barriers
_SMALL = 1 << 16  # elements: below this, new scratch tensors are cheaper than the pool's views
_EXPONENT_BITS = 0x7F800000
_scratch = threading.local()  # per-thread buffers per device, reused across calls


def _run_chunked(kernel, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """kernel(val, out, sign_src, scratch) on every chunk of fp32 x (of x / scale, then times scale).

    val holds the values to round (it never aliases out); sign_src has their signs (x's, as scales
    are positive); scratch hands out free buffers shaped like the chunk.
    Returns a new tensor shaped like x, in x's dtype, with no gradient.
    """
    src = (x.detach() if x.requires_grad else x).float().contiguous()
    out = torch.empty_like(src)
    if scale is not None and scale.requires_grad:
        scale = scale.detach()
    if src.numel() <= _SMALL:  # most calls: no layout to work out, buffers made as needed
        val = src if scale is None else src / scale
        if val.shape != src.shape:  # the scale broadcasts x to a larger shape
            return (_run_chunked(kernel, val) * scale).to(x.dtype)
        kernel(val, out, src, _Scratch(src))
        if scale is not None:
            out.mul_(scale)
        return out.to(x.dtype)
    layout = _chunks(src, out, scale)
    if layout is None:  # a scale that varies along a trailing dim: divide and multiply unfused
        return (_run_chunked(kernel, src / scale) * scale).to(x.dtype)
    chunks, size = layout
    pool = _scratch_pool(size, src.device)
    for xs, qs, ss in chunks:
        scratch = _Scratch(xs, pool)
        val = xs if ss is None else torch.div(xs, ss, out=scratch.buffer(2, torch.float32))
        kernel(val, qs, xs, scratch)
        if ss is not None:
            qs.mul_(ss)
    return out.to(x.dtype)


class _Scratch:
    """Free buffers shaped like a chunk: views of a reused pool, or new tensors."""

    __slots__ = ("like", "pool")

    def __init__(self, like: torch.Tensor, pool: tuple[torch.Tensor, ...] | None = None):
        self.like, self.pool = like, pool

    def buffer(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        if self.pool is None:
            return torch.empty_like(self.like, dtype=dtype)
        return self.pool[index][: self.like.numel()].view(self.like.shape).view(dtype)

    @property
    def int32(self) -> torch.Tensor:
        return self.buffer(0, torch.int32)

    @property
    def float32(self) -> torch.Tensor:
        return self.buffer(1, torch.float32)


def _scratch_pool(size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Three fp32 buffers of at least `size` elements on `device` for this thread, kept across calls."""
    pools = getattr(_scratch, "pools", None)
    if pools is None:
        pools = _scratch.pools = {}
    pool = pools.get(device)
    if pool is None or pool[0].numel() < size:
        pool = pools[device] = tuple(torch.empty(size, device=device) for _ in range(3))
    return pool


def _chunks(src: torch.Tensor, out: torch.Tensor, scale: torch.Tensor | None):
    """((src, out, scale) views per chunk, the largest chunk's size) for no scale, one scale,
    or one scale per row of leading dims; None for any other scale shape."""
    numel = src.numel()
    if scale is None or scale.numel() == 1:
        flat_src, flat_out = src.view(-1), out.view(-1)
        one = None if scale is None else scale.float().reshape(())
        return ((flat_src[i:i + CHUNK], flat_out[i:i + CHUNK], one) for i in range(0, numel, CHUNK)), min(CHUNK, numel)
    n_rows = native.scaled_rows(src, scale)
    if n_rows is None:
        return None
    row_len = numel // n_rows
    if row_len > CHUNK:  # rows too long to chunk: let the caller divide first and chunk flat
        return None
    src2, out2, scale2 = src.view(n_rows, row_len), out.view(n_rows, row_len), scale.float().reshape(n_rows, 1)
    per_chunk = min(n_rows, max(1, CHUNK // row_len))
    chunks = ((src2[i:i + per_chunk], out2[i:i + per_chunk], scale2[i:i + per_chunk]) for i in range(0, n_rows, per_chunk))
    return chunks, per_chunk * row_len


def _copy_sign(out: torch.Tensor, sign_src: torch.Tensor) -> None:
    """Give out the sign of sign_src (one pass): -0 for a negative value that rounded to zero.
    out already has sign_src's sign wherever it is not zero, so this equals OR-ing the sign bit."""
    torch.copysign(out, sign_src, out=out)


@dataclass(frozen=True)
class IntFormat:
    """Symmetric narrow-range signed integer grid: -qmax .. qmax."""

    bits: int
    rounding: str = "nearest"
    kind = "int"

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"int bits must be in 2..16, got {self.bits}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; valid: {', '.join(ROUNDINGS)}")

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def max(self) -> float:
        return float(2 ** (self.bits - 1) - 1)

    @property
    def min_subnormal(self) -> float:
        return 1.0

    @property
    def num_values(self) -> int:
        return 2**self.bits - 1

    @property
    def max_exponent(self) -> int:
        """floor(log2(max)): used by power-of-two (E8M0) scales."""
        return int(math.floor(math.log2(self.max)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest grid value (saturating); the fast kernel unless rounding is stochastic."""
        if self.rounding == "stochastic":
            return self.quantize_reference(x)
        return self.quantize_scaled(x, None)

    def quantize_scaled(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """quantize(x / scale) * scale, bit for bit, in one pass over memory; scale > 0, broadcastable."""
        if self.rounding == "stochastic":
            return (self.quantize_reference(x.float() / scale) * scale).to(x.dtype)
        q = native.round_scaled(x.detach(), scale, self)  # None off the native path
        if q is not None:
            return q
        return _run_chunked(self._kernel, x, scale)

    def quantize_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The readable definition, and the only path for stochastic rounding."""
        y = x.float()
        a = y.abs().clamp(max=self.max)  # clamped first, so rounding never sees inf
        return torch.copysign(round_integer(a, self.rounding), y).to(x.dtype)

    def _kernel(self, val, out, sign_src, scratch) -> None:
        torch.clamp(val, -self.max, self.max, out=out)
        if self.rounding == "nearest":
            out.round_()  # ties to even; keeps the sign of zero
            return
        whole = torch.trunc(out, out=scratch.float32)  # ties away: trunc(y) + trunc(2 * (y - trunc(y)))
        out.sub_(whole).mul_(2).trunc_().add_(whole)
        _copy_sign(out, sign_src)  # -0 - -0 is +0

    def code_points(self) -> torch.Tensor:
        return torch.arange(-self.max, self.max + 1, dtype=torch.float64)


@dataclass(frozen=True)
class FloatFormat:
    """Minifloat with `exp_bits` exponent and `man_bits` mantissa bits plus a sign."""

    exp_bits: int
    man_bits: int
    bias: int
    special: str = "finite"
    saturate: bool = True
    subnormals: bool = True
    rounding: str = "nearest"
    kind = "float"

    def __post_init__(self):
        if self.exp_bits < 1 or self.man_bits < 0 or self.exp_bits + self.man_bits > 15:
            raise ValueError(f"need k >= 1, m >= 0, k + m <= 15; got E{self.exp_bits}M{self.man_bits}")
        if self.special not in SPECIALS:
            raise ValueError(f"unknown special-value policy {self.special!r}; valid: {', '.join(SPECIALS)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {self.rounding!r}; valid: {', '.join(ROUNDINGS)}")
        if self.special == "finite" and not self.saturate:
            raise ValueError("a format with no inf/NaN codes must saturate")
        if self.special == "ieee" and self.exp_bits < 2:
            raise ValueError("an IEEE-style format needs at least 2 exponent bits")
        if self.special == "fn" and self.man_bits == 0 and self.exp_bits < 2:
            raise ValueError("an 'fn' format with no mantissa needs at least 2 exponent bits")
        if self.max > FP32_MAX:
            raise ValueError(f"E{self.exp_bits}M{self.man_bits} with bias {self.bias} and policy {self.special!r} "
                             f"reaches {self.max:.3g}, beyond fp32 (max {FP32_MAX:.3g}), which carries the simulation")

    @property
    def name(self) -> str:
        base = f"e{self.exp_bits}m{self.man_bits}"
        return base + ("" if self.special == default_special(self.exp_bits, self.man_bits) else f"_{self.special}") + (
            "" if self.bias == default_bias(self.exp_bits) else f"_b{self.bias}"
        )

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value."""
        top = 2**self.exp_bits - 1
        if self.special == "ieee" or (self.special == "fn" and self.man_bits == 0):
            top -= 1
        return top - self.bias

    @property
    def max(self) -> float:
        m = self.man_bits
        if self.special == "fn" and m > 0:
            frac = 2 - 2.0 ** (1 - m)  # all-ones mantissa at the top exponent is NaN
        else:
            frac = 2 - 2.0**-m
        return math.ldexp(frac, self.emax)

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        if not self.subnormals or self.man_bits == 0:
            return self.min_normal
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def num_values(self) -> int:
        """Distinct finite values (+0 and -0 count once)."""
        return int(torch.unique(self.code_points()).numel())

    @property
    def max_exponent(self) -> int:
        return self.emax

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest grid value; the fast kernel where it applies (see `has_fast_kernel`)."""
        if not self.has_fast_kernel:
            return self.quantize_reference(x)
        return self.quantize_scaled(x, None)

    def quantize_scaled(self, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """quantize(x / scale) * scale, bit for bit, in one pass over memory; scale > 0, broadcastable."""
        if not self.has_fast_kernel:
            return (self.quantize_reference(x.float() / scale) * scale).to(x.dtype)
        q = native.round_scaled(x.detach(), scale, self)  # None off the native path
        if q is not None:
            return q
        return _run_chunked(self._kernel, x, scale)

    @property
    def has_fast_kernel(self) -> bool:
        """Nearest and away rounding with a mantissa, for grids whose steps and magic constants fit fp32."""
        m = self.man_bits
        return self.rounding != "stochastic" and 1 <= m <= 21 and self.emin >= -126 and self.emax + 24 - m <= 127

    def _kernel(self, val, out, sign_src, scratch) -> None:
        """Round to the grid by adding and subtracting 1.5 * 2**(E + 23 - m), where 2**E is the
        value's binade held in [2**emin, 2**emax]: the fp32 addition rounds once, to the binade's
        ulp 2**(E - m), ties to even (the magic's mantissa is even, so the parity is the code's)."""
        m = self.man_bits
        magic = 1.5 * 2.0 ** (23 - m)
        binade = torch.bitwise_and(val.view(torch.int32), _EXPONENT_BITS, out=scratch.int32).view(torch.float32)
        binade.clamp_(2.0**self.emin, 2.0**self.emax)  # subnormals share the lowest binade's ulp
        torch.add(val, binade, alpha=magic, out=out)
        out.sub_(binade, alpha=magic)
        if self.rounding == "away":
            # At a tie val - out is half an ulp (binade * 2**-(m+1)) with val's sign where the even
            # neighbour was the one nearer zero; take the other one, 2 * val - out.
            half_ulps = torch.sub(val, out, out=scratch.float32).mul_(2.0 ** (m + 1))
            binade.mul_(torch.sign(val))
            tie_toward_zero = half_ulps == binade
            torch.where(tie_toward_zero, torch.lerp(out, val, 2.0), out, out=out)
        if not self.subnormals:
            self._flush_fast(val, out, scratch.float32)
        if self.saturate:
            out.clamp_(-self.max, self.max)
        else:
            out.masked_fill_(out.abs() > self.max, math.inf if self.special == "ieee" else math.nan)
        _copy_sign(out, sign_src)

    def _flush_fast(self, val, out, scratch_float) -> None:
        """Below min_normal only 0 and min_normal remain (a tie goes to 0, as in the reference)."""
        magnitude = torch.abs(val, out=scratch_float)
        up = magnitude > self.min_normal / 2 if self.rounding == "nearest" else magnitude >= self.min_normal / 2
        small = magnitude < self.min_normal
        out.masked_fill_(small, 0.0)
        out.masked_fill_(small & up, self.min_normal)

    def quantize_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The readable definition: scale each value by the ulp of its binade and round an integer."""
        y = x.float()
        # Clamp before rounding, so rounding sees no inf: saturation at max, or, without
        # saturation, a value that certainly overflows.
        a = y.abs().clamp(max=self.max if self.saturate else self._overflow_probe)
        _, e = torch.frexp(a)  # a = f * 2**e with f in [0.5, 1)
        # The ulp of each value's binade; below the normal range the ulp is fixed.
        # Floor at 2**-149 so that fp32 subnormal inputs never underflow the step.
        shift = ((e - 1).clamp(min=self.emin) - self.man_bits).clamp(min=-149)
        step = torch.ldexp(torch.ones_like(a), shift)
        scaled = a / step  # exact: a power-of-two divisor
        n = round_integer(scaled, self.rounding)
        if self.man_bits == 0 and self.rounding == "nearest":
            # With no mantissa the code's LSB is the exponent's: a tie between 2**s and 2**(s+1)
            # goes to 2**s when its code s + bias is even (round() always picks 2**(s+1)).
            to_lower = (scaled == 1.5) & ((shift + self.bias) % 2 == 0)
            n = torch.where(to_lower, torch.ones_like(n), n)
        q = n * step
        if not self.subnormals:
            q = self._flush_subnormals(a, q)
        if not self.saturate:
            fill = math.inf if self.special == "ieee" else math.nan
            q = torch.where(q > self.max, torch.full_like(q, fill), q)
        return torch.copysign(q, y).to(x.dtype)

    @property
    def _overflow_probe(self) -> float:
        """A finite value above every value that rounds to max."""
        return min(math.ldexp(1.0, self.emax + 1), FP32_MAX)

    def _flush_subnormals(self, a: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        # Without subnormals the only values below min_normal are 0 and min_normal itself.
        # Both codes have an even mantissa; a tie goes to 0.
        half = self.min_normal / 2
        if self.rounding == "nearest":
            up = a > half
        elif self.rounding == "away":
            up = a >= half
        else:
            up = torch.rand_like(a) * self.min_normal < a
        small = torch.where(up, torch.full_like(a, self.min_normal), torch.zeros_like(a))
        return torch.where(a < self.min_normal, small, q)

    def code_points(self) -> torch.Tensor:
        """Every finite value, from decoding every bit pattern (float64)."""
        m_bits, e_bits = self.man_bits, self.exp_bits
        codes = torch.arange(2 ** (e_bits + m_bits), dtype=torch.int64)
        mant = (codes % 2**m_bits).double()
        expc = codes // 2**m_bits
        top = 2**e_bits - 1
        normal = torch.ldexp(1 + mant / 2**m_bits, (expc - self.bias).to(torch.int32))
        sub = torch.ldexp(mant / 2**m_bits, torch.full_like(expc, self.emin, dtype=torch.int32))
        if not self.subnormals:
            sub = torch.where(mant == 0, sub, torch.full_like(sub, math.nan))
        mag = torch.where(expc == 0, sub, normal)
        if self.special == "ieee":
            mag = torch.where(expc == top, torch.full_like(mag, math.nan), mag)
        elif self.special == "fn":
            mag = torch.where((expc == top) & (mant == 2**m_bits - 1), torch.full_like(mag, math.nan), mag)
        mag = mag[~mag.isnan()]
        return torch.sort(torch.cat([-mag, mag])).values


@dataclass(frozen=True)
class CastFormat:
    """A pass-through cast to a torch float dtype (bf16, fp16, fp32)."""

    dtype_name: str
    rounding: str = "nearest"
    kind = "cast"

    @property
    def dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype_name]

    @property
    def name(self) -> str:
        return self.dtype_name

    @property
    def max(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def min_subnormal(self) -> float:
        return float(torch.finfo(self.dtype).smallest_normal) * float(torch.finfo(self.dtype).eps)

    @property
    def num_values(self) -> int:
        return {"bf16": 2**16 - 2 * 2**7 + 1, "fp16": 2**16 - 2 * 2**10 + 1, "fp32": 2**32 - 2 * 2**23 + 1}[self.dtype_name] - 2

    @property
    def max_exponent(self) -> int:
        return int(math.floor(math.log2(self.max)))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype_name == "fp32" and x.dtype == torch.float32:
            return x
        return x.to(self.dtype).to(x.dtype)


Format = IntFormat | FloatFormat | CastFormat


def default_bias(exp_bits: int) -> int:
    return 1 if exp_bits == 1 else 2 ** (exp_bits - 1) - 1


def default_special(exp_bits: int, man_bits: int) -> str:
    # e8m7 is bf16's layout; as "finite" its top binade (2**128) would not fit in fp32.
    return {(4, 3): "fn", (5, 2): "ieee", (8, 7): "ieee"}.get((exp_bits, man_bits), "finite")


NAMED = {
    "fp32": CastFormat("fp32"),
    "bf16": CastFormat("bf16"),
    "fp16": CastFormat("fp16"),
    **{f"int{b}": IntFormat(b) for b in range(2, 17)},
    **{f"e{k}m{m}": FloatFormat(k, m, default_bias(k), default_special(k, m)) for k, m in [
        (1, 2), (2, 1), (2, 3), (3, 2), (4, 3), (5, 2), (3, 4), (4, 2), (3, 3), (1, 6), (2, 5), (5, 10), (8, 7)]},
    "e4m3_finite": FloatFormat(4, 3, 7, "finite"),
    "e5m2_finite": FloatFormat(5, 2, 15, "finite"),
}
ALIASES = {"fp8": "e4m3", "e4m3fn": "e4m3", "fp4": "e2m1", "fp6": "e3m2", "e5m2ieee": "e5m2"}

_FLOAT_RE = re.compile(r"^e(\d+)m(\d+)(?:_(ieee|fn|finite))?(?:_b(-?\d+))?$")
_INT_RE = re.compile(r"^int(\d+)$")


class UnknownFormat(ValueError):
    pass


def get_format(name: str, rounding: str = "nearest") -> Format:
    """Look up a format by name; any `int<b>` and `e<k>m<m>[_policy][_b<bias>]` is accepted."""
    key = ALIASES.get(name.lower(), name.lower())
    fmt = NAMED.get(key)
    if fmt is None:
        if (m := _INT_RE.match(key)):
            fmt = IntFormat(int(m.group(1)))
        elif (m := _FLOAT_RE.match(key)):
            k, mm = int(m.group(1)), int(m.group(2))
            special = m.group(3) or default_special(k, mm)
            bias = int(m.group(4)) if m.group(4) is not None else default_bias(k)
            fmt = FloatFormat(k, mm, bias, special)
        else:
            raise UnknownFormat(
                f"unknown format {name!r}; valid: {', '.join(NAMED)} "
                "or any int<b> (b=2..16) or e<k>m<m>[_ieee|_fn|_finite][_b<bias>]"
            )
    return replace(fmt, rounding=rounding) if rounding != fmt.rounding else fmt


def format_table() -> list[dict]:
    """One row per registered format, for `qsim formats`."""
    rows = []
    for name, fmt in NAMED.items():
        rows.append({
            "name": name,
            "kind": fmt.kind,
            "bits": element_bits(fmt),
            "max": fmt.max,
            "min_subnormal": fmt.min_subnormal,
            "values": fmt.num_values,
            "special": getattr(fmt, "special", "-"),
        })
    return rows


def element_bits(fmt: Format) -> int:
    if isinstance(fmt, IntFormat):
        return fmt.bits
    if isinstance(fmt, FloatFormat):
        return 1 + fmt.exp_bits + fmt.man_bits
    return {"bf16": 16, "fp16": 16, "fp32": 32}[fmt.dtype_name]
