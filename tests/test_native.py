"""The compiled kernels (qsim/native.c) against the torch kernels they replace: the same bits.

The torch kernels are checked against the code-point enumerations and the OCP / NVFP4 oracles
(test_formats.py, test_mx.py); here every native path runs beside its torch twin
(QSIM_KERNELS=torch) on inputs large enough to take it, with the values that break naive code:
NaN, +-inf, +-0, fp32 subnormals, all-zero and all-subnormal blocks, block maxima one ulp below
a power of two, values far beyond the grid, and lengths that the block does not divide.
"""
import math
import platform
import subprocess
import sys
import threading
import warnings

import pytest
import torch

from qsim import native
from qsim.formats import get_format
from qsim.quantizer import SCALED_FORMATS, QuantSpec, fake_quantize


@pytest.fixture
def kernels(monkeypatch):
    """run(fn) -> (native result, torch result)."""
    def run(fn):
        monkeypatch.setenv("QSIM_KERNELS", "native")
        fast = fn()
        monkeypatch.setenv("QSIM_KERNELS", "torch")
        slow = fn()
        monkeypatch.setenv("QSIM_KERNELS", "native")
        return fast, slow
    return run


def assert_same_bits(a: torch.Tensor, b: torch.Tensor):
    assert a.shape == b.shape and a.dtype == b.dtype
    nan = a.isnan()
    assert torch.equal(nan, b.isnan())
    assert torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def hard_values(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-6, 6, cols).roll(seed)
    flat = x.view(-1)
    specials = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-40, -1e-45, 3e38, -3e38, 448.0, 6.0, 7.5, 1.0]
    flat[: len(specials) * 7] = torch.tensor(specials * 7)
    x[1] = 0.0  # all-zero rows and blocks
    x[2] = -0.0
    x[3] = torch.randn(cols, generator=g) * 1e-41  # fp32 subnormals only
    x[4] = torch.nextafter(2.0 ** (torch.arange(cols) % 20 - 6.0), torch.zeros(cols))  # one ulp below 2**k
    x[5, ::16] = torch.nextafter(torch.tensor(8.0), torch.tensor(0.0))
    x[6] = x[6].sign() * torch.nextafter(torch.tensor(6.0 * 2.0**-3), torch.tensor(0.0))
    return x


def test_the_library_builds_and_loads():
    assert native.library() is not None, "qsim/native.c did not build (see the warning)"
    assert native.kernels_in_use() == "native"


def test_qsim_kernels_torch_turns_it_off(monkeypatch):
    monkeypatch.setenv("QSIM_KERNELS", "torch")
    assert native.kernels_in_use() == "torch"
    monkeypatch.setenv("QSIM_KERNELS", "fast")
    with pytest.raises(ValueError, match="QSIM_KERNELS"):
        native.library()


@pytest.fixture
def fresh_load(monkeypatch):
    """The process before its first native.library() call (restored afterwards)."""
    monkeypatch.setattr(native, "_state", None)
    monkeypatch.setattr(native, "_warned", False)
    native._cpu_fingerprint.cache_clear()  # the first call asks the compiler again: a wider window


def test_concurrent_first_calls_all_get_the_library(fresh_load, monkeypatch):
    monkeypatch.setenv("QSIM_KERNELS", "auto")
    threads, calls = 8, 50
    barrier = threading.Barrier(threads)
    got = [[] for _ in range(threads)]

    def worker(i):
        barrier.wait()
        for _ in range(calls):
            got[i].append(native.library())

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    finally:
        sys.setswitchinterval(before)
    results = [lib for per_thread in got for lib in per_thread]
    assert len(results) == threads * calls
    assert sum(lib is None for lib in results) == 0
    assert len({id(lib) for lib in results}) == 1  # loaded once, by one thread


