"""Off the CPU and under torch.inference_mode (trust issue, part 3).

There is no GPU here; `meta` tensors stand in for one. They carry no data, and an op that
mixes a meta tensor with a CPU one (a scratch buffer, histogram, candidate grid or scale
made on the CPU) raises, as it would on CUDA. Every format kernel, the quantizer at every
granularity and each method's statistics run on meta inputs here. Paths that need values
(`.item()`-driven searches, k-means, GPTQ's column loop) cannot run on meta: they run on CPU
data with meta as the default device, so a tensor qsim makes without following its input
lands on meta and fails the same way; their results must equal a plain CPU run.
"""
import itertools
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import cfg
from qsim import data
from qsim.formats import CHUNK, NAMED, get_format
from qsim.methods import METHODS, StageContext
from qsim.methods.gptq import WeightGrid, capture_block_inputs, collect_hessians, find_decoder_blocks
from qsim.methods.gptq import gptq_quantize, gptq_supported, reconstruction_errors
from qsim.methods.mse import AbsHistogram, activation_quantizers, choose_amax, collect_histograms
from qsim.methods.mse import mse_amax, mse_scores
from qsim.methods.rptq import ClusterQuantizer, cluster_ranges, collect_channel_ranges, kmeans
from qsim.methods.smoothquant import InputGroup, collect_act_max, fold_scale, smooth_explicitly, smoothing_scales
from qsim.models import load_tiny_opt, tiny_opt_config
from qsim.quantizer import QuantSpec, Quantizer
from qsim.run import build_plan
from qsim.surgery import is_quantized_layer, quantize_model, quantized_layers, restore_model

pytestmark = pytest.mark.usefixtures("one_thread")  # small work: a second thread only adds contention
META = torch.device("meta")

# aten::bincount has no meta kernel (its length depends on the values). qsim always passes a
# minlength above every value it counts, so on meta the result is that long.
_aten = torch.library.Library("aten", "IMPL")
_aten.impl("bincount", lambda x, weights=None, minlength=0: x.new_empty(
    minlength, dtype=torch.int64 if weights is None else weights.dtype), "Meta")


class Bar:
    def start(self, total):
        pass

    def advance(self, n=1, info=""):
        pass


def on_meta(*tensors):
    return all(t.device == META for t in tensors)


# ---------------------------------------------------------------- format kernels

VARIANTS = [
    replace(get_format("int4"), rounding="away"),
    replace(get_format("int4"), rounding="stochastic"),
    replace(get_format("e4m3"), rounding="away"),
    replace(get_format("e2m1"), rounding="stochastic"),
    replace(get_format("e4m3"), subnormals=False),
    replace(get_format("e3m2"), subnormals=False, rounding="away"),
    replace(get_format("e5m2"), saturate=False),
    replace(get_format("e4m3"), saturate=False),
    get_format("e3m0"),  # no mantissa: the reference path
]
KERNEL_FORMATS = list(NAMED.values()) + VARIANTS


@pytest.mark.parametrize("fmt", KERNEL_FORMATS, ids=lambda f: f"{f.name}-{f.rounding}"
                         + ("" if getattr(f, "subnormals", True) else "-nosub") + ("" if getattr(f, "saturate", True) else "-nosat"))
