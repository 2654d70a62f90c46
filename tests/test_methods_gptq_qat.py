"""GPTQ and QAT stages: real layers, real SmolLM2 and tiny OPTs, real data."""
import copy
import math

import pytest
import torch

from qsim import data
from qsim.config import ConfigError, validate
from qsim.methods.gptq import WeightGrid, _HessianSum, find_decoder_blocks, gptq_quantize, reconstruction_error, run_gptq
from qsim.methods.qat import finetune
from qsim.quantizer import QuantSpec, fake_quantize
from qsim.run import build_plan, preflight
from qsim.surgery import quantize_model, quantized_layers

from conftest import PINNED_REL, cfg, pinned

# ---------------------------------------------------------------- GPTQ on one layer


def _correlated_inputs(n, cols, seed=0):
    """Inputs with correlated features and uneven scales, like transformer activations."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5
    scales = torch.rand(cols, generator=gen) * 3 + 0.1
    return (torch.randn(n, cols, generator=gen) @ mix + 0.05 * torch.randn(n, cols, generator=gen)) * scales


SPECS = {
    "int4-channel-asym": QuantSpec("int4", "channel", axis=0, symmetric=False),
    "int4-channel-sym": QuantSpec("int4", "channel", axis=0),
    "e2m1-channel": QuantSpec("e2m1", "channel", axis=0),
    "int4-group32": QuantSpec("int4", "block", axis=1, block=32),
    "e2m1-abfp64-bf16": QuantSpec("e2m1", "block", axis=1, block=64, scale_dtype="bf16"),
    "int4-tensor": QuantSpec("int4", "tensor"),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_a_linear_layer(name, act_order):
    spec = SPECS[name]
    rows, cols = 64, 192
    X = _correlated_inputs(1024, cols)
    W = torch.randn(rows, cols, generator=torch.Generator().manual_seed(1))
    H = 2 * X.T @ X / X.shape[0]
    rtn = fake_quantize(W, spec)
    q = gptq_quantize(W, H, WeightGrid.of(spec), block_size=64, act_order=act_order).weight
    err = lambda Wq: float(((W - Wq) @ X.T).pow(2).sum())  # ||WX - QX||^2 from the data
    assert err(q) < 0.8 * err(rtn), (err(q), err(rtn))
    assert math.isclose(reconstruction_error(W, q, H), err(q) / float((W @ X.T).pow(2).sum()), rel_tol=1e-3)


@pytest.mark.parametrize("size", [5, 192, 200, 1536])
def test_hessian_sum_of_upper_strips_is_the_full_product(size):
    """Only the upper triangle is accumulated, strip by strip; the result must be the whole 2 X^T X / n."""
    gen = torch.Generator().manual_seed(size)
    windows = [torch.randn(1, 100, size, generator=gen) for _ in range(3)]
    acc = _HessianSum(size, "cpu")
    for x in windows:
        acc.add(x)
    X = torch.cat(windows).reshape(-1, size).double()
    expected = (2 * X.T @ X / X.shape[0]).float()
    H = acc.hessian()
    assert torch.equal(H, H.T)
    assert torch.allclose(H, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_without_error_feedback_is_rtn(name):
    """With a diagonal Hessian no error moves between columns: GPTQ must round
    exactly like the layer's weight quantizer (same grid, same scales)."""
    spec = SPECS[name]
    W = torch.randn(48, 160, generator=torch.Generator().manual_seed(2))
    diag = torch.diag(torch.rand(160, generator=torch.Generator().manual_seed(3)) + 0.5)
    q = gptq_quantize(W, diag, WeightGrid.of(spec), block_size=32).weight
    assert torch.equal(q, fake_quantize(W, spec))


def test_gptq_dead_inputs_and_singular_hessian():
    X = _correlated_inputs(64, 96)  # fewer samples than columns: H is singular
    X[:, 5] = 0.0  # a dead input
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(4))
    spec = SPECS["int4-channel-asym"]
    res = gptq_quantize(W, 2 * X.T @ X / 64, WeightGrid.of(spec))
    assert res.dead_columns == 1 and torch.isfinite(res.weight).all()
    assert torch.all(res.weight[:, 5] == 0)


# ---------------------------------------------------------------- GPTQ on SmolLM2


def _simulated(model, *overrides):
    c = cfg(*overrides)
    quantize_model(model, build_plan(c))
    return c


def _ptb_windows(tokenizer, n, seq_len):
    return data.calibration_windows(tokenizer, "ptb", "test", n, seq_len, 0)