def test_a_failed_build_raises_every_time_under_native_and_warns_once_under_auto(fresh_load, monkeypatch,
                                                                                  tmp_path):
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    monkeypatch.setenv("QSIM_NATIVE_DIR", str(tmp_path / "libs"))
    assert not native._library_path().exists()
    monkeypatch.setenv("QSIM_KERNELS", "native")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="QSIM_KERNELS=native but qsim/native.c did not build") as err:
            native.library()
        assert isinstance(err.value.__cause__, subprocess.CalledProcessError)
    monkeypatch.setenv("QSIM_KERNELS", "auto")
    with pytest.warns(UserWarning, match="compiled kernels are unavailable"):
        assert native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert native.library() is None
        assert native.kernels_in_use() == "torch"
        x = hard_values(8, 64)
        assert_same_bits(get_format("int4").quantize(x), get_format("int4").quantize_reference(x))
    monkeypatch.setenv("QSIM_KERNELS", "native")
    with pytest.raises(RuntimeError, match="did not build"):
        native.kernels_in_use()
    assert not any((tmp_path / "libs").glob("*.so"))


def test_the_library_name_is_keyed_by_the_cpu(monkeypatch, tmp_path):
    a, b = "cc: -march=skylake-avx512 -mavx512f", "cc: -march=haswell -mno-avx512f"
    assert native._library_path(a) == native._library_path(a)
    assert native._library_path(a) != native._library_path(b)
    here = native._cpu_fingerprint(native._compiler())  # what -march=native resolves to here
    assert here.startswith("cc: ") and ("-march=" in here or "-target-cpu" in here), here
    assert native._library_path() == native._library_path(here) == native.build()
    with monkeypatch.context() as m:
        m.setattr(native, "_cpu_fingerprint", lambda compiler: b)  # another CPU on the same checkout
        assert native._library_path() == native._library_path(b) != native._library_path(here)
    fallback = native._cpu_fingerprint("false")  # no compiler to ask: the kernel's CPU flags
    assert fallback.startswith(f"cpuinfo: {platform.machine()} ")
    assert native._library_path(fallback) != native._library_path(here)
    monkeypatch.setenv("QSIM_NATIVE_DIR", str(tmp_path))
    assert native._library_path(a).parent == tmp_path


ELEMENT_FORMATS = ["int2", "int3", "int4", "int8", "int16", "e1m2", "e2m1", "e2m3", "e3m2", "e4m3", "e5m2",
                   "e4m3_finite", "e3m4", "e8m7", "e5m10_ieee", "e6m9"]


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
@pytest.mark.parametrize("threads", [1, 2])
def test_element_kernels_match_torch(name, threads, kernels):
    fmt = get_format(name)
    x = hard_values(96, 1024)
    scale_row = torch.rand(96, 1, generator=torch.Generator().manual_seed(1)) + 0.25
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fast, slow in (kernels(lambda: fmt.quantize(x)),
                           kernels(lambda: fmt.quantize_scaled(x, scale_row)),
                           kernels(lambda: fmt.quantize_scaled(x, torch.tensor(0.37)))):
            assert_same_bits(fast, slow)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(SCALED_FORMATS))
@pytest.mark.parametrize("rule", ["floor", "ceil"])
@pytest.mark.parametrize("cols", [1024, 1000, 48])
def test_scaled_formats_match_torch(name, rule, cols, kernels):
    x = hard_values(160, cols, seed=cols)
    for spec in (QuantSpec(format=name, scale_rule=rule), QuantSpec(format=name, scale_rule=rule, global_scale="tensor")):
        fast, slow = kernels(lambda: fake_quantize(x, spec))
        assert_same_bits(fast, slow)


def test_nvfp4_static_tensor_scale_matches_torch(kernels):
    x = hard_values(128, 1024)
    spec = QuantSpec(format="nvfp4", mode="static")
    for amax in (torch.tensor(5.0), torch.tensor(0.0), torch.tensor(math.inf)):
        fast, slow = kernels(lambda: fake_quantize(x, spec, amax))
        assert_same_bits(fast, slow)


