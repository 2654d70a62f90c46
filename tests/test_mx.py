"""Scaled formats (OCP MX v1.0, NVFP4) against oracles written here from their specs.

MX (OCP Microscaling Formats v1.0, section 6.3): a block is 32 values along an
axis; its shared scale is X = 2**(floor(log2 max|V_i|) - emax_elem), an E8M0
value clamped to 2**-127 .. 2**127 and NaN when the block holds inf or NaN;
each P_i is V_i / X rounded to nearest (ties to even) on the element grid,
normal values clamped to the element max. MXINT8 elements are 8-bit two's
complement with an implicit 2**-6 (1.6 fixed point), symmetric +-127/64. The
"ceil" rule takes the smallest X with max|V_i| / X <= the element max.
The oracle computes in float64 with Python's math module; element grids are
decoded here from the OCP bit layouts.

NVFP4 (ModelOpt's formulas, in fp32): s = amax / (6 * 448),
block scale = e4m3(amax_b / (6 * s)) (torch's float8_e4m3fn cast, saturating
at 448), elements e2m1(x / (block scale * s)) * (block scale * s).
"""
import math
from bisect import bisect_right

import pytest
import torch

from conftest import pinned
from qsim.config import ConfigError, compose_config
from qsim.quantizer import SCALED_FORMATS, QuantSpec, Quantizer, fake_quantize

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- element grids from the OCP layouts

def float_grid(exp_bits: int, man_bits: int, bias: int, reserved: str) -> list[float]:
    """Non-negative finite values in code order. reserved: "none", "top_code" (E4M3: S.1111.111 is
    NaN) or "top_exponent" (E5M2: inf/NaN)."""
    values = []
    for code in range(2 ** (exp_bits + man_bits)):
        e, m = divmod(code, 2**man_bits)
        if reserved == "top_exponent" and e == 2**exp_bits - 1:
            continue
        if reserved == "top_code" and code == 2 ** (exp_bits + man_bits) - 1:
            continue
        if e == 0:
            values.append(math.ldexp(m, 1 - bias - man_bits))
        else:
            values.append(math.ldexp(2**man_bits + m, e - bias - man_bits))
    return values


# name -> (non-negative grid in code order, emax_elem from the spec)
ELEMENTS = {
    "mxfp8_e4m3": (float_grid(4, 3, 7, "top_code"), 8),
    "mxfp8_e5m2": (float_grid(5, 2, 15, "top_exponent"), 15),
    "mxfp6_e3m2": (float_grid(3, 2, 3, "none"), 4),
    "mxfp6_e2m3": (float_grid(2, 3, 1, "none"), 2),
    "mxfp4": (float_grid(2, 1, 1, "none"), 2),
    "mxint8": ([k / 64 for k in range(128)], 0),
}
E2M1 = ELEMENTS["mxfp4"][0]


def test_grids_are_the_ocp_ones():
    assert {name: grid[-1] for name, (grid, _) in ELEMENTS.items()} == {
        "mxfp8_e4m3": 448, "mxfp8_e5m2": 57344, "mxfp6_e3m2": 28, "mxfp6_e2m3": 7.5, "mxfp4": 6, "mxint8": 127 / 64}
    assert E2M1 == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert set(ELEMENTS) | {"nvfp4"} == set(SCALED_FORMATS)
    assert {n: f.bits_per_element for n, f in SCALED_FORMATS.items()} == {
        "mxfp8_e4m3": 8.25, "mxfp8_e5m2": 8.25, "mxfp6_e3m2": 6.25, "mxfp6_e2m3": 6.25, "mxfp4": 4.25,
        "mxint8": 8.25, "nvfp4": 4.5}


def round_to_grid(a: float, grid: list[float]) -> float:
    """Nearest grid value to a >= 0, ties to the even code, saturating at the top."""
    if a >= grid[-1]:
        return grid[-1]
    i = bisect_right(grid, a) - 1
    mid = (grid[i] + grid[i + 1]) / 2
    if a != mid:
        return grid[i] if a < mid else grid[i + 1]
    return grid[i] if i % 2 == 0 else grid[i + 1]


# ---------------------------------------------------------------- the MX oracle

