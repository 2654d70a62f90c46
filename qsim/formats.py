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
- Rounding: "nearest" (ties to the even code, i.e. the even mantissa; with
  no mantissa bits, the even exponent code; with subnormals off, a tie
  between 0 and min_normal, both even, goes to 0), "away" (ties away from
  zero, qtorch's and microxcaling's), "stochastic" (P(up) = the fraction).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch

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
        return self.quantize_reference(x)

    def quantize_reference(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        a = y.abs().clamp(max=self.max)  # clamped first, so rounding never sees inf
        return torch.copysign(round_integer(a, self.rounding), y).to(x.dtype)

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
        return self.quantize_reference(x)

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
            "bits": _bits(fmt),
            "max": fmt.max,
            "min_subnormal": fmt.min_subnormal,
            "values": fmt.num_values,
            "special": getattr(fmt, "special", "-"),
        })
    return rows


def _bits(fmt: Format) -> int:
    if isinstance(fmt, IntFormat):
        return fmt.bits
    if isinstance(fmt, FloatFormat):
        return 1 + fmt.exp_bits + fmt.man_bits
    return {"bf16": 16, "fp16": 16, "fp32": 32}[fmt.dtype_name]