@pytest.mark.parametrize("name", ["int4", "int8", "e2m1", "e4m3", "e1m2"])
@pytest.mark.parametrize("scale_dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("granularity,block", [("block", 16), ("block", 64), ("block", 100), ("token", 64)])
def test_abfp_blocks_match_torch(name, scale_dtype, granularity, block, kernels):
    x = hard_values(64, 1024, seed=block)
    spec = QuantSpec(format=name, granularity=granularity, block=block, scale_dtype=scale_dtype)
    fast, slow = kernels(lambda: fake_quantize(x, spec))
    assert_same_bits(fast, slow)
    moved = x.t().contiguous()  # a scaled axis that is not last: moved into place first
    spec0 = QuantSpec(format=name, granularity=granularity, block=block, scale_dtype=scale_dtype, axis=0)
    fast, slow = kernels(lambda: fake_quantize(moved, spec0))
    assert_same_bits(fast, slow)


def test_native_path_is_the_one_taken():
    """The large inputs above really run native.c (a None here would compare torch with torch)."""
    x = hard_values(64, 1024)
    assert native.round_scaled(x, None, get_format("e4m3")) is not None
    assert native.round_scaled(x, torch.tensor(0.5), get_format("int4")) is not None
    assert native.round_scaled(x, None, get_format("e4m3", "away")) is None  # ties away: torch's kernel
    spec = QuantSpec(format="mxfp4")
    assert native.block_quantize(x.view(64, 32, 32), spec, spec.fmt) is not None
    assert native.row_amax(x) is not None
    assert native.round_scaled(x[:1, :3].contiguous(), None, get_format("e4m3")) is not None  # tiny ones too
    assert native.round_scaled(x[:, :3], None, get_format("e4m3")) is None  # not contiguous: torch's
    assert native.round_scaled(x.double(), None, get_format("e4m3")) is None


@pytest.mark.parametrize("overrides", [["format=w4a8", "method=abfp"],  # the default, attention operands on
                                       ["format.weight=mxfp4", "format.act=nvfp4", "method=rtn"]])
def test_smollm2_logits_are_bit_identical_under_both_kernels(overrides, wikitext_ids, monkeypatch):
    """The real model through surgery: weights (quantized once per model, so one model per
    kernel set), activations and attention operands, on one 128-token window."""
    from qsim.config import compose_config
    from qsim.models import load_smollm2
    from qsim.run import build_plan
    from qsim.surgery import quantize_model

    logits = {}
    for mode in ("native", "torch"):
        monkeypatch.setenv("QSIM_KERNELS", mode)
        lm = load_smollm2()
        quantize_model(lm.model, build_plan(compose_config(overrides)))
        with torch.inference_mode():
            logits[mode] = lm.model(wikitext_ids[None, :128], use_cache=False).logits
    assert_same_bits(logits["native"], logits["torch"])
    assert logits["native"].isfinite().all()


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
@pytest.mark.parametrize("chunk", [128, 32, 1000])
def test_narrow_accumulators_match_torch(fmt, chunk, kernels):
    """Partial sums rounded to bf16/fp16 (accum.py), including inf/NaN operands, fp16 overflow,
    partial sums in the accumulator's subnormal range, and broadcast batch dims."""
    from qsim.accum import Accumulator, matmul
    g = torch.Generator().manual_seed(chunk)
    a, b = torch.randn(96, 576, generator=g) * 300, torch.randn(576, 200, generator=g) * 300
    a[0, :3], a[1, 0], a[2, 5] = math.inf, math.nan, -math.inf
    b[:, 2] *= 1e-40  # products far below bf16's and fp16's smallest normal
    acc = Accumulator(fmt, chunk)
    fast, slow = kernels(lambda: matmul(a, b, acc))
    assert_same_bits(fast, slow)
    assert fast.isinf().any() and fast.isnan().any()
    heads_a, heads_b = torch.randn(2, 3, 64, 200, generator=g), torch.randn(3, 200, 64, generator=g)
    fast, slow = kernels(lambda: matmul(heads_a, heads_b, acc))
    assert_same_bits(fast, slow)
