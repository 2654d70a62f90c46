"""The quantizer: scaling granularities, scale dtypes, modes, zero points and the STE.

The per-tensor path is checked against the formula written out here; the
other granularities against a loop that applies the per-tensor path to each
channel, token or block; and a small ABFP case against values worked by hand.
"""
import math
from dataclasses import replace

import pytest
import torch

from qsim.formats import get_format
from qsim.quantizer import QuantSpec, Quantizer, fake_quantize, quant_error


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: a second thread only adds contention


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def per_tensor_by_formula(x, name, scale_dtype="fp32", rounding="nearest"):
    """q = Q(x / s) * s with s = amax / max (fp32 or bf16) or 2**(floor(log2 amax) - emax) (E8M0)."""
    fmt = get_format(name, rounding)
    amax = x.abs().max().float()
    if amax == 0:
        return torch.zeros_like(x)
    if scale_dtype == "e8m0":
        scale = torch.tensor(2.0 ** (math.floor(math.log2(amax.item())) - math.floor(math.log2(fmt.max))))
    else:
        scale = amax / fmt.max
        if scale_dtype == "bf16":
            scale = scale.bfloat16().float()
    return fmt.quantize(x / scale) * scale


FORMATS = ["int4", "int8", "e2m1", "e4m3", "e1m2", "e5m2", "bf16"]


# ---------------------------------------------------------------- granularities

@pytest.mark.parametrize("scale_dtype", ["fp32", "bf16", "e8m0"])
@pytest.mark.parametrize("name", FORMATS[:-1])
def test_per_tensor_matches_the_formula(name, scale_dtype):
    x = torch.cat([randn(500, seed=1), torch.tensor([0.0, -0.0, 3.7, -3.7])])
    got = fake_quantize(x, QuantSpec(name, "tensor", scale_dtype=scale_dtype))
    assert torch.equal(got, per_tensor_by_formula(x, name, scale_dtype))


def test_per_tensor_hand_values():
    # amax 3.5 -> int4 scale 0.5: 1.3 -> 2.6 -> 3 -> 1.5; -0.76 -> -1.52 -> -2 -> -1.0; 0.25 -> 0.5 -> 0 (even)
    x = torch.tensor([3.5, 1.3, -0.76, 0.25, 0.75])
    assert fake_quantize(x, QuantSpec("int4")).tolist() == [3.5, 1.5, -1.0, 0.0, 1.0]
    # E2M1 max 6: amax 3 -> scale 0.5; 1.3 -> 2.6 -> 3 -> 1.5; 0.9 -> 1.8 -> 2 -> 1.0; 2.25 -> 4.5 -> 4 -> 2.0
    x = torch.tensor([3.0, 1.3, 0.9, -0.1, 2.25])
    assert fake_quantize(x, QuantSpec("e2m1")).tolist() == [3.0, 1.5, 1.0, -0.0, 2.0]


@pytest.mark.parametrize("shape,axis", [((6, 9), 0), ((6, 9), 1), ((6, 9), -1), ((3, 5, 4), 1), ((3, 5, 4), 0)])
@pytest.mark.parametrize("name", ["int4", "e4m3", "e2m1"])
def test_per_channel_is_per_tensor_on_each_channel(shape, axis, name):
    x = randn(*shape, seed=2) * torch.linspace(0.01, 10, shape[axis]).reshape([-1 if d == axis % len(shape) else 1 for d in range(len(shape))])
    got = fake_quantize(x, QuantSpec(name, "channel", axis=axis))
    want = torch.stack([per_tensor_by_formula(x.select(axis, i), name) for i in range(shape[axis])], dim=axis % len(shape))
    assert got.shape == x.shape and torch.equal(got, want)


@pytest.mark.parametrize("shape,axis", [((4, 7), -1), ((4, 7), 0), ((2, 3, 5), 1)])
def test_per_token_is_per_tensor_on_each_vector(shape, axis):
    x = randn(*shape, seed=3, scale=5)
    got = fake_quantize(x, QuantSpec("int8", "token", axis=axis))
    moved = x.movedim(axis, -1)
    want = torch.stack([per_tensor_by_formula(v, "int8") for v in moved.reshape(-1, moved.shape[-1])])
    assert torch.equal(got, want.reshape(moved.shape).movedim(-1, axis))