def mx_block(values: list[float], name: str, rule: str) -> list[float]:
    grid, emax_elem = ELEMENTS[name]
    if any(not math.isfinite(v) for v in values):
        return [math.nan] * len(values)
    amax = max(abs(v) for v in values)
    if amax == 0:
        return [math.copysign(0.0, v) for v in values]
    if rule == "floor":
        exponent = math.floor(math.log2(amax)) - emax_elem
    else:
        exponent = math.ceil(math.log2(amax / grid[-1]))
    x = 2.0 ** min(max(exponent, -127), 127)
    return [math.copysign(round_to_grid(abs(v) / x, grid) * x, v) for v in values]


def by_blocks(x: torch.Tensor, axis: int, block: int, per_block) -> torch.Tensor:
    """per_block applied to every block of `block` values along `axis` (the last one may be short)."""
    moved = x.movedim(axis, -1).contiguous()
    rows = moved.reshape(-1, moved.shape[-1]).double().tolist()
    out = [sum((per_block(row[i:i + block]) for i in range(0, len(row), block)), []) for row in rows]
    return torch.tensor(out, dtype=torch.float64).float().reshape(moved.shape).movedim(-1, axis)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor):
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    bad = (~same).nonzero()[:5].tolist()
    assert bool(same.all()), f"{int((~same).sum())} mismatches at {bad}: got {[got[tuple(i)].item() for i in bad]}, " \
                             f"want {[want[tuple(i)].item() for i in bad]}"


def below(power: float) -> float:
    """The fp32 value one ulp below a power of two."""
    return torch.nextafter(torch.tensor(power), torch.tensor(0.0)).item()


def probe_blocks(name: str, seed: int) -> torch.Tensor:
    """[16, 32]: random blocks over many binades, then the edge cases of the spec."""
    g = torch.Generator().manual_seed(seed)
    grid, emax_elem = ELEMENTS[name]
    rows = torch.randn(16, 32, generator=g) * torch.exp2(torch.randint(-30, 30, (16, 1), generator=g).float())
    rows[0] = 0.0
    rows[0, ::3] = -0.0  # all zero: zeros with their signs
    rows[1, 7] = math.inf  # inf, -inf, NaN: the whole block is NaN
    rows[2, 30] = -math.inf
    rows[3, 0] = math.nan
    rows[4, 5] = below(2.0**3)  # amax one ulp below a power of two: floor(log2) is one less
    rows[4].clamp_(-below(2.0**3), below(2.0**3))
    rows[5] = rows[5].clamp(-1, 1) * 2.0**-20
    rows[5, 0] = -below(2.0**-19)
    rows[6] = torch.linspace(-1, 1, 32) * 2.0**-135  # amax < 2**-127: X clamps at 2**-127
    rows[7] = torch.linspace(-1, 1, 32) * 3e38  # near fp32's max: X near 2**127
    rows[8] = torch.full((32,), 1e-45)  # fp32 subnormals
    # Ties: amax 2**emax_elem * 2**4 makes X = 2**4; the other values sit on grid midpoints.
    mids = [(grid[i] + grid[i + 1]) / 2 * 16 for i in range(len(grid) - 1)]
    picks = torch.tensor([mids[i % len(mids)] for i in range(31)]) * torch.tensor([(-1) ** i for i in range(31)])
    rows[9] = torch.cat([torch.tensor([2.0**emax_elem * 16]), picks])
    rows[10, 3] = 2.0**60  # one huge outlier: the rest flush or saturate per the element grid
    rows[11] = rows[11].abs().clamp(max=below(1.0))  # one ulp below 1 everywhere
    return rows


# ---------------------------------------------------------------- MX: every format, rule, block shape

SHAPES = [((16, 32), -1), ((4, 70), -1), ((70, 4), 0), ((2, 33, 3), 1), ((3, 31), -1), ((1, 1), -1), ((2, 96), 1)]


@pytest.mark.parametrize("rule", ["floor", "ceil"])
@pytest.mark.parametrize("name", list(ELEMENTS))
def test_mx_matches_the_ocp_oracle(name, rule):
    spec = QuantSpec(name, scale_rule=rule)
    probes = probe_blocks(name, seed=1)
    assert_same_bits(fake_quantize(probes, spec), by_blocks(probes, -1, 32, lambda b: mx_block(b, name, rule)))
    g = torch.Generator().manual_seed(2)
    for shape, axis in SHAPES:  # padding: a short last block keeps its own scale
        x = torch.randn(*shape, generator=g) * 4
        x.select(axis, shape[axis] - 1).mul_(1e-3)
        got = fake_quantize(x, QuantSpec(name, axis=axis, scale_rule=rule))
        assert_same_bits(got, by_blocks(x, axis, 32, lambda b: mx_block(b, name, rule)))