def test_gptq_writes_on_grid_weights_and_keeps_abfp_activations(smollm2):
    """gptq-abfp: GPTQ rounds onto ABFP weight blocks, activations stay ABFP."""
    model = smollm2.model
    c = _simulated(model, "format=w4a8", "method=gptq-abfp", "gptq.max_blocks=1")
    spec = dict(quantized_layers(model))["model.layers.0.mlp.down_proj"].weight_quantizer.spec
    assert (spec.granularity, spec.block, spec.scale_dtype, spec.symmetric) == ("block", 64, "bf16", True)
    before = {n: l.weight.detach().clone() for n, l in quantized_layers(model)}
    facts = run_gptq(model, _ptb_windows(smollm2.tokenizer, 2, 64), c.gptq)
    assert facts["layers"] == 7 and not facts["layers_worse_than_rtn"]
    layers = dict(quantized_layers(model))
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.input_quantizer.active and down.input_quantizer.spec.granularity == "block"
    # On the grid: ABFP re-quantization of a GPTQ block can only change a scale
    # when the block max was rounded down, so most weights are fixed points.
    w = down.weight.detach()
    assert (fake_quantize(w, spec) == w).float().mean() > 0.9
    assert not torch.equal(w, before["model.layers.0.mlp.down_proj"])
    assert not down.weight_quantizer.enabled  # written on the grid: never re-quantized
    assert torch.equal(layers["model.layers.1.mlp.down_proj"].weight, before["model.layers.1.mlp.down_proj"])
    assert layers["model.layers.1.mlp.down_proj"].weight_quantizer.enabled  # beyond max_blocks: RTN


def test_find_decoder_blocks_is_generic(tiny_opt):
    quantize_model(tiny_opt, build_plan(cfg("format=w4a16", "method=gptq", "model=tiny-opt")))
    name, blocks = find_decoder_blocks(tiny_opt)
    assert name == "model.decoder.layers" and len(blocks) == 2