def test_every_format_kernel_stays_on_the_input_device(fmt):
    """Small tensors (fresh scratch), and several chunks of a large one (the per-thread scratch pool),
    with no scale, one scale, a scale per row (fused) and per column (divided first)."""
    for shape, dtype in itertools.product([(7, 5), (3, CHUNK // 2 + 3)], [torch.float32, torch.bfloat16]):
        x = torch.empty(shape, dtype=dtype, device=META)
        q = fmt.quantize(x)
        assert on_meta(q) and q.dtype == dtype and q.shape == x.shape
        if hasattr(fmt, "quantize_reference"):
            assert on_meta(fmt.quantize_reference(x))
        if not hasattr(fmt, "quantize_scaled"):
            continue
        for scale_shape in [(), (shape[0], 1), (1, shape[1])]:
            q = fmt.quantize_scaled(x, torch.empty(scale_shape, device=META))
            assert on_meta(q) and q.dtype == dtype and q.shape == x.shape


# ---------------------------------------------------------------- the quantizer

def quantizer_specs():
    """Every granularity x format kind x scale dtype x symmetry x mode that the spec accepts."""
    specs = []
    for granularity, fmt, scale_dtype, symmetric, mode in itertools.product(
            ["tensor", "channel", "token", "block"], ["int4", "e2m1", "e4m3", "bf16"], ["fp32", "bf16", "e8m0"],
            [True, False], ["dynamic", "static"]):
        if mode == "static" and granularity in ("token", "block"):
            continue
        try:
            specs.append(QuantSpec(fmt, granularity, axis=1, block=64, scale_dtype=scale_dtype,
                                   symmetric=symmetric, mode=mode))
        except ValueError:  # asymmetric minifloats
            continue
    specs += [QuantSpec("e2m1", "block", axis=-1, block=32, scale_format="e4m3"),
              QuantSpec("int4", "block", axis=-1, block=16, scale_dtype="bf16", scale_format="int8"),
              QuantSpec("e2m1", "token", rounding="stochastic"), QuantSpec("int4", "channel", axis=0, rounding="away")]
    return specs


@pytest.mark.parametrize("spec", quantizer_specs(), ids=lambda s: "-".join(
    [s.format, s.granularity, f"axis{s.axis}", s.scale_dtype, "sym" if s.symmetric else "asym", s.mode, s.rounding]
    + ([s.scale_format] if s.scale_format else [])))
def test_quantizer_at_every_granularity_stays_on_the_input_device(spec):
    """Forward (twice: the second reuses the shared result), the STE backward, bf16 inputs, a tensor
    above the size where reductions change path, a block length that needs padding; static ranges
    are set on the CPU and follow the module to the device."""
    quantizer = Quantizer(spec)
    if spec.mode == "static":
        amax = torch.tensor(3.0) if spec.granularity == "tensor" else torch.full((130,), 3.0)
        quantizer.set_amax(amax)
        quantizer.to(META)
        assert on_meta(quantizer.amax) and "amax" not in quantizer.state_dict()
    for shape, dtype in [((2, 130, 5), torch.float32), ((4, 130, 160), torch.float32), ((2, 130, 5), torch.bfloat16)]:
        x = torch.empty(shape, dtype=dtype, device=META)
        with torch.no_grad():
            q, again = quantizer(x), quantizer(x)
        assert on_meta(q, again) and q.dtype == dtype and q.shape == x.shape
        leaf = torch.empty(shape, dtype=dtype, device=META, requires_grad=True)
        quantizer(leaf).sum().backward()
        assert on_meta(leaf.grad) and leaf.grad.dtype == dtype


# ---------------------------------------------------------------- method statistics on a meta model

def meta_tiny_opt(*overrides):
    """The tiny OPT built on meta and quantized per the config."""
    from transformers import OPTForCausalLM

    with torch.device(META):
        model = OPTForCausalLM(tiny_opt_config(False)).eval()
    c = cfg("model=tiny-opt", *overrides)
    quantize_model(model, build_plan(c))
    return model, c


CALIB = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))  # moved to the model's device


def test_quantized_forward_with_attention_and_cached_weights_on_meta():
    model, _ = meta_tiny_opt("format=w4a8", "method=abfp", "abfp.attention=true")
    with torch.no_grad():
        logits = model(CALIB.to(META)).logits
        model(CALIB.to(META))  # the weight cache and shared q/k/v results, reused
    assert on_meta(logits) and logits.shape == (2, 16, 512)
    layers = quantized_layers(model)
    assert all(on_meta(layer._wq) for _, layer in layers)


def test_mse_statistics_on_meta():
    """Histograms fill on the device (no per-call sync); scoring candidates stays there too
    (the search around it needs values: see the value-dependent test below)."""
    model, c = meta_tiny_opt("method=mse", "format=w4a8", "quant.attention=true")
    targets = [(n, q) for n, q in activation_quantizers(model) if q.spec.mode == "static"]
    hists = collect_histograms(model, targets, CALIB, Bar())
    assert len(hists) == 20 and all(on_meta(h.counts, h.amax) for h in hists.values())
    values, weights, cands = (torch.empty(n, device=META) for n in (1000, 1000, 16))
    assert on_meta(mse_scores(values, weights, targets[0][1].spec, cands))


def test_rptq_statistics_and_cluster_quantizer_on_meta():
    model, c = meta_tiny_opt("method=rptq", "format=w4a4")
    names = [n for n, _ in quantized_layers(model)]
    ranges = collect_channel_ranges(model, names, CALIB, Bar())
    assert ranges and all(on_meta(lo, hi) for lo, hi in ranges.values())
    lo, hi = ranges["model.decoder.layers.0.fc1"]
    labels = torch.zeros(lo.numel(), dtype=torch.long, device=META)
    cluster_lo, cluster_hi = cluster_ranges(lo, hi, labels, 4)
    assert on_meta(cluster_lo, cluster_hi)
    for symmetric in (True, False):
        quantizer = ClusterQuantizer(QuantSpec("int4", symmetric=symmetric), labels, cluster_lo, cluster_hi)
        assert on_meta(*quantizer.buffers())
        with torch.no_grad():
            assert on_meta(quantizer(torch.empty(2, 16, lo.numel(), device=META)))


def test_smoothquant_statistics_and_scaling_on_meta():
    model, c = meta_tiny_opt("method=smoothquant", "format=w4a8")
    layers = dict(quantized_layers(model))
    groups = [InputGroup(layers=[n], modules=[m]) for n, m in layers.items()]
    act_max = collect_act_max(model, groups, CALIB, Bar())
    assert all(on_meta(m) for m in act_max)
    fc1 = layers["model.decoder.layers.0.fc1"]
    s = smoothing_scales(act_max[list(layers).index("model.decoder.layers.0.fc1")], fc1.weight.abs().amax(0), 0.5)
    smooth_explicitly(fc1, s)
    fold_scale(InputGroup(layers=["q"], modules=[layers["model.decoder.layers.0.self_attn.q_proj"]]),
               model.model.decoder.layers[0].self_attn_layer_norm, s)
    with torch.no_grad():
        assert on_meta(s, fc1.smooth_divisor, model(CALIB.to(META)).logits)


def test_gptq_block_inputs_and_hessians_on_meta():
    model, c = meta_tiny_opt("method=gptq", "format=w4a8")
    _, blocks = find_decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks[0], CALIB[:1])  # one window: sharing equal arguments compares values
    layers = [(n, m) for n, m in blocks[0].named_modules() if is_quantized_layer(m) and gptq_supported(m)]
    hessians = collect_hessians(blocks[0], layers, inputs)
    assert len(hessians) == 4 and all(on_meta(h) for _, h in hessians)  # q/k/v share one, out, fc1, fc2
    assert on_meta(*inputs.hidden)


