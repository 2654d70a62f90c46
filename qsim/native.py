"""Compiled format kernels (qsim/native.c), bit-identical to the pure-torch ones.

A kernel in torch is several passes over memory (divide, round, clamp, copysign,
multiply); native.c does them in one. `make install` builds it with the system C
compiler (`python -m qsim.native`); a run whose library is missing or stale
builds it on first use (about a second). Where no compiler works, the torch
kernels run: the numbers are the same, only slower, and result.json records
which ran (`kernels`). `QSIM_KERNELS=torch` forces the torch kernels,
`QSIM_KERNELS=native` makes a missing library an error (every call raises).

The library is built with -march=native, so its file name is keyed by the source, the flags
and what -march=native means on this CPU: a checkout shared by cluster nodes with different
CPUs holds one library per CPU, and no node loads one built for another (illegal instruction).
`QSIM_NATIVE_DIR` puts the libraries in another directory.

Only contiguous fp32 CPU tensors take the native path; everything else
(CUDA, other dtypes, away/stochastic rounding, non-saturating formats) stays in torch.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
# -march=native, not a portable baseline. Measured on a 2-core AVX-512 Xeon (Cooper Lake, gcc 12,
# 4M fp32 elements, median x.clone() multiples over two runs; -march= native / x86-64 / x86-64-v3
# / the torch kernels): INT4 1.04 / 6.4 / 1.03 / 1.7, E2M1 1.05 / 2.5 / 1.3 / 6.4,
# MXFP4 1.7-2.1 / 5.2-5.6 / 2.9-3.3 / 12, NVFP4 3.85 / 7.2-8.0 / 5.1-5.2 / 14.5. The portable
# build (SSE2) is 2-6x slower, slower than torch's INT4 kernel; even x86-64-v3 (AVX2) costs
# 1.25-1.9x on the minifloat and block kernels. So the library stays CPU-specific and its name
# is keyed by what -march=native resolves to on this CPU (_cpu_fingerprint): a node with another
# CPU builds its own instead of loading one that would die of an illegal instruction.
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]
MODES = ("auto", "native", "torch")


def _compiler() -> str:
    return os.environ.get("CC", "cc")


@functools.lru_cache(maxsize=None)
def _cpu_fingerprint(compiler: str) -> str:
    """What -march=native means on this machine, for the library's name: the ISA, tuning and
    cache flags the compiler passes to its back end (gcc: cc1's -march=/-m.../--param; clang:
    -target-cpu/-target-feature); if that query fails, the kernel's CPU flags. One compiler
    run (~10 ms) per process and compiler."""
    try:
        res = subprocess.run([compiler, "-march=native", "-E", "-v", "-"], input="", capture_output=True,
                             text=True, timeout=30)
        for line in res.stderr.splitlines() if res.returncode == 0 else ():
            tokens = line.split()
            if not any(t in ("-E", "-cc1") for t in tokens[1:]) or not any(
                    t.startswith("-march=") or t == "-target-cpu" for t in tokens):
                continue
            keep = []
            for i, t in enumerate(tokens):
                if (t.startswith("-m") and not t.startswith("-main-file")) or t.startswith("--param="):
                    keep.append(t)
                elif t in ("--param", "-target-cpu", "-target-feature", "-triple") and i + 1 < len(tokens):
                    keep.append(f"{t} {tokens[i + 1]}")
            if "-march=native" in keep or "-target-cpu native" in keep:
                break  # not expanded (an older compiler): it says nothing about this CPU
            return "cc: " + " ".join(keep)
    except (OSError, subprocess.SubprocessError):
        pass
    return "cpuinfo: " + platform.machine() + " " + _cpuinfo_flags()


def _cpuinfo_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):  # x86, arm
                    return " ".join(sorted(value.split()))
    except OSError:
        pass
    return platform.processor()


def _library_path(fingerprint: str | None = None) -> Path:
    if fingerprint is None:
        fingerprint = _cpu_fingerprint(_compiler())
    key = SOURCE.read_bytes() + " ".join(FLAGS).encode() + b"\0" + fingerprint.encode()
    name = f"qsim_native-{hashlib.sha256(key).hexdigest()[:16]}.so"
    if os.environ.get("QSIM_NATIVE_DIR"):
        return Path(os.environ["QSIM_NATIVE_DIR"]) / name
    local = Path(__file__).with_name("_native")
    if os.access(local.parent, os.W_OK) or (local / name).exists():
        return local / name
    return Path.home() / ".cache" / "qsim" / name


def build() -> Path:
    """Compile native.c (if this source, these flags and this CPU have no library yet); returns its path."""
    path = _library_path()
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    subprocess.run([_compiler(), *FLAGS, str(SOURCE), "-o", str(tmp), "-lm"], check=True, capture_output=True,
                   text=True)
    os.replace(tmp, path)  # atomic: a concurrent run sees the whole library or none
    return path


def _mode() -> str:
    mode = os.environ.get("QSIM_KERNELS", "auto")
    if mode not in MODES:
        raise ValueError(f"QSIM_KERNELS={mode!r}; valid: {', '.join(MODES)}")
    return mode


# The first load, once per process: (library, None) or (None, the build/load error). One
# reference, set under _lock only when complete, so a thread sees either nothing or the outcome.
_state: tuple[ctypes.CDLL | None, BaseException | None] | None = None
_lock = threading.Lock()
_warned = False


def _first_load() -> tuple[ctypes.CDLL | None, BaseException | None]:
    global _state
    with _lock:
        if _state is None:
            try:
                _state = (_load(build()), None)
            except (OSError, subprocess.CalledProcessError) as err:
                _state = (None, err)
        return _state


def library() -> ctypes.CDLL | None:
    """The loaded library, or None (QSIM_KERNELS=torch, or, under auto, it could not be built:
    warned once). Under QSIM_KERNELS=native a library that did not build raises, on every call."""
    global _warned
    mode = _mode()
    if mode == "torch":
        return None
    state = _state
    if state is None:
        state = _first_load()
    lib, err = state
    if err is None:
        return lib
    detail = (getattr(err, "stderr", "") or str(err)).strip()
    if mode == "native":
        raise RuntimeError(f"QSIM_KERNELS=native but qsim/native.c did not build: {detail}") from err
    if not _warned:
        with _lock:
            first, _warned = not _warned, True
        if first:
            warnings.warn(f"qsim's compiled kernels are unavailable ({detail[:200]}); "
                          "the torch kernels run (same numbers, slower)", stacklevel=2)
    return None


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.qsim_round_float.argtypes = [p, p, i64, i64, p, i64, i32, i32, i32, f32, i32]
    lib.qsim_round_int.argtypes = [p, p, i64, i64, p, i64, f32, i32]
    lib.qsim_row_amax.argtypes = [p, p, i64, i64, i32]
    lib.qsim_block_quantize.argtypes = [p, p, i64, i64, i32, i32, i32, i32, i32, f32, i32, f32, i32, p, i64, i32]
    lib.qsim_accumulate_chunk.argtypes = [p, p, i64, i32, i32, i32, ctypes.c_double, i32]
    for fn in (lib.qsim_round_float, lib.qsim_round_int, lib.qsim_row_amax, lib.qsim_block_quantize,
               lib.qsim_accumulate_chunk):
        fn.restype = None
    return lib


def kernels_in_use() -> str:
    """"native" or "torch": which kernels this process runs (for result.json)."""
    return "native" if library() is not None else "torch"


def _eligible(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
            and x.numel() > 0)  # even tiny tensors: one ctypes call (~8 us) beats torch's dozen ops (~25 us)


def scaled_rows(x: torch.Tensor, scale: torch.Tensor) -> int | None:
    """How many rows of x's leading dims each take one scale (scale shaped like x's leading dims
    followed by ones); None for any other scale shape. Shared with formats._chunks."""
    if scale.dim() != x.dim() or scale.device != x.device:
        return None
    lead = scale.dim()
    while lead > 0 and scale.shape[lead - 1] == 1:
        lead -= 1
    return scale.numel() if tuple(scale.shape[:lead]) == tuple(x.shape[:lead]) else None


def _row_scales(x: torch.Tensor, scale: torch.Tensor | None):
    """(n_rows, row_len, scale tensor or None, scale stride) when each scale covers whole rows
    of contiguous x (one scale, or one per index of x's leading dims); None otherwise."""
    numel = x.numel()
    if scale is None or scale.numel() == 1:
        row_len = math.gcd(numel, 1 << 14)  # rows only split the work among threads: any divisor
        s = None if scale is None else scale.detach().float().reshape(1).contiguous()
        return numel // row_len, row_len, s, 0
    n_rows = scaled_rows(x, scale)
    if n_rows is None:
        return None
    return n_rows, numel // n_rows, scale.detach().float().reshape(n_rows).contiguous(), 1


def _threads() -> int:
    return torch.get_num_threads()


def round_scaled(x: torch.Tensor, scale: torch.Tensor | None, fmt) -> torch.Tensor | None:
    """fmt.quantize_scaled(x, scale) (fmt.quantize with scale None) for the element grids of
    `element_supported`; None where the native path does not apply."""
    lib = library()
    if lib is None or not _eligible(x) or not element_supported(fmt):
        return None
    rows = _row_scales(x, scale)
    if rows is None:
        return None
    n_rows, row_len, s, stride = rows
    out = torch.empty_like(x)
    scale_ptr = None if s is None else s.data_ptr()
    if fmt.kind == "int":
        lib.qsim_round_int(x.data_ptr(), out.data_ptr(), n_rows, row_len, scale_ptr, stride, fmt.max, _threads())
    else:
        lib.qsim_round_float(x.data_ptr(), out.data_ptr(), n_rows, row_len, scale_ptr, stride, fmt.emin, fmt.emax,
                             fmt.man_bits, fmt.max, _threads())
    return out


def row_amax(x: torch.Tensor) -> torch.Tensor | None:
    """x.abs().amax(-1, keepdim=True) for contiguous fp32 CPU x; None where it does not apply."""
    lib = library()
    if lib is None or not _eligible(x) or x.dim() == 0:
        return None
    out = torch.empty((*x.shape[:-1], 1), dtype=torch.float32)
    lib.qsim_row_amax(x.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], _threads())
    return out


