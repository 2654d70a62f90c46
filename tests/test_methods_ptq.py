"""PTQ methods: static MSE calibration, SmoothQuant, RPTQ (issue 3).

Hand-computed small cases for each method's core, function-preservation on
the real SmolLM2 and the tiny pre-LN / post-LN OPTs with real text, bad input
rejected before loading, and short end-to-end runs."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import cfg, pinned
from qsim import data
from qsim.config import ConfigError, validate
from qsim.methods import METHODS, StageContext
from qsim.methods.mse import AbsHistogram, choose_amax, mse_amax
from qsim.methods.rptq import ClusterQuantizer, asymmetric_fake_quantize, kmeans
from qsim.methods.smoothquant import smoothing_scales
from qsim.quantizer import QuantSpec, fake_quantize, quant_error
from qsim.run import build_plan
from qsim.surgery import quantization_disabled, quantize_model, quantized_layers


class Bar:
    def __init__(self):
        self.total, self.done = None, 0

    def start(self, total):
        self.total = total

    def advance(self, n=1, info=""):
        self.done += n


def outlier_tensor(n=10_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen)
    x[:4] *= 25  # a few outliers: clipping them is the trade-off MSE weighs
    return x


def grid_mse(x, fmt_name, amax):
    """MSE of rounding x to the nearest code point of the format, scaled so its
    largest is amax; `amax` may be a 1-D tensor of candidates (one MSE each)."""
    from qsim.formats import get_format

    fmt = get_format(fmt_name)
    codes = fmt.code_points().float()
    scale = torch.as_tensor(amax, dtype=torch.float32).reshape(-1, 1) / fmt.max
    y = (x[None, :] / scale).clamp(float(codes[0]), float(codes[-1]))
    q = codes[torch.bucketize(y, (codes[1:] + codes[:-1]) / 2)] * scale
    errors = (q - x[None, :]).pow(2).mean(1)
    return errors if errors.numel() > 1 else float(errors)


def brute_force_amax(x, fmt_name, steps=2000):
    grid = float(x.abs().max()) * torch.arange(1, steps + 1) / steps
    errors = torch.cat([grid_mse(x, fmt_name, chunk) for chunk in grid.split(100)])
    return float(grid[errors.argmin()]), float(errors.min())


# ---------------------------------------------------------------- MSE calibration

@pytest.mark.parametrize("fmt", ["int4", "e2m1", "int8"])
def test_mse_amax_is_the_brute_force_optimum_on_the_format_grid(fmt):
    x = outlier_tensor()
    spec = QuantSpec(fmt, "tensor", mode="static")
    best, best_err = brute_force_amax(x, fmt)
    exact = mse_amax(x, None, spec, 100)  # on the values themselves
    hist = AbsHistogram()
    hist.add(x[:5_000])
    hist.add(x[5_000:])  # two batches, as over calibration windows
    from_hist = choose_amax(hist, spec, cfg("method=mse").mse)  # what the stage computes
    for amax in (exact, from_hist):
        assert grid_mse(x, fmt, amax) <= best_err * 1.002
        assert amax == pytest.approx(best, rel=0.03)


def test_mse_on_fp_grid_differs_from_int_grid_at_same_width():
    x = outlier_tensor()
    hist = AbsHistogram()
    hist.add(x)
    mse = cfg("method=mse").mse
    int4, e2m1 = QuantSpec("int4", mode="static"), QuantSpec("e2m1", mode="static")
    a_int, a_fp = choose_amax(hist, int4, mse), choose_amax(hist, e2m1, mse)
    assert abs(a_fp - a_int) / a_int > 0.5  # e2m1's grid is denser near 0: it affords a larger range
    # each is the better choice on its own grid: the search really uses the target format
    assert quant_error(x, e2m1, torch.tensor(a_fp)) < quant_error(x, e2m1, torch.tensor(a_int))
    assert quant_error(x, int4, torch.tensor(a_int)) < quant_error(x, int4, torch.tensor(a_fp))


def test_other_calibrators():
    x = outlier_tensor()
    hist = AbsHistogram()
    hist.add(x)
    spec = QuantSpec("int8", mode="static")
    c_max = cfg("method=mse", "mse.calibrator=max").mse
    assert choose_amax(hist, spec, c_max) == pytest.approx(float(x.abs().max()))
    c_pct = cfg("method=mse", "mse.calibrator=percentile", "mse.percentile=99").mse
    q99 = float(torch.quantile(x.abs(), 0.99))
    assert choose_amax(hist, spec, c_pct) == pytest.approx(q99, rel=1 / 64)  # within one bin
    c_ent = cfg("method=mse", "mse.calibrator=entropy").mse
    a_ent = choose_amax(hist, spec, c_ent)
    assert 2.0 < a_ent < float(x.abs().max())  # clips the outliers, keeps the Gaussian bulk
    # pinned: a bin edge of the histogram (64 bins per octave), so the next choice is ~1% away
    assert a_ent == pytest.approx(3.4527199268, rel=1e-6)


def _tiny(post_ln):
    from qsim.models import load_tiny_opt

    return load_tiny_opt(post_ln=post_ln, dtype=torch.float32)


def _calib(tokenizer, n=2, seq_len=64):
    return data.calibration_windows(tokenizer, "ptb", "test", n, seq_len, 0)


def _prepare(lm, *overrides, n=2, seq_len=64):
    c = cfg(*overrides)
    quantize_model(lm.model, build_plan(c))
    return c, _calib(lm.tokenizer, n, seq_len)


def test_mse_stage_calibrates_every_activation_quantizer_on_its_own_format():
    amax = {}
    for fmt in ("w4a4", "e2m1"):
        lm = _tiny(post_ln=False)
        c, calib = _prepare(lm, "model=tiny-opt", "method=mse", f"format={fmt}")
        bar = Bar()
        facts = METHODS["mse"].apply(StageContext(lm.model, calib, c, bar))
        assert bar.total == bar.done == len(calib)
        assert facts["calibrated"] == 12 + 2 * 4 and facts["attention_calibrated"] == 8  # 12 inputs, 2 x q/k/v/p
        fc1 = dict(quantized_layers(lm.model))["model.decoder.layers.0.fc1"].input_quantizer
        assert fc1.spec.mode == "static" and fc1.spec.granularity == "tensor"
        amax[fmt] = float(fc1.amax)
        with torch.no_grad():
            assert torch.isfinite(lm.model(calib[:1]).logits).all()
    assert amax["w4a4"] != pytest.approx(amax["e2m1"], rel=0.05)


@pytest.mark.parametrize("head_quantized", [False, True])
def test_calibration_passes_stop_before_an_unquantized_head(head_quantized):
    """The LM head is skipped by default: calibration passes never run it (it is ~20% of the forward),
    and the observed statistics are unchanged; a quantized head is still run and observed."""
    from qsim.capture import float_passes

    lm = _tiny(post_ln=False)
    skip = "quant.skip=[]" if head_quantized else "quant.skip=[lm_head]"
    c, calib = _prepare(lm, "model=tiny-opt", "method=mse", "format=w4a8", skip)
    calls = []
    lm.model.lm_head.register_forward_hook(lambda _m, _a, _out: calls.append(1))  # fires only if it ran
    seen = []
    for name, layer in quantized_layers(lm.model):
        layer.input_quantizer.observer = lambda _q, x, name=name: seen.append(name)
    float_passes(lm.model, calib, Bar())
    assert len(calls) == (len(calib) if head_quantized else 0)
    assert ("lm_head" in seen) == head_quantized
    assert seen.count("model.decoder.layers.1.fc2") == len(calib)


# ---------------------------------------------------------------- SmoothQuant

def test_smoothing_scale_formula_by_hand():
    act_max = torch.tensor([4.0, 1.0, 9.0])
    w_max = torch.tensor([1.0, 4.0, 1.0])
    s = smoothing_scales(act_max, w_max, 0.5)
    torch.testing.assert_close(s, torch.tensor([2.0, 0.5, 3.0]))
    # alpha = 0.5 leaves activation and weight with the same per-channel max
    torch.testing.assert_close(act_max / s, w_max * s)
    torch.testing.assert_close(smoothing_scales(act_max, w_max, 1.0), act_max)
    torch.testing.assert_close(smoothing_scales(act_max, w_max, 0.0), 1 / w_max)
    # s_j = 16**0.75 / 2**0.25 = 8 / 2**0.25
    assert float(smoothing_scales(torch.tensor([16.0]), torch.tensor([2.0]), 0.75)) == pytest.approx(8 / 2**0.25)


def test_smoothing_moves_an_outlier_channel_into_the_weights():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=gen)
    x[:, 3] *= 60  # one outlier channel, as in LLM activations
    w = torch.randn(32, 16, generator=gen)
    s = smoothing_scales(x.abs().amax(0), w.abs().amax(0), 0.5)
    act, wt = QuantSpec("int8", "tensor"), QuantSpec("int8", "channel", axis=0)
    ref = x @ w.T
    plain = fake_quantize(x, act) @ fake_quantize(w, wt).T
    smooth = fake_quantize(x / s, act) @ fake_quantize(w * s, wt).T
    torch.testing.assert_close((x / s) @ (w * s).T, ref, rtol=1e-4, atol=1e-3)
    assert (smooth - ref).pow(2).mean() < 0.2 * (plain - ref).pow(2).mean()


@pytest.fixture
def wikitext_window():
    """A short real WikiText-2 input for a given tokenizer."""
    rows = data.load_rows("wikitext2", "test")[:60]

    def make(tokenizer, length=64):
        return data.tokenize(tokenizer, data.join_text(rows))[:length].view(1, length)

    return make


def _float_logits(model, ids):
    with torch.no_grad(), quantization_disabled(model):
        return model(ids, use_cache=False).logits


def _rel_change(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _load(which):
    from qsim.models import load_smollm2

    if which == "smollm2":
        return load_smollm2(), ["model=smollm2-135m"]
    post = which == "opt-postln"
    return _tiny(post), [f"model={'tiny-opt-postln' if post else 'tiny-opt'}"]


# folded into the norm / explicit input scale, per model
SQ_EXPECTED = {"opt-preln": (8, 0), "opt-postln": (0, 8), "smollm2": (150, 0)}


@pytest.mark.parametrize("which", ["opt-preln", "opt-postln", "smollm2"])
def test_smoothquant_keeps_the_float_model_and_folds_where_exact(which, wikitext_window):
    lm, model_arg = _load(which)
    c, calib = _prepare(lm, *model_arg, "method=smoothquant", "format=w4a8", n=2, seq_len=64)
    ids = wikitext_window(lm.tokenizer)
    ref = _float_logits(lm.model, ids)
    with torch.no_grad():
        quantized_before = lm.model(ids).logits
    facts = METHODS["smoothquant"].apply(StageContext(lm.model, calib, c, Bar()))
    assert (facts["folded_into_norm"], facts["explicit_scale"]) == SQ_EXPECTED[which]
    assert _rel_change(_float_logits(lm.model, ids), ref) < 1e-4
    with torch.no_grad():
        quantized_after = lm.model(ids).logits  # the weight cache saw the in-place edits
    assert torch.isfinite(quantized_after).all() and not torch.equal(quantized_after, quantized_before)
    if which == "opt-postln":
        # the norms feed the residual too: folding into them would change the model
        q = dict(quantized_layers(lm.model))["model.decoder.layers.1.self_attn.q_proj"]
        assert hasattr(q, "smooth_divisor") and facts["norms_folded"] == []


# ---------------------------------------------------------------- RPTQ

def test_kmeans_recovers_range_groups():
    lo = torch.tensor([-1.0, -10.0, -1.1, -9.0, -0.9, -11.0, -30.0, -1.0])
    hi = torch.tensor([1.0, 10.0, 1.2, 9.5, 0.8, 10.5, 31.0, 1.1])
    labels = kmeans(torch.stack([lo, hi], 1), 3, 25)
    assert labels.tolist() == [0, 1, 0, 1, 0, 1, 2, 0]  # ordered by span: small, medium, the outlier
    assert kmeans(torch.stack([lo, hi], 1), 1, 25).tolist() == [0] * 8


def test_asymmetric_quantization_by_hand():
    # range [-1, 3], 2 bits: scale 4/3, zero point round(0.75) = 1, grid {-4/3, 0, 4/3, 8/3}
    x = torch.tensor([-1.0, 0.5, 1.0, 3.0, 5.0])
    q = asymmetric_fake_quantize(x, torch.tensor(-1.0), torch.tensor(3.0), 2)
    torch.testing.assert_close(q, torch.tensor([-4 / 3, 0.0, 4 / 3, 8 / 3, 8 / 3]))


def test_cluster_quantizer_equals_reordered_contiguous_clusters():
    gen = torch.Generator().manual_seed(0)
    span = torch.tensor([1.0, 8.0, 1.0, 8.0, 1.0, 40.0, 8.0, 1.0])
    x = torch.randn(5, 7, 8, generator=gen) * span
    w = torch.randn(6, 8, generator=gen)
    flat = x.reshape(-1, 8)
    ch_min, ch_max = flat.amin(0), flat.amax(0)
    labels = kmeans(torch.stack([ch_min, ch_max], 1), 3, 25)
    lo = torch.stack([ch_min[labels == c].min() for c in range(3)])
    hi = torch.stack([ch_max[labels == c].max() for c in range(3)])
    cq = ClusterQuantizer(QuantSpec("int4", symmetric=False), labels, lo, hi)
    # RPTQ as deployed: permute the channels so each cluster is contiguous, quantize
    # each block with its own range, multiply by the weight with permuted columns
    order = cq.channel_order
    xp, wp = x[..., order], w[:, order]
    blocks, start = [], 0
    for c, size in enumerate(torch.bincount(labels, minlength=3).tolist()):
        levels = 15
        l, h = min(float(lo[c]), 0.0), max(float(hi[c]), 0.0)
        scale = (h - l) / levels
        zero = round(-l / scale)
        codes = torch.clamp(torch.round(xp[..., start:start + size] / scale) + zero, 0, levels)
        blocks.append((codes - zero) * scale)
        start += size
    expected = torch.cat(blocks, -1) @ wp.T
    torch.testing.assert_close(F.linear(cq(x), w), expected, rtol=1e-5, atol=1e-5)
    # one cluster is per-tensor static min/max
    one = ClusterQuantizer(QuantSpec("int4", symmetric=False), torch.zeros(8, dtype=torch.long),
                           flat.min().reshape(1), flat.max().reshape(1))
    torch.testing.assert_close(one(x), asymmetric_fake_quantize(x, flat.min(), flat.max(), 4))


@pytest.mark.parametrize("which", ["opt-preln", "opt-postln", "smollm2"])
def test_rptq_keeps_the_float_model(which, wikitext_window):
    lm, model_arg = _load(which)
    c, calib = _prepare(lm, *model_arg, "method=rptq", "format=w4a4", "rptq.norm_out_8bit=true", n=2, seq_len=64)
    ids = wikitext_window(lm.tokenizer)
    ref = _float_logits(lm.model, ids)
    facts = METHODS["rptq"].apply(StageContext(lm.model, calib, c, Bar()))
    layers = dict(quantized_layers(lm.model))
    assert facts["layers"] == len(layers) and facts["dynamic_fallback"] == {}
    assert _rel_change(_float_logits(lm.model, ids), ref) < 1e-4
    with torch.no_grad():
        out = lm.model(ids).logits
    assert torch.isfinite(out).all() and _rel_change(out, ref) > 1e-3
    formats = {n: m.input_quantizer.spec.format for n, m in layers.items()}
    assert all(isinstance(m.input_quantizer, ClusterQuantizer) for m in layers.values())
    if which == "opt-preln":  # LayerNorm outputs (q/k/v, fc1) at 8 bits, the rest at 4
        assert facts["norm_out_8bit_layers"] == 8
        assert formats["model.decoder.layers.0.self_attn.q_proj"] == "int8"
        assert formats["model.decoder.layers.0.fc1"] == "int8"
        assert formats["model.decoder.layers.0.fc2"] == "int4"
    if which == "smollm2":
        assert facts["norm_out_8bit_layers"] == 30 * 5  # q/k/v, gate/up


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("overrides, message", [
    (["method=smoothquant", "smoothquant.alpha=1.5"], "smoothquant.alpha"),
    (["method=abfp-sq", "smoothquant.alpha=-0.1"], "smoothquant.alpha"),
    (["method=smoothquant", "smoothquant.scope=some"], "smoothquant.scope"),
    (["method=rptq", "rptq.clusters=0"], "rptq.clusters"),
    (["method=mse", "mse.calibrator=kl"], "mse.calibrator"),
    (["method=mse", "mse.percentile=0"], "mse.percentile"),
])
def test_bad_values_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate(cfg(*overrides))
    assert "\n" not in str(err.value)


def _qsim(args, env_overrides):
    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, "-m", "qsim.cli", "run", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_rejects_bad_input_before_loading(tmp_path):
    # evaluation text present, calibration text (PTB) missing
    no_calib = tmp_path / "data"
    no_calib.mkdir()
    (no_calib / "wikitext-2-raw-v1").symlink_to(data.data_dir() / "wikitext-2-raw-v1")
    for args, env, needle in [
        (["method=mse", "format=w4a8"], {"QSIM_DATA_DIR": str(no_calib)}, "method 'mse' needs calibration data"),
        (["method=rptq", "rptq.clusters=0"], {}, "rptq.clusters must be >= 1"),
    ]:
        proc = _qsim(args + ["progress=false"], env)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and needle in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---------------------------------------------------------------- end to end

E2E = ["model=smollm2-135m", "format=w4a8", "task.max_windows=2", "task.seq_len=128",
       "calib.n_samples=4", "calib.seq_len=64", "progress=false"]


E2E_PPL = {"mse": 149.87205525089198, "abfp-sq": 61.126768626827165, "rptq": 120.7123465206914}


@pytest.mark.parametrize("method", ["mse", "abfp-sq", "rptq"])
def test_end_to_end_smollm2(method, tmp_path):
    from qsim.run import run

    result = run(cfg(*E2E, f"method={method}"), tmp_path)
    assert pinned(result["value"], E2E_PPL[method]), result["value"]
    steps = result["methods"]
    assert set(steps) == set(result["steps"])
    assert all(f["seconds"] >= 0 for f in steps.values())
    if method == "mse":
        assert result["quantized"]["act"]["mode"] == "static" and result["quantized"]["attention_sites"] == 30
    if method == "abfp-sq":
        assert steps["smoothquant"]["folded_into_norm"] == 150