@pytest.mark.parametrize("n", [1, 3, 4, 7, 10, 64])
@pytest.mark.parametrize("shape,axis", [((3, 10), -1), ((10, 3), 0), ((2, 10, 3), 1)])
@pytest.mark.parametrize("scale_dtype", ["fp32", "bf16", "e8m0"])
def test_per_block_with_padding(n, shape, axis, scale_dtype):
    x = randn(*shape, seed=4) * 3
    # A last block of small values only: zero padding must not change its scale.
    x.select(axis, shape[axis] - 1).mul_(0.01)
    got = fake_quantize(x, QuantSpec("int4", "block", axis=axis, block=n, scale_dtype=scale_dtype))
    assert got.shape == x.shape
    want = torch.empty_like(x)
    length = shape[axis]
    for start in range(0, length, n):
        idx = torch.arange(start, min(start + n, length))
        chunk = x.index_select(axis, idx).movedim(axis, -1)
        q = torch.stack([per_tensor_by_formula(v, "int4", scale_dtype) for v in chunk.reshape(-1, chunk.shape[-1])])
        want.index_copy_(axis, idx, q.reshape(chunk.shape).movedim(-1, axis))
    assert torch.equal(got, want)


def test_abfp_n4_int4_by_hand():
    """Blocks of n=4 along rows of length 10 (the last block has 2 values and is padded), INT4, bf16 scales.
    block 1: amax 3.5, scale 3.5/7 = 0.5 (exact in bf16): 3.5, -1.2, .26, .74 -> 7, -2.4, .52, 1.48 -> 7, -2, 1, 1
    block 2: amax 1, scale 1/7 = 0.142857 -> bf16 0.142578125 (146/128 * 2**-3):
             1, .5, -.3, .07 -> 7.0137, 3.5068, -2.1041, 0.4910 -> 7 (saturated), 4, -2, 0
    block 3: amax .3, scale .3/7 = 0.0428571 -> bf16 0.04296875 (176/128 * 2**-5): .3, -.15 -> 6.98, -3.49 -> 7, -3
    """
    row = torch.tensor([3.5, -1.2, 0.26, 0.74, 1.0, 0.5, -0.3, 0.07, 0.3, -0.15])
    x = torch.stack([row, -row, torch.zeros(10)])
    got = fake_quantize(x, QuantSpec("int4", "block", block=4, scale_dtype="bf16"))
    want = torch.tensor([3.5, -1.0, 0.5, 0.5, 0.998046875, 0.5703125, -0.28515625, 0.0, 0.30078125, -0.12890625])
    assert got[0].tolist() == want.tolist()
    assert got[1].tolist() == (-want).tolist()
    assert got[2].tolist() == [0.0] * 10
    # The same along axis 0 on the transpose.
    assert torch.equal(fake_quantize(x.T.contiguous(), QuantSpec("int4", "block", axis=0, block=4, scale_dtype="bf16")), got.T)


def test_two_level_scales_by_hand():
    """INT4 elements in blocks of 2, block scales on E2M1 (max 6) times one fp32 scale per row.
    block amaxes 7, 3.5, 1.4 -> scales 1, .5, .2; row scale 1/6; 6, 3, 1.2 on E2M1 -> 6, 3, 1
    -> scales 1, .5, 1/6. Block 3: 1.4, -.7 -> 8.4, -4.2 -> 7 (saturated), -4 -> 7/6, -4/6.
    """
    x = torch.tensor([[7.0, 2.0, 3.5, 1.0, 1.4, -0.7], [0.0] * 6])
    spec = QuantSpec("int4", "block", block=2, scale_format="e2m1")
    got = fake_quantize(x, spec)
    assert torch.allclose(got[0], torch.tensor([7.0, 2.0, 3.5, 1.0, 7 / 6, -4 / 6]), rtol=0, atol=1e-6)
    assert got[1].tolist() == [0.0] * 6
    # Without the second level, block 3 keeps its own scale .2: 1.4, -.7 -> 7, -3.5 -> 7, -4 (ties to even) -> 1.4, -.8.
    assert torch.allclose(fake_quantize(x, replace(spec, scale_format=None))[0, 4:], torch.tensor([1.4, -0.8]))
    # The STE clips where the rounded-down scale saturates: 1.4 > 7/6.
    xg = x.clone().requires_grad_()
    fake_quantize(xg, spec).sum().backward()
    assert xg.grad[0].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]


