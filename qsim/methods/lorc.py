"""LoRC (ZeroQuant-V2's low-rank compensation): after weight quantization, per
layer, the rank-r truncated SVD of the rounding error E = W - W_q,
E ~ U_r S_r V_r^T, gives two factors A = U_r S_r^1/2 [out, r] and
B = S_r^1/2 V_r^T [r, in], kept in `lorc.format` (fp16 by default; an int or
minifloat format gets one fp32 scale per row of each factor). The layer then
computes with W_q + A B: a deployment adds x B^T A^T to the quantized matmul,
reading the same (quantized) input.

It runs after the stage that quantized the weights: RTN/ABFP (the weight
quantizer is active and W is still float: W_q is its output) or GPTQ (which
rounded W in place and, because this stage `reads_float_weights`, kept the float
W as `layer.float_weight`). Afterwards the layer's weight holds W_q + A B and
its weight quantizer is off. `lorc.rank=0` changes nothing; a rank above
min(out, in) is capped there (the full-rank factors reproduce W).

Added storage per weight: r (out + in) factor elements of the format's bits,
plus (out + r) 32-bit scales for scaled formats, over out * in weights.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import reductions
from ..config import ConfigError
from ..formats import CastFormat, UnknownFormat, element_bits, get_format
from ..quantizer import QuantSpec, fake_quantize
from ..surgery import quantized_layers
from . import Method, register

SCALE_BITS = 32


def low_rank_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [out, r], B [r, in] with A B the best rank-r approximation of `error` (SVD in float64)."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vh[:r]


def store(factor: torch.Tensor, fmt_name: str) -> torch.Tensor:
    """The factor as kept: cast, or quantized with one scale per row."""
    fmt = get_format(fmt_name)
    if isinstance(fmt, CastFormat):
        return fmt.quantize(factor.float())
    return fake_quantize(factor.float(), QuantSpec(format=fmt_name, granularity="channel", axis=0))


def added_bits(out: int, inp: int, rank: int, fmt_name: str) -> int:
    fmt = get_format(fmt_name)
    scales = 0 if isinstance(fmt, CastFormat) else (out + rank) * SCALE_BITS
    return rank * (out + inp) * element_bits(fmt) + scales


def _as_matrix(layer: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """[out, in] (HF Conv1D stores [in, out]); the same function maps back."""
    return w.t() if layer.weight_axes == (1, 0) else w


@torch.no_grad()
def apply(ctx):
    model, cfg, bar = ctx.model, ctx.cfg, ctx.bar
    rank, fmt = cfg.lorc.rank, cfg.lorc.format
    layers = [(n, m) for n, m in quantized_layers(model) if m.weight.dim() == 2]
    if bar is not None:
        bar.start(len(layers))
    done, skipped, weights, bits, err_before, err_after = [], [], 0, 0, [], []
    for name, layer in layers:
        float_weight = layer.__dict__.pop("float_weight", None)  # left by GPTQ for this stage
        if float_weight is not None:
            w, wq = float_weight.float(), _as_matrix(layer, layer.weight).float()
        elif layer.weight_quantizer.active:
            w, wq = _as_matrix(layer, layer.weight).float(), _as_matrix(layer, layer.quantized_weight()).float()
        else:
            skipped.append(name)  # weights not quantized: nothing to compensate
            continue
        if rank == 0:
            continue
        error = w - wq
        a, b = low_rank_factors(error, rank)
        a, b = store(a, fmt), store(b, fmt)
        corrected = wq + a @ b
        w_norm = max(float(reductions.norm(w)), 1e-30)
        err_before.append(float(reductions.norm(error)) / w_norm)
        err_after.append(float(reductions.norm(w - corrected)) / w_norm)
        layer.weight.copy_(_as_matrix(layer, corrected).to(layer.weight.dtype))
        layer.weight_quantizer.enabled = False  # the weight holds W_q + A B now
        layer.drop_weight_cache()
        weights += w.numel()
        bits += added_bits(w.shape[0], w.shape[1], a.shape[1], fmt)
        done.append(name)
        if bar is not None:
            bar.advance(1)
    return {
        "rank": rank,
        "format": fmt,
        "layers": len(done),
        "not_quantized_skipped": skipped,
        "added_bits_per_weight": bits / weights if weights else 0.0,
        "weight_error_before_mean": sum(err_before) / len(err_before) if err_before else None,
        "weight_error_after_mean": sum(err_after) / len(err_after) if err_after else None,
        "weight_error": "||W - W_q||_F / ||W||_F per layer, before and after adding A B",
    }


def validate(cfg):
    if cfg.lorc.rank < 0:
        raise ConfigError(f"lorc.rank must be >= 0, got {cfg.lorc.rank}")
    try:
        get_format(cfg.lorc.format)
    except (UnknownFormat, ValueError) as err:
        raise ConfigError(f"lorc.format: {err}") from None


register(Method("lorc", apply=apply, validate=validate, reads_float_weights=True))  # alone: on the quant.* weights (RTN)