# ---------------------------------------------------------------- value-dependent paths

def value_inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=gen)
    x[:5] *= 30
    inputs = torch.randn(256, 128, generator=gen)
    return {
        "x": x,
        "points": torch.stack([-x[:96].abs(), x[96:192].abs() * torch.linspace(1, 8, 96)], 1),
        "w": torch.randn(16, 128, generator=gen),
        "h": 2 * inputs.T @ inputs / 256,
        "big": torch.randn(4, CHUNK // 2, generator=gen),
        "row_scales": torch.full((4, 1), 0.5),
        "mse_cfg": cfg("method=mse").mse,
    }


def value_dependent_results(x, points, w, h, big, row_scales, mse_cfg):
    """amax choices, k-means, GPTQ on one matrix: the paths that need values."""
    hist = AbsHistogram()
    hist.add(x[:10_000])
    hist.add(x[10_000:])
    out = {}
    for calibrator in ("mse", "entropy", "max", "percentile"):
        chosen = SimpleNamespace(calibrator=calibrator, percentile=99.0, candidates=mse_cfg.candidates)
        out[calibrator] = choose_amax(hist, QuantSpec("e2m1", mode="static"), chosen)
    out["mse_values"] = mse_amax(x[:2000], None, QuantSpec("int4", mode="static"), 20)
    labels = kmeans(points, 4, 10, seed=0)
    out["kmeans"] = labels
    out["clusters"] = cluster_ranges(points[:, 0], points[:, 1], labels, 4)
    for name, spec, act_order in [("channel", QuantSpec("int4", "channel", axis=0, symmetric=False), True),
                                  ("block", QuantSpec("e2m1", "block", axis=1, block=32, scale_dtype="bf16"), False),
                                  ("group-act-order", QuantSpec("int4", "block", axis=1, block=32), True)]:
        grid = WeightGrid.of(spec)
        q = gptq_quantize(w, h, grid, block_size=64, act_order=act_order).weight
        out[f"gptq-{name}"] = (q, reconstruction_errors(w, [q, grid.quantize_matrix(w)], h))
    out["kernel"] = get_format("e4m3").quantize_scaled(big, row_scales)
    return out


def test_value_dependent_paths_make_every_tensor_on_the_input_device():
    inputs = value_inputs()
    expected = value_dependent_results(**inputs)
    with torch.device(META):  # anything made without the input's device lands here and breaks the run
        got = value_dependent_results(**inputs)
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    for value in got.values():
        for t in value if isinstance(value, tuple) else (value,):
            assert not isinstance(t, torch.Tensor) or t.device.type == "cpu"


# ---------------------------------------------------------------- torch.inference_mode

def _logits(model, ids):
    return model(ids, use_cache=False).logits


def _same_under_inference_mode(model, ids):
    """Inference-mode logits (first, so the weight cache fills inside it) equal no_grad ones, reused and fresh."""
    with torch.inference_mode():
        first = _logits(model, ids)
    for _, layer in quantized_layers(model):
        assert layer._wq is None or not layer._wq.is_inference()  # usable outside inference_mode
    with torch.no_grad():
        reused = _logits(model, ids)
        for _, layer in quantized_layers(model):
            layer.drop_weight_cache()
        fresh = _logits(model, ids)
    assert torch.equal(first, reused) and torch.equal(first, fresh)
    return first


@pytest.mark.slow
def test_quantized_smollm2_under_inference_mode_equals_no_grad(smollm2):
    """ABFP (dynamic, shared q/k/v and gate/up quantization) and MSE (static, calibrated) W4A8."""
    ids = smollm2.tokenizer("The tower is 324 metres tall, about the same height", return_tensors="pt").input_ids
    for overrides in [("method=abfp",), ("method=mse", "mse.calibrator=max")]:
        c = cfg("format=w4a8", *overrides)
        quantize_model(smollm2.model, build_plan(c))
        method = METHODS[c.method.name]
        if method.needs_calibration:
            method.apply(StageContext(smollm2.model, data.calibration_windows(smollm2.tokenizer, "ptb", "test", 1, 16, 0), c, Bar()))
        logits = _same_under_inference_mode(smollm2.model, ids)
        assert torch.isfinite(logits).all()
        restore_model(smollm2.model)


def test_mse_calibrated_under_inference_mode_equals_no_grad():
    """The whole static path on the tiny OPT: calibration and forward inside inference_mode."""
    amaxes, logits = [], []
    for inference in (False, True):
        lm = load_tiny_opt(post_ln=False, dtype=torch.float32)
        c = cfg("model=tiny-opt", "method=mse", "mse.calibrator=percentile", "format=w4a8", "quant.attention=true")
        quantize_model(lm.model, build_plan(c))
        calib = data.calibration_windows(lm.tokenizer, "ptb", "test", 2, 32, 0)
        with torch.inference_mode(inference):
            METHODS["mse"].apply(StageContext(lm.model, calib, c, Bar()))
        amaxes.append([q.amax for _, q in activation_quantizers(lm.model) if q.amax is not None])
        logits.append(_same_under_inference_mode(lm.model, calib[:1]))
    assert len(amaxes[0]) == 20
    assert all(torch.equal(a, b) for a, b in zip(*amaxes)) and torch.equal(*logits)


def test_weights_made_under_inference_mode_are_never_cached():
    """Parameters made inside inference_mode have no version counter: each forward quantizes them
    afresh, so an in-place edit shows at once."""
    normal = load_tiny_opt(post_ln=False, dtype=torch.float32).model
    with torch.inference_mode():
        made_inside = load_tiny_opt(post_ln=False, dtype=torch.float32).model
    for model in (normal, made_inside):
        quantize_model(model, build_plan(cfg("model=tiny-opt", "method=rtn", "format=w4a8")))
    ids = CALIB[:1]
    with torch.inference_mode():
        assert torch.equal(_logits(made_inside, ids), _logits(normal, ids))
        made_inside.model.decoder.layers[0].fc1.weight.mul_(2)
    with torch.no_grad():
        normal.model.decoder.layers[0].fc1.weight.mul_(2)
    with torch.inference_mode():
        assert torch.equal(_logits(made_inside, ids), _logits(normal, ids))
