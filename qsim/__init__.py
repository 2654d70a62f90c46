"""qsim: a number-format simulator for transformers."""
__version__ = "0.1.0"

# The version of qsim's numbers. Every result records it, and a result made under
# another version is stale (never reused by a sweep, never shown in a table).
# Bump it in any commit that changes a number qsim computes: tests/test_numerics_pins.py
# fails until it is bumped and the pins are rewritten (`python -m qsim.pins --update`).
NUMERICS_VERSION = 2


def __getattr__(name: str):
    # The Python API (qsim/api.py) loads torch: only when it is used, so `qsim tables` stays light.
    if name in ("quantize", "evaluate"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qsim' has no attribute {name!r}")
