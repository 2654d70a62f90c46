"""Reductions whose bits do not depend on the thread count.

torch splits a full reduction of a large tensor (`x.sum()`, `x.mean()`, `x.norm()`) among its
threads and adds the per-thread partial sums, so the last bits of, say, a 12.5M-element sum
differ between 1 and 2 threads. A reduction along the last dimension keeps each row in one
thread. `total` sums fixed-length rows, then the row sums the same way, so the order of every
addition is fixed by the tensor's size alone. Where a full reduction decides something (which
format, shift or scale a method picks) qsim uses these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROW = 4096  # elements per row; well under torch's parallel grain (32768), so the last level is serial


def total(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x.sum(dtype=dtype) over every element, in an order fixed by x.numel()."""
    flat = x.reshape(-1).to(dtype)
    while flat.numel() > ROW:
        pad = -flat.numel() % ROW
        if pad:
            flat = F.pad(flat, (0, pad))  # +0.0 terms: the sum is unchanged
        flat = flat.view(-1, ROW).sum(-1)
    return flat.sum()


def mean(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return total(x, dtype) / max(x.numel(), 1)


def norm(x: torch.Tensor) -> torch.Tensor:
    """The Frobenius norm, in float64."""
    return total(x.double().pow(2)).sqrt()