def test_two_level_scales_need_symmetric_blocks():
    for bad in (dict(granularity="token"), dict(scale_dtype="e8m0"), dict(symmetric=False), dict(scale_format="bf16")):
        with pytest.raises(ValueError):
            QuantSpec(**{"format": "int4", "granularity": "block", "scale_format": "int8", **bad})


@pytest.mark.parametrize("granularity", ["tensor", "channel", "token", "block"])
@pytest.mark.parametrize("scale_dtype", ["fp32", "bf16", "e8m0"])
@pytest.mark.parametrize("name", ["int4", "e2m1", "e4m3"])
def test_all_zero_blocks_give_zeros(granularity, scale_dtype, name):
    x = randn(4, 16, seed=5)
    x[1] = 0
    x[:, 8:] = 0
    if granularity == "tensor":
        x.zero_()
    got = fake_quantize(x, QuantSpec(name, granularity, block=8, scale_dtype=scale_dtype, axis=-1 if granularity != "channel" else 0))
    assert not got.isnan().any()
    assert torch.equal(got[x == 0], torch.zeros(int((x == 0).sum())))


def test_asymmetric_all_zero_and_tiny_ranges():
    x = torch.zeros(2, 8)
    assert torch.equal(fake_quantize(x, QuantSpec("int4", "token", symmetric=False)), x)
    tiny = torch.full((1, 4), 1e-44)  # amax / max underflows fp32: the scale must not become 0
    for spec in (QuantSpec("e4m3", "token"), QuantSpec("int8", "token", scale_dtype="bf16"), QuantSpec("int8", "token", symmetric=False)):
        assert fake_quantize(tiny, spec).isfinite().all()


def test_nan_in_a_block_stays_in_that_block():
    x = randn(2, 8, seed=6)
    x[0, 3] = math.nan
    got = fake_quantize(x, QuantSpec("int8", "token"))
    assert got[0].isnan().all()  # its amax is NaN
    assert torch.equal(got[1], fake_quantize(x[1:], QuantSpec("int8", "token"))[0])


# ---------------------------------------------------------------- scale dtypes

def test_e8m0_scales_follow_the_ocp_floor_rule():
    fmt = get_format("e4m3")  # emax 8
    for amax, scale in [(10.0, 2.0**-5), (100.0, 2.0**-2), (500.0, 1.0), (448.0, 1.0), (511.9, 1.0), (512.0, 2.0), (2**-140, 2.0**-127)]:
        x = torch.tensor([amax, amax / 3, -amax / 7])
        got = fake_quantize(x, QuantSpec("e4m3", scale_dtype="e8m0"))
        assert torch.equal(got, fmt.quantize(x / scale) * scale), amax
    # floor(log2 500) = 8: 500 / 2**0 saturates at 448.
    assert fake_quantize(torch.tensor([500.0]), QuantSpec("e4m3", scale_dtype="e8m0")).item() == 448
    # INT4: emax_elem = floor(log2 7) = 2, so 7.5 gets scale 1 and saturates at 7.
    assert fake_quantize(torch.tensor([7.5, 3.2]), QuantSpec("int4", scale_dtype="e8m0")).tolist() == [7, 3]


