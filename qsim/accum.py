"""Matmul accumulation in a narrow format (`quant.accum`, `quant.accum_chunk`).

A quantized matmul multiplies quantized operands; the products of two fp32
values are exact in float64, and the operands here have at most 24 significant
bits, so every product below is exact. What this module simulates is the sum:

- `fp32` (default): torch's matmul, as before.
- `bf16` / `fp16` with `chunk=k`: along the reduction axis, each run of k
  products is summed (in float64), that partial sum is rounded once to the
  accumulator format (round to nearest even; fp16 overflows to inf), and the
  partial sums are added in fp32, in order. This is an FP8 tensor core whose
  limited-precision accumulator is promoted to fp32 every k products.
- `bf16` / `fp16` without a chunk: one running sum in the accumulator format,
  rounded after every product is added (a K-step loop: exact, and slow).

A bias is added afterwards, in fp32. Training passes the fp32 matmul's
gradient through (straight-through estimator). When an operand has more
significant bits than fp32 products can hold exactly (float64 inputs) the
products are no longer exact; qsim's operands are fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native
from .formats import FloatFormat, get_format

# The accumulator formats by name: IEEE bf16 (e8m7) and IEEE fp16 (e5m10, overflow to inf).
ACCUMULATORS = {"fp32": None, "bf16": "e8m7", "fp16": "e5m10_ieee"}


@dataclass(frozen=True)
class Accumulator:
    format: str = "fp32"
    chunk: int | None = None  # products per partial sum before it is promoted to fp32; None: no promotion

    def __post_init__(self):
        if self.format not in ACCUMULATORS:
            raise ValueError(f"unknown accumulator {self.format!r}; valid: {', '.join(ACCUMULATORS)}")
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"quant.accum_chunk must be >= 1 or null; got {self.chunk}")
        if self.format == "fp32" and self.chunk is not None:
            raise ValueError("quant.accum_chunk rounds partial sums to a narrow accumulator; set quant.accum=bf16|fp16")

    @property
    def is_fp32(self) -> bool:
        return self.format == "fp32"

    @property
    def grid(self) -> FloatFormat:
        return get_format(ACCUMULATORS[self.format])

    def describe(self) -> dict:
        return {"format": self.format, "chunk": self.chunk,
                "rule": "fp32 matmul" if self.is_fp32 else
                ("running sum rounded after every product" if self.chunk is None else
                 f"partial sums of {self.chunk} products rounded to {self.format}, added in fp32")}


def round_float64_reference(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Round float64 values once to an IEEE-style grid (nearest, ties to even; beyond max -> inf).
    formats.py rounds through fp32, which would round these sums twice."""
    a = x.abs()
    _, e = torch.frexp(a)
    step = torch.ldexp(torch.ones_like(a), (e - 1).clamp(min=fmt.emin) - fmt.man_bits)
    q = torch.round(a / step) * step  # torch.round: half to even; the divisor is a power of two
    q = torch.where(q > fmt.max, torch.full_like(q, float("inf")), q)
    return torch.copysign(q, x)


def round_float64(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """round_float64_reference(x, fmt).float(), bit for bit, for finite x. On the float64 bits:
    add half an ulp minus one plus the kept last bit (ties to even), clear the dropped bits (a
    carry moves into the exponent as it should); the result fits fp32 exactly (a bf16 overflow
    becomes fp32's inf). The grid's subnormals and overflow take the reference."""
    drop = 52 - fmt.man_bits
    bits = torch.bitwise_right_shift(x.view(torch.int64), drop)
    bits.bitwise_and_(1).add_(x.view(torch.int64)).add_((1 << (drop - 1)) - 1).bitwise_and_(-(1 << drop))
    out = bits.view(torch.float64).float()
    magnitude = out.abs()
    rare = magnitude < fmt.min_normal
    if fmt.max < 2.0**127:  # fp16: its overflow is inside fp32's range
        rare.logical_or_(magnitude > fmt.max)
    if rare.any():
        rare.logical_and_(magnitude != 0)  # zeros are exact
        if rare.any():
            out[rare] = round_float64_reference(x[rare], fmt).float()
    return out


def _accumulate(a: torch.Tensor, b: torch.Tensor, acc: Accumulator) -> torch.Tensor:
    """a [..., M, K] @ b [..., K, N] with acc's accumulation, returned in fp32."""
    grid, k = acc.grid, a.shape[-1]
    a64, b64 = a.double(), b.double()
    if acc.chunk is None:
        shape = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1])
        total = torch.zeros(shape, dtype=torch.float64, device=a.device)
        for j in range(k):
            total = round_float64_reference(total + a64[..., :, j : j + 1] * b64[..., j : j + 1, :], grid)
        return total.float()
    chunks = -(-k // acc.chunk)
    if native.library() is not None and a.device.type == "cpu":
        return _accumulate_by_chunk(a64, b64, acc, chunks)
    pad = chunks * acc.chunk - k
    if pad:  # zero products leave every partial sum unchanged
        a64 = torch.nn.functional.pad(a64, (0, pad))
        b64 = torch.nn.functional.pad(b64, (0, 0, 0, pad))
    a_c = a64.unflatten(-1, (chunks, acc.chunk)).movedim(-2, -3)  # [..., C, M, k]
    b_c = b64.unflatten(-2, (chunks, acc.chunk))  # [..., C, k, N]
    partial = torch.matmul(a_c, b_c)  # [..., C, M, N]
    if torch.isfinite(a).all() and torch.isfinite(b).all():
        partial = round_float64(partial, grid)  # on the grid, which fp32 holds exactly
    else:  # inf/NaN operands (an IEEE element format): the reference keeps inf and NaN
        partial = round_float64_reference(partial, grid).float()
    out = partial[..., 0, :, :].clone()
    for c in range(1, chunks):
        out += partial[..., c, :, :]  # fp32 adds, in chunk order
    return out


def _accumulate_by_chunk(a64: torch.Tensor, b64: torch.Tensor, acc: Accumulator, chunks: int) -> torch.Tensor:
    """_accumulate's chunked case one chunk at a time, each rounded and added by native.c while
    it is in cache (the same bits: the same float64 partial sums, rounding and fp32 adds)."""
    out = None
    for c in range(chunks):
        cols = slice(c * acc.chunk, (c + 1) * acc.chunk)
        out = native.accumulate_chunk(torch.matmul(a64[..., cols], b64[..., cols, :]).contiguous(), out, acc.grid)
    return out


def matmul(a: torch.Tensor, b: torch.Tensor, acc: Accumulator | None) -> torch.Tensor:
    """torch.matmul(a, b) with the accumulator simulated; fp32 (or None) is torch.matmul itself."""
    if acc is None or acc.is_fp32:
        return torch.matmul(a, b)
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise ValueError(f"quant.accum={acc.format} simulates fp32 operands; got {a.dtype} and {b.dtype}")
    out = _accumulate(a.detach(), b.detach(), acc)
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        exact = torch.matmul(a, b)
        return exact + (out - exact).detach()  # straight through the accumulator's rounding
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, acc: Accumulator | None) -> torch.Tensor:
    """F.linear with the accumulator simulated (the bias is added in fp32 afterwards)."""
    if acc is None or acc.is_fp32:
        return torch.nn.functional.linear(x, weight, bias)
    y = matmul(x, weight.t(), acc)
    return y if bias is None else y + bias