def test_float32_log2_misplaces_amax_one_ulp_below_a_power_of_two():
    """Why the exponent comes from the bits: fp32 log2 rounds these up to the power."""
    amax = torch.tensor([below(2.0**k) for k in (3, 9, -20, 100)])
    exact = torch.frexp(amax).exponent - 1
    assert torch.equal(exact, torch.tensor([2, 8, -21, 99], dtype=torch.int32))
    assert (torch.log2(amax).floor().int() != exact).all()
    x = torch.tensor([below(8.0), 1.0])  # MXFP4: X = 2**(2 - 2) = 1, so 8 - ulp saturates at 6
    assert fake_quantize(x, QuantSpec("mxfp4")).tolist() == [6.0, 1.0]


def test_mx_on_a_large_tensor_takes_the_chunked_kernel_and_stays_exact():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(48, 1600, generator=g) * torch.exp2(torch.randint(-8, 8, (48, 1), generator=g).float())
    assert x.numel() > 1 << 16  # above formats._SMALL: the pooled, chunked path
    for name in ("mxfp4", "mxint8"):
        assert_same_bits(fake_quantize(x, QuantSpec(name)), by_blocks(x, -1, 32, lambda b: mx_block(b, name, "floor")))


def test_mx_specs_carry_their_own_scaling():
    spec = QuantSpec("mxfp6_e2m3", "channel", axis=1, block=64, scale_dtype="bf16", mode="static", symmetric=True)
    assert (spec.granularity, spec.block, spec.scale_dtype, spec.mode, spec.element, spec.axis) == (
        "block", 32, "e8m0", "dynamic", "e2m3", 1)
    assert QuantSpec("mxint8").fmt.name == "int8" and QuantSpec("nvfp4").fmt.name == "e2m1"
    nv = QuantSpec("nvfp4", "token", block=128, scale_dtype="fp32", mode="static")
    assert (nv.granularity, nv.block, nv.scale_dtype, nv.mode) == ("block", 16, "e4m3", "static")
    with pytest.raises(ValueError, match="scale rule"):
        QuantSpec("mxfp4", scale_rule="nearest")
    with pytest.raises(ValueError, match="e4m3 block scales"):
        QuantSpec("int4", "token", scale_dtype="e4m3")


def test_ceil_rule_never_saturates_and_floor_may():
    x = torch.tensor([7.0, 1.0, -3.0])  # MXFP4: floor X = 2**(2 - 2) = 1, so 7 -> 6; ceil X = 2
    assert fake_quantize(x, QuantSpec("mxfp4")).tolist() == [6.0, 1.0, -3.0]
    assert fake_quantize(x, QuantSpec("mxfp4", scale_rule="ceil")).tolist() == [8.0, 1.0, -3.0]
    assert fake_quantize(torch.tensor([6.0, 1.0]), QuantSpec("mxfp4", scale_rule="ceil")).tolist() == [6.0, 1.0]


# ---------------------------------------------------------------- NVFP4 against ModelOpt's formulas

def f32(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32)