SCALE_RULES = {"fp32": 0, "bf16": 1, ("e8m0", "floor"): 2, ("e8m0", "ceil"): 3, "e4m3": 4}  # native.c's enum


def element_supported(fmt) -> bool:
    """Element grids native.c rounds: int (nearest) and minifloats (nearest, saturating, subnormals)."""
    if fmt.kind == "int":
        return fmt.rounding == "nearest"
    return (fmt.kind == "float" and fmt.has_fast_kernel and fmt.rounding == "nearest" and fmt.saturate
            and fmt.subnormals)


def block_quantize(view: torch.Tensor, spec, fmt, tensor_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """Symmetric token/block fake quantization of view [..., n] (the scaled vector last) in one
    pass: each row's amax, its scale by spec's scale dtype and rule, and the rounding. E4M3 block
    scales sit under an fp32 scale: tensor_scale (one, 0 already replaced by 1), or, if None,
    one per token computed here (view [..., blocks, n]). None where the native path does not apply."""
    lib = library()
    if lib is None or not _eligible(view) or not element_supported(fmt):
        return None
    rule = SCALE_RULES[(spec.scale_dtype, spec.scale_rule) if spec.scale_dtype == "e8m0" else spec.scale_dtype]
    row_len = view.shape[-1]
    n_rows = view.numel() // row_len
    is_int = fmt.kind == "int"
    exp_offset, max_mant, frac_bits = 0, 0.0, 0
    if spec.scale_dtype == "e8m0":
        frac_bits = fmt.max_exponent if is_int else 0
        if spec.scale_rule == "floor":
            exp_offset = 1 + (0 if is_int else fmt.emax)
        else:
            max_mant, exp_offset = math.frexp(fmt.max * 2.0**-frac_bits)
    rows_per_group, ts = 1, None
    if spec.scale_dtype == "e4m3":
        if tensor_scale is not None:
            if tensor_scale.numel() != 1:
                return None
            ts, rows_per_group = tensor_scale.detach().float().reshape(1).contiguous(), n_rows
        elif view.dim() >= 2:
            rows_per_group = view.shape[-2]
        else:
            return None
    out = torch.empty_like(view)
    lib.qsim_block_quantize(view.data_ptr(), out.data_ptr(), n_rows, row_len, rule, is_int,
                            0 if is_int else fmt.emin, 0 if is_int else fmt.emax, 0 if is_int else fmt.man_bits,
                            fmt.max, exp_offset, max_mant, frac_bits, None if ts is None else ts.data_ptr(),
                            rows_per_group, _threads())
    return out


def accumulate_chunk(partial: torch.Tensor, out: torch.Tensor | None, grid) -> torch.Tensor | None:
    """One chunk of accum.py's narrow accumulator: partial (float64 partial sums) rounded once to
    grid and added to out in fp32 (out None: the first chunk, returned new). None off the native path."""
    lib = library()
    if lib is None or partial.device.type != "cpu" or partial.dtype != torch.float64 or not partial.is_contiguous():
        return None
    first = out is None
    if first:
        out = torch.empty(partial.shape, dtype=torch.float32)
    lib.qsim_accumulate_chunk(partial.data_ptr(), out.data_ptr(), partial.numel(), first, grid.man_bits, grid.emin,
                              grid.max, _threads())
    return out


if __name__ == "__main__":  # `make install`: build now, loudly
    print(f"built {build()}", file=sys.stderr)
