"""RTN: round-to-nearest with dynamic per-channel weights and per-token activations, no calibration."""
from dataclasses import replace

from . import Method, register


def configure(plan, cfg):
    d = plan.default
    plan.default = replace(
        d,
        weight=replace(d.weight, granularity="channel", mode="dynamic"),
        act=replace(d.act, granularity="token", axis=-1, mode="dynamic"),
    )


register(Method("rtn", configure=configure))
