"""ABFP (Adaptive Block Floating Point, INT-FP-QSim Eq. 4): dynamic max scaling
over vectors of length n with BF16 scales, for weights (along each output row's
input dimension), activations (along `abfp.act_axis`, by default the reduction
axis of the next matmul) and, with `abfp.attention`, the attention operands.
"""
from dataclasses import replace

from ..config import ConfigError
from . import Method, register


def block_spec(spec, cfg, axis=-1):
    return replace(spec, granularity="block", block=cfg.abfp.n, axis=axis,
                   scale_dtype=cfg.abfp.scale_dtype, scale_format=cfg.abfp.scale_format, mode="dynamic")


def configure(plan, cfg):
    d = plan.default
    plan.default = replace(d, weight=block_spec(d.weight, cfg), act=block_spec(d.act, cfg, cfg.abfp.act_axis))
    if cfg.abfp.attention:
        plan.attention = block_spec(plan.attention or plan.attention_base, cfg)


def validate(cfg):
    if cfg.abfp.n < 1:
        raise ConfigError(f"abfp.n (vector length) must be >= 1, got {cfg.abfp.n}")


register(Method("abfp", configure=configure, validate=validate))