@pytest.mark.parametrize("rule", ["floor", "ceil"])
@pytest.mark.parametrize("name", ["e4m3", "e2m1", "e5m2", "int8"])
def test_e8m0_block_holding_inf_or_nan_is_nan(name, rule):
    """OCP MX: a block whose max is inf or NaN gets a NaN scale (E8M0 0xFF), so all its elements are NaN;
    frexp(inf) has exponent 0, which would give a finite scale."""
    x = randn(4, 8, seed=16)
    x[0, 2], x[1, 5], x[2, 0] = math.inf, -math.inf, math.nan
    spec = QuantSpec(name, "block", block=4, scale_dtype="e8m0", scale_rule=rule)
    got = fake_quantize(x, spec)
    assert got[0, :4].isnan().all() and got[1, 4:].isnan().all() and got[2, :4].isnan().all()
    clean = torch.ones(4, 8, dtype=torch.bool)
    clean[0, :4] = clean[1, 4:] = clean[2, :4] = False
    assert not got[clean].isnan().any()
    assert torch.equal(got[3], fake_quantize(x[3:], spec)[0])


def test_mxint8_tiny_blocks_keep_their_steps_down_to_2_to_the_minus_133():
    """MXINT8 elements are 1.6 fixed point: X = 2**floor(log2 amax) clamped to >= 2**-127, step X * 2**-6.
    Blocks with amax < 2**-121 must not flush to zero (clamping the int-grid step at 2**-127 did)."""
    step = 2.0**-133
    x = torch.tensor([[2.0**-130, 3 * step, -5 * step, 2.0**-135, 127 * step, -64 * step]])
    for spec in (QuantSpec("mxint8"), QuantSpec("int8", "block", block=32, scale_dtype="e8m0")):
        got = fake_quantize(x, spec)
        assert got.tolist() == [[2.0**-130, 3 * step, -5 * step, 0.0, 127 * step, -64 * step]]
    # amax 1.5 * 2**-122: X = 2**-122, step 2**-128; 1.5 * 2**-122 = 96 steps.
    y = torch.tensor([1.5 * 2.0**-122, 2.0**-128, 2.0**-129 * 3])
    assert fake_quantize(y, QuantSpec("mxint8")).tolist() == [1.5 * 2.0**-122, 2.0**-128, 2.0**-127]


@pytest.mark.parametrize("spec", [QuantSpec("e2m1", "block", block=2, scale_format="e4m3"),
                                  QuantSpec("int4", "block", block=2, scale_format="e4m3", scale_dtype="bf16"),
                                  QuantSpec("nvfp4")], ids=["e2m1-two-level", "int4-two-level-bf16", "nvfp4"])
def test_two_level_scale_that_rounds_to_zero_decodes_to_zero(spec):
    """A block scale below half of E4M3's smallest step (2**-10) times the row scale rounds to 0, and
    its block decodes to 0 (not to +-max * 2**-149, the old clamp's smallest scale)."""
    row = torch.zeros(32)
    row[:2] = torch.tensor([6.0, -5.0])
    row[16:18] = torch.tensor([1e-9, -1e-9])  # its scale / the row's ~ 1e-9 * 448 / 6 < 2**-10
    got = fake_quantize(row[None], spec)[0]
    assert got[16:18].tolist() == [0.0, 0.0]
    assert torch.signbit(got[17]) and not torch.signbit(got[16])  # the sign of zero is kept
    assert got[0].item() == pytest.approx(6.0, rel=0.002) and got[1] <= -4  # the large block is kept
    assert not got.isnan().any()


def test_bf16_scales_are_bf16_values():
    x = randn(64, 32, seed=7)
    got = fake_quantize(x, QuantSpec("int8", "block", block=32, scale_dtype="bf16"))
    scale = (x.abs().amax(1, keepdim=True) / 127).bfloat16().float()
    assert torch.equal(got, torch.round(x / scale).clamp(-127, 127) * scale)


def test_e8m0_asymmetric_scale_is_the_power_of_two_covering_the_span():
    x = torch.tensor([[-1.0, 3.0, 0.5, 0.3]])  # span 4 / 15 levels = 0.267 -> 0.5; zero point 2
    got = fake_quantize(x, QuantSpec("int4", "token", symmetric=False, scale_dtype="e8m0"))
    assert got.tolist() == [[-1.0, 3.0, 0.5, 0.5]]


