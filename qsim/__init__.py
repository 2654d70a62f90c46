"""qsim: a number-format simulator for transformers."""
import os
import sys

__version__ = "0.1.0"

# MKL's strict conditional numerical reproducibility: its GEMMs give the same bits for any
# thread count (without it, a [128 x 1536] @ [1536 x 576] product splits its reduction across
# threads and NVFP4 perplexity moved 33.30 -> 35.34 from 1 to 2 threads). The code path MKL picks
# for the CPU (AVX2, AVX-512) still moves the last bits: what that does to a result is measured in
# the README ("Same number on any machine"). MKL reads this once, at its first BLAS call: qsim sets
# it on import, and records whether torch could already have made that call (qsim.environment).
BLAS_REPRODUCIBLE = "AUTO,STRICT"
TORCH_IMPORTED_FIRST = "torch" in sys.modules
os.environ.setdefault("MKL_CBWR", BLAS_REPRODUCIBLE)

# The version of qsim's numbers. Every result records it, and a result made under
# another version is stale (never reused by a sweep, never shown in a table).
# Bump it in any commit that changes a number qsim computes: tests/test_numerics_pins.py
# fails until it is bumped and the pins are rewritten (`python -m qsim.pins --update`).
NUMERICS_VERSION = 3


def __getattr__(name: str):
    # The Python API (qsim/api.py) loads torch: only when it is used, so `qsim tables` stays light.
    if name in ("quantize", "evaluate"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'qsim' has no attribute {name!r}")