def amax_of(values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else max(abs(v) for v in values)


def nvfp4_block(values: list[float], s: torch.Tensor) -> list[float]:
    amax = amax_of(values)
    if not math.isfinite(amax) or not torch.isfinite(s):
        return [math.nan] * len(values)
    block_scale = (f32(amax) / (f32(6.0) * s)).clamp(max=448).to(torch.float8_e4m3fn).float()
    scale = block_scale * s
    if scale == 0:
        return [math.copysign(0.0, v) for v in values]
    return [math.copysign((f32(round_to_grid(abs((f32(v) / scale).item()), E2M1)) * scale).item(), v) for v in values]


def global_scale(amax: float) -> torch.Tensor:
    s = f32(amax) / f32(6.0 * 448.0)
    return f32(1.0) if s == 0 else s


def nvfp4_oracle(x: torch.Tensor, per: str, amax: float | None = None) -> torch.Tensor:
    """Blocks of 16 along the last axis; the global amax per tensor, per row, or given (static)."""
    rows = x.reshape(-1, x.shape[-1]).double().tolist()
    tensor_amax = x.abs().max().item()
    out = []
    for row in rows:
        a = amax if amax is not None else (tensor_amax if per == "tensor" else amax_of(row))
        s = global_scale(a) if math.isfinite(a) else f32(math.nan)
        out.append(sum((nvfp4_block(row[i:i + 16], s) for i in range(0, len(row), 16)), []))
    return torch.tensor(out, dtype=torch.float64).float().reshape(x.shape)


def nvfp4_probes(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 56, generator=g) * torch.exp2(torch.randint(-6, 6, (8, 4), generator=g).float()).repeat_interleave(14, 1)
    x[1] = 0.0
    x[2, :16] = 0.0  # a zero block next to others
    x[3, 20] = 500.0  # an outlier: the other blocks' scales sit low on the E4M3 grid
    x[4, :16] *= 1e-9  # a block whose scale rounds to 0 (per row) on E4M3
    return x


@pytest.mark.parametrize("per", ["tensor", "token"])
def test_nvfp4_matches_modelopt_formulas(per):
    x = nvfp4_probes(seed=4)
    spec = QuantSpec("nvfp4", global_scale=per)
    assert_same_bits(fake_quantize(x, spec), nvfp4_oracle(x, per))
    x3 = x.reshape(2, 4, 56)  # leading dims: tokens of a batch
    assert_same_bits(fake_quantize(x3, spec), nvfp4_oracle(x3, per))


def test_nvfp4_static_global_amax_from_calibration():
    x = nvfp4_probes(seed=5)
    q = Quantizer(QuantSpec("nvfp4"))
    q.set_amax(torch.tensor(3.0))  # below the data's max: those blocks' E4M3 scales saturate at 448
    assert q.spec.mode == "static" and x.abs().max() > 3.0
    got = q(x)
    assert_same_bits(got, nvfp4_oracle(x, "tensor", amax=3.0))
    assert got.abs().max().item() == pytest.approx(3.0, rel=1e-6)  # clipped at 6 * 448 * s = amax
    with pytest.raises(RuntimeError, match="no calibrated amax"):
        fake_quantize(x, QuantSpec("nvfp4", mode="static"))


def test_nvfp4_non_finite_values_make_their_scope_nan():
    x = nvfp4_probes(seed=6)
    x[5, 3] = math.inf
    x[6, 40] = math.nan
    got = fake_quantize(x, QuantSpec("nvfp4", global_scale="token"))
    assert got[5].isnan().all() and got[6].isnan().all()
    assert not got[[0, 1, 2, 3, 4, 7]].isnan().any()
    assert_same_bits(got, nvfp4_oracle(x, "token"))


# ---------------------------------------------------------------- in runs: plans, methods, causality

def plan_for(*overrides):
    from qsim.run import build_plan

    return build_plan(compose_config(["model=tiny-opt", *overrides]))


def test_presets_and_mixed_operands_build_their_specs():
    plan = plan_for("format=mxfp4")
    w, a = plan.default.weight, plan.default.act
    assert (w.format, w.element, w.block, w.scale_dtype, w.scale_rule) == ("mxfp4", "e2m1", 32, "e8m0", "floor")
    assert (a.format, a.granularity, a.block, a.axis) == ("mxfp4", "block", 32, -1)
    plan = plan_for("format.weight=mxfp4", "format.act=mxfp8_e4m3", "quant.scale_rule=ceil")
    assert (plan.default.weight.element, plan.default.act.element, plan.default.act.scale_rule) == ("e2m1", "e4m3", "ceil")
    plan = plan_for("format=nvfp4")
    assert (plan.default.weight.global_scale, plan.default.act.global_scale) == ("tensor", "token")
    # ABFP rewrites plain operands to its blocks; a scaled operand keeps its own.
    plan = plan_for("format.weight=int4", "format.act=mxfp4", "method=abfp")
    assert (plan.default.weight.block, plan.default.weight.scale_dtype) == (64, "bf16")
    assert (plan.default.act.block, plan.default.act.scale_dtype) == (32, "e8m0")
    assert (plan.attention.format, plan.attention.block) == ("mxfp4", 32)
    # MSE calibrates NVFP4's global amax (static); MX scales stay dynamic.
    plan = plan_for("format.weight=mxint8", "format.act=nvfp4", "method=mse", "mse.calibrator=max")
    assert (plan.default.weight.format, plan.default.weight.mode) == ("mxint8", "dynamic")
    assert (plan.default.act.mode, plan.default.act.granularity, plan.default.act.block) == ("static", "block", 16)
    with pytest.raises(ValueError, match="MX block scales, which stay dynamic"):  # so MSE has nothing to calibrate
        plan_for("format=mxfp4", "method=mse")


@pytest.mark.parametrize("overrides,message", [
    (["format=nvfp4", "method=mse"], "use mse.calibrator=max"),
    (["format.act=int8", "+quant.overrides={*.fc1:{act:nvfp4}}", "method=mse", "mse.calibrator=entropy"], "global amax of nvfp4"),
    (["format=nvfp4", "method=gptq"], "nvfp4"),
    (["format=mxfp4", "method=rptq"], "mxfp4 carries its own block scales"),
    (["quant.scale_rule=round"], "unknown quant.scale_rule"),
    (["format.weight=mxfp5"], "mxfp4, mxint8, nvfp4"),
    (["format=w4a8", "quant.act.scale_dtype=e4m3"], "need symmetric block scaling"),
])
def test_unsupported_combinations_are_config_errors(overrides, message):
    from qsim.run import preflight

    with pytest.raises(ConfigError, match=message):
        preflight(compose_config(["model=tiny-opt", *overrides]))


@torch.no_grad()
@pytest.mark.parametrize("preset", ["mxfp4", "nvfp4", "mxint8"])
def test_scaled_operands_are_causal_and_blocked_along_the_reduction_axis(preset, tiny_opt):
    """Weights, activations and all four attention operands in the format: changing the last tokens
    leaves every earlier position's logits unchanged; V is blocked along head_dim."""
    from qsim.surgery import attention_quantizers, quantize_model

    plan = plan_for(f"format={preset}", "quant.attention=true")
    quantize_model(tiny_opt, plan)
    (_, aq), *_ = attention_quantizers(tiny_opt)
    assert [getattr(aq, op).spec.axis for op in "qkvp"] == [-1, -1, -1, -1]
    fc2 = tiny_opt.model.decoder.layers[0].fc2
    assert fc2.weight_quantizer.spec.axis == 1 and fc2.weight_quantizer.spec.format == preset
    x = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(7))
    changed = x.clone()
    changed[:, 25:] = torch.randint(3, 500, (2, 15), generator=torch.Generator().manual_seed(8))
    a, b = tiny_opt(x).logits, tiny_opt(changed).logits
    assert torch.equal(a[:, :25], b[:, :25]) and not torch.equal(a[:, 25:], b[:, 25:])
    assert sum(aq.calls for _, aq in attention_quantizers(tiny_opt)) == 4