# ---------------------------------------------------------------- static mode

def test_static_per_tensor_clips_at_amax():
    q = Quantizer(QuantSpec("int4"))
    q.set_amax(torch.tensor(3.5))  # scale 0.5
    assert q.spec.mode == "static"
    x = torch.tensor([-10.0, -3.6, -1.3, 0.2, 3.4, 3.5, 50.0])
    assert q(x).tolist() == [-3.5, -3.5, -1.5, 0.0, 3.5, 3.5, 3.5]


def test_static_per_channel_amax():
    q = Quantizer(QuantSpec("int8", "channel", axis=0))
    q.set_amax(torch.tensor([1.27, 12.7]))
    x = torch.tensor([[5.0, -0.5, 0.1], [5.0, -50.0, 0.1]])
    s = torch.tensor([1.27, 12.7]) / 127
    want = torch.round(x / s[:, None]).clamp(-127, 127) * s[:, None]
    assert torch.equal(q(x), want)
    assert q(x)[0, 0] == s[0] * 127 and q(x)[1, 1] == -s[1] * 127


def test_static_needs_amax_and_a_supported_granularity():
    with pytest.raises(RuntimeError, match="no calibrated amax"):
        fake_quantize(torch.ones(3), QuantSpec("int8", mode="static"))
    with pytest.raises(ValueError, match="static calibration supports"):
        fake_quantize(torch.ones(2, 4), QuantSpec("int8", "token", mode="static"), torch.ones(2))


# ---------------------------------------------------------------- asymmetric INT

def test_asymmetric_int4_by_hand():
    # lo -1, hi 2.75: span 3.75 / 15 levels = 0.25, zero point round(1 / 0.25) = 4.
    # 0.375 -> 1.5 -> 2 (even) -> code 6 -> 0.5; 0.625 -> 2.5 -> 2 -> 0.5; -0.875 -> -3.5 -> -4 -> code 0 -> -1.
    x = torch.tensor([[-1.0, 2.75, 0.0, 0.375, 0.625, -0.875, 1.1]])
    got = fake_quantize(x, QuantSpec("int4", "token", symmetric=False))
    assert got.tolist() == [[-1.0, 2.75, 0.0, 0.5, 0.5, -1.0, 1.0]]
    away = fake_quantize(x, QuantSpec("int4", "token", symmetric=False, rounding="away"))
    assert away.tolist() == [[-1.0, 2.75, 0.0, 0.5, 0.75, -1.0, 1.0]]


def test_asymmetric_keeps_zero_exact_and_uses_the_full_grid():
    x = randn(8, 64, seed=8) + 1.5  # mostly positive
    got = fake_quantize(x, QuantSpec("int4", "token", symmetric=False))
    lo = torch.minimum(x.amin(1, keepdim=True), torch.zeros(1))
    hi = x.amax(1, keepdim=True)
    scale = (hi - lo) / 15
    zero = torch.round(-lo / scale)
    codes = torch.round((got / scale) + zero)
    assert codes.min() >= 0 and codes.max() <= 15
    assert torch.equal(got, (codes - zero) * scale)
    assert (got - x).abs().max() <= scale.max() / 2 * 1.0001
    assert fake_quantize(torch.tensor([[0.0, 1.0, 5.0]]), QuantSpec("int8", "token", symmetric=False))[0, 0] == 0


def test_asymmetric_needs_an_int_format():
    with pytest.raises(ValueError, match="asymmetric"):
        QuantSpec("e4m3", symmetric=False)


# ---------------------------------------------------------------- straight-through estimator