def test_gptq_on_tiny_opt_lowers_block_output_error(tiny_opt):
    """OPT layout (biases, LayerNorm, fc1/fc2): GPTQ's model output is closer to float than RTN's."""
    c = cfg("format=w4a16", "method=gptq", "model=tiny-opt")
    calib = torch.randint(3, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    test = torch.randint(3, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_opt(input_ids=test).logits
    rtn_model = copy.deepcopy(tiny_opt)
    quantize_model(rtn_model, build_plan(c))
    quantize_model(tiny_opt, build_plan(c))
    run_gptq(tiny_opt, calib, c.gptq)
    with torch.no_grad():
        err_rtn = (rtn_model(input_ids=test).logits - ref).pow(2).mean()
        err_gptq = (tiny_opt(input_ids=test).logits - ref).pow(2).mean()
    assert err_gptq < err_rtn


def test_gptq_end_to_end_run(tmp_path):
    from qsim.run import run

    c = cfg("format=w4a16", "method=gptq", "calib.n_samples=4", "calib.seq_len=128",
            "task.max_windows=2", "task.seq_len=256", "progress=false")
    result = run(c, tmp_path)
    facts = result["methods"]["gptq"]
    assert pinned(result["value"], 63.63083579554561), result["value"]
    assert pinned(facts["error_ratio_mean"], 0.11367735230492877), facts["error_ratio_mean"]
    assert facts["layers"] == 210 and facts["seconds"] > 0 and facts["rtn_layers"] == {}
    # GPTQ beats round-to-nearest on every one of SmolLM2's 210 layers, by far on average
    worse = {n: e for n, e in facts["layer_errors"].items() if not e[0] < e[1]}
    assert len(facts["layer_errors"]) == 210 and not worse, worse
    assert facts["error_ratio_mean"] < 0.5
    assert (tmp_path / "result.json").exists()


@pytest.mark.parametrize("override, message", [
    ("gptq.block_size=0", "gptq.block_size"),
    ("gptq.damp=-1", "gptq.damp"),
    ("gptq.group_size=0", "gptq.group_size"),
    ("gptq.granularity=row", "gptq.granularity"),
])
def test_gptq_bad_config(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg("method=gptq", override))


# ---------------------------------------------------------------- QAT


def _byte_windows(n, seq_len, seed=0):
    from qsim.models import ByteTokenizer

    return data.calibration_windows(ByteTokenizer(), "sst2", "train", n, seq_len, seed)


def test_qat_lowers_training_loss_and_reaches_weights(tiny_opt):
    c = _simulated(tiny_opt, "model=tiny-opt", "format=w4a8", "method=abfp-qat",
                   "qat.steps=60", "qat.lr=1e-2", "qat.seq_len=64", "qat.batch_size=2")
    windows = _byte_windows(120, 64)
    fc1 = dict(quantized_layers(tiny_opt))["model.decoder.layers.0.fc1"]
    # The STE gradient reaches the float weights through the fake-quantized ones.
    tiny_opt.train()
    tiny_opt(input_ids=windows[:2], labels=windows[:2]).loss.backward()
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0
    tiny_opt.zero_grad(set_to_none=True)
    tiny_opt.eval()
    with torch.no_grad():
        before = tiny_opt(input_ids=windows[:8], labels=windows[:8]).loss.item()
    w0 = fc1.weight.detach().clone()
    cached = fc1.quantized_weight().clone()
    facts = finetune(tiny_opt, windows, c.qat, seed=0)
    with torch.no_grad():
        after = tiny_opt(input_ids=windows[:8], labels=windows[:8]).loss.item()
    assert after < before - 0.3, (before, after)
    assert facts["loss_last"] < facts["loss_first"]
    assert not tiny_opt.training
    assert not torch.equal(fc1.weight, w0)
    assert not torch.equal(fc1.quantized_weight(), cached)  # the weight cache saw the update
    assert torch.equal(fc1.quantized_weight(), fc1.weight_quantizer(fc1.weight))
    assert tiny_opt.model.decoder.embed_tokens.weight.requires_grad  # flags restored after freezing


def test_qat_is_deterministic(tiny_opt):
    c = cfg("model=tiny-opt", "format=w4a8", "method=abfp-qat", "qat.steps=3", "qat.lr=1e-3", "qat.seq_len=32")
    twin = copy.deepcopy(tiny_opt)
    windows = _byte_windows(3, 32)
    for m in (tiny_opt, twin):
        quantize_model(m, build_plan(c))
        finetune(m, windows, c.qat, seed=0)
    for a, b in zip(tiny_opt.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_qat_zero_steps_leaves_model_unchanged(tiny_opt):
    c = _simulated(tiny_opt, "model=tiny-opt", "format=w4a8", "method=abfp-qat", "qat.steps=0")
    state = {k: v.clone() for k, v in tiny_opt.state_dict().items()}
    from qsim.methods import StageContext
    from qsim.methods.qat import apply

    facts = apply(StageContext(tiny_opt, None, c))
    assert facts["steps"] == 0
    assert all(torch.equal(state[k], v) for k, v in tiny_opt.state_dict().items())


def test_qat_on_smollm2_steps(smollm2):
    """Two real steps on SmolLM2 with ABFP W4A8: finite losses, weights move, embeddings frozen."""
    c = _simulated(smollm2.model, "format=w4a8", "method=abfp-qat", "qat.steps=2", "qat.seq_len=32")
    from qsim.methods import StageContext
    from qsim.methods.qat import apply

    emb = smollm2.model.model.embed_tokens.weight.detach().clone()
    q_proj = smollm2.model.model.layers[0].self_attn.q_proj
    w0 = q_proj.weight.detach().clone()
    facts = apply(StageContext(smollm2.model, None, c, tokenizer=smollm2.tokenizer))
    assert facts["grad_checkpointing"]
    assert pinned(facts["loss_first"], 6.051762580871582) and pinned(facts["loss_last"], 5.568751811981201), facts
    assert torch.equal(smollm2.model.model.embed_tokens.weight, emb)
    assert not torch.equal(q_proj.weight, w0)
    assert facts["frozen_params"] == emb.numel()


@pytest.mark.parametrize("override, message", [
    ("qat.steps=-1", "qat.steps must be >= 0"),
    ("qat.lr=0", "qat.lr must be > 0"),
    ("qat.seq_len=1", "qat.seq_len must be >= 2"),
    ("qat.dataset=imagenet", "unknown qat.dataset"),
])
def test_qat_bad_config_fails_before_loading(override, message, tmp_path):
    from qsim.run import run

    with pytest.raises(ConfigError, match=message) as err:  # raised by preflight, before the load
        run(cfg("method=abfp-qat", override), tmp_path)
    assert "\n" not in str(err.value)


def test_qat_needs_its_training_text(monkeypatch, tmp_path):
    monkeypatch.setenv("QSIM_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="qat training text"):
        preflight(cfg("method=qat"))


def test_qat_without_a_tokenizer_in_its_context_stops(tiny_opt):
    """The stage reads its training text with the context's tokenizer; it never reloads one."""
    from qsim.methods import MethodError, StageContext
    from qsim.methods.qat import apply

    c = _simulated(tiny_opt, "model=tiny-opt", "format=w4a8", "method=abfp-qat", "qat.steps=1")
    with pytest.raises(MethodError, match="the stage context has none"):
        apply(StageContext(tiny_opt, None, c))