# ---------------------------------------------------------------- end to end on SmolLM2

@pytest.mark.slow
@pytest.mark.parametrize("overrides,ppl", [
    (["format=mxfp4"], 98.25368623507443),  # FP32: 26.73 on this window
    (["format=nvfp4"], 33.30407073047907),
    (["format.weight=mxfp4", "format.act=mxfp8_e4m3"], 45.261802959827726),
], ids=["mxfp4", "nvfp4", "w-mxfp4-a-mxfp8"])
def test_smollm2_runs_record_their_scaled_formats(overrides, ppl, tmp_path):
    from qsim.run import run

    result = run(compose_config([*overrides, "task.max_windows=1", "task.seq_len=128", "progress=false"]), tmp_path)
    w, a = result["quantized"]["weight"], result["quantized"]["act"]
    assert w["format"] == result["formats"]["weight"] and a["format"] == result["formats"]["act"]
    for spec in (w, a):
        scaled = SCALED_FORMATS[spec["format"]]
        assert (spec["element"], spec["block"], spec["scale_dtype"], spec["granularity"]) == (
            scaled.element, scaled.block, scaled.scale_dtype, "block")
        assert spec["scale_rule"] == ("floor" if scaled.scale_dtype == "e8m0" else None)
        assert spec["global_scale"] == ({"e4m3": "tensor" if spec is w else "token"}.get(scaled.scale_dtype))
    assert pinned(result["value"], ppl), result["value"]