@pytest.mark.parametrize("name,amax", [("int4", 3.5), ("e4m3", 896.0), ("int8", 1.27), ("e2m1", 0.3)])
def test_ste_static_zeroes_the_gradient_outside_the_clip_range(name, amax):
    fmt = get_format(name)
    scale = torch.tensor(amax) / fmt.max
    clip = max((scale * fmt.max).item(), amax)  # scale * max, never below amax (fp32 rounding of the scale)
    x = torch.tensor([-5 * amax, -amax, -amax * 1.01, 0.0, 0.5 * amax, amax, amax * 1.0001, 10 * amax, math.inf])
    x.requires_grad_(True)
    g = torch.arange(1.0, 10.0)
    y = fake_quantize(x, QuantSpec(name, mode="static"), torch.tensor(amax))
    y.backward(g)
    assert torch.equal(x.grad, g * (x.detach().abs() <= clip).float())
    assert x.grad.tolist()[:3] == [0, 2, 0] and x.grad[-1] == 0
    assert y[-1].item() == (scale * fmt.max).item()  # inf saturates, not NaN
    assert torch.equal(y.detach(), fake_quantize(x.detach(), QuantSpec(name, mode="static"), torch.tensor(amax)))


@pytest.mark.parametrize("spec", [
    QuantSpec("int4"), QuantSpec("int8", "channel", axis=0), QuantSpec("e2m1", "token"),
    QuantSpec("int4", "block", block=5, scale_dtype="bf16"), QuantSpec("e4m3", "block", block=3, axis=0, scale_dtype="bf16"),
    QuantSpec("int4", "token", symmetric=False), QuantSpec("bf16"),
], ids=lambda s: f"{s.format}-{s.granularity}-{s.scale_dtype}-{'sym' if s.symmetric else 'asym'}")
def test_ste_dynamic_passes_every_gradient(spec):
    # Dynamic ranges come from x itself: every value is inside (bf16 scale rounding included).
    x = randn(12, 10, seed=9, scale=4).requires_grad_(True)
    g = randn(12, 10, seed=10)
    y = fake_quantize(x, spec)
    assert y.requires_grad and y.dtype == x.dtype
    y.backward(g)
    assert torch.equal(x.grad, g)
    assert torch.equal(y.detach(), fake_quantize(x.detach(), spec))


def test_ste_dynamic_e8m0_clips_above_the_power_of_two_range():
    x = torch.tensor([500.0, 400.0, 100.0, -449.0], requires_grad=True)  # scale 2**0: clip at 448
    fake_quantize(x, QuantSpec("e4m3", scale_dtype="e8m0")).backward(torch.ones(4))
    assert x.grad.tolist() == [0, 1, 1, 0]


def test_ste_keeps_bf16_inputs_bf16():
    x = randn(4, 8, seed=11).bfloat16().requires_grad_(True)
    y = fake_quantize(x, QuantSpec("int4", "token"))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, torch.ones_like(x))


# ---------------------------------------------------------------- the module

def test_quantizer_module_switches():
    q = Quantizer(QuantSpec("int4", "token"))
    x = randn(3, 8, seed=12)
    assert torch.equal(q(x), fake_quantize(x, QuantSpec("int4", "token")))
    q.enabled = False
    assert q(x) is x
    q.enabled = True
    version = q.version
    q.configure(format="int8")
    assert q.version == version + 1 and q.spec.format == "int8"
    assert Quantizer(QuantSpec("fp32"))(x) is x and not Quantizer(QuantSpec("fp32")).active
    seen = []
    q.observer = lambda module, t: seen.append(t)
    assert q(x) is x and seen[0] is x
    assert "int8, token, axis=-1, scale=fp32, dynamic" in repr(q)


def test_quant_error_is_the_mse():
    x = randn(256, seed=13)
    spec = QuantSpec("int4")
    assert quant_error(x, spec) == pytest.approx(((fake_quantize(x, spec) - x) ** 2).mean().item(), rel=1e-6)
    assert quant_error(x, QuantSpec("int8")) < quant_error(x, spec)


def test_spec_validation():
    for bad in (dict(granularity="row"), dict(scale_dtype="fp8"), dict(mode="online"), dict(block=0), dict(format="int99")):
        with pytest.raises(ValueError):
            QuantSpec(**{"format": "int8", **bad})


# ---------------------------------------------------------------- large tensors take the chunked paths

@pytest.mark.parametrize("spec", [
    QuantSpec("int4", "block", block=64, scale_dtype="bf16"), QuantSpec("e2m1", "block", block=48, scale_dtype="e8m0"),
    QuantSpec("e4m3", "token"), QuantSpec("int8", "channel", axis=0), QuantSpec("e4m3", "channel", axis=-1, rounding="away"),
    QuantSpec("int4", "block", block=8, scale_dtype="bf16"), QuantSpec("nvfp4"),  # short blocks: amax by halving
], ids=lambda s: f"{s.format}-{s.granularity}-{s.axis}-{s.block}")
def test_large_tensors_match_the_same_rows_done_in_small_pieces(spec, monkeypatch):
    import qsim.formats as formats_module

    monkeypatch.setattr(formats_module, "CHUNK", 1 << 15)  # several chunks on a 1.5 MB tensor
    x = randn(768, 520, seed=14, scale=2)
    x[5, :] = 0
    x[7, 3] = 1e-30
    got = fake_quantize(x, spec)
    if spec.granularity == "channel" and spec.axis == -1:  # one scale per column: do columns in pieces
        want = torch.cat([fake_quantize(x[:, i:i + 40], spec) for i in range(0, 520, 40)], dim=1)
        want_cols = torch.stack([per_tensor_by_formula(x[:, i], spec.format, rounding=spec.rounding) for i in range(0, 520, 97)], dim=1)
        assert torch.equal(got[:, ::97], want_cols)
    else:  # row-wise scales: rows in pieces of 16 (under the small-tensor threshold)
        want = torch.cat([fake_quantize(x[i:i + 16], spec) for i in range(0, 768, 16)])
    assert torch.equal(got, want)


def test_large_per_tensor_matches_the_formula():
    x = randn(400, 400, seed=15, scale=3)
    for name in ("int4", "e4m3", "e2m1"):
        assert torch.equal(fake_quantize(x, QuantSpec(name)), per_tensor_by_formula(x, name))


def test_equal_dynamic_quantizers_on_one_tensor_share_the_result():
    """q/k/v read one tensor through equal quantizers: one quantization, reused only while nothing changed."""
    spec = QuantSpec("int8", "block", block=64, scale_dtype="bf16")
    q, k = Quantizer(spec), Quantizer(spec)
    x = torch.randn(4, 256)
    first = q(x)
    assert k(x) is first and torch.equal(first, fake_quantize(x, spec))
    x.mul_(3.0)  # in place: quantized again, with the new values
    again = k(x)
    assert again is not first and torch.equal(again, fake_quantize(x, spec))
    again.add_(1.0)  # a consumer wrote into the shared result: not reused
    assert torch.equal(q(x), fake_quantize(x, spec))
    other = Quantizer(QuantSpec("int4", "block", block=64, scale_dtype="bf16"))
    assert torch.equal(other(x), fake_quantize(x, other.spec))
    static = Quantizer(spec)
    static.set_amax(torch.tensor(1.0))
    assert torch.equal(static(x), fake_quantize(x, static.spec, static.amax))
    stochastic = QuantSpec("int4", "block", block=64, rounding="stochastic")
    a, b = Quantizer(stochastic), Quantizer(stochastic)
    assert not torch.equal(a(x), b(x))  # independent draws, as without sharing
    xg = x.clone().requires_grad_()
    assert q(xg) is not k(xg)  # autograd: each layer gets its own graph


def test_weights_are_not_shared_across_quantizer_calls():
    """A weight rewritten through .data keeps its version counter: it must be quantized afresh."""
    spec = QuantSpec("int4", "channel", axis=0)
    weight = torch.nn.Parameter(torch.randn(8, 64))
    q = Quantizer(spec)
    with torch.no_grad():
        q(weight)
        weight.data.copy_(torch.randn(8, 64) * 5)
        assert torch.equal(q(weight), fake_quantize(weight.detach(), spec))
