"""Model surgery on the real SmolLM2 and tiny random OPTs (pre-LN and post-LN)."""
import pytest
import torch
from torch import nn

from qsim.quantizer import QuantSpec, fake_quantize
from qsim.surgery import (
    LayerQuant,
    SurgeryError,
    SurgeryPlan,
    attention_quantizers,
    quantization_disabled,
    quantize_model,
    quantized_layers,
    restore_model,
)

W4A8 = LayerQuant(weight=QuantSpec("int4", "channel"), act=QuantSpec("int8", "token"))
SKIP = ("lm_head", "*embed*", "*project_in", "*project_out")


def _window(wikitext_ids, length=128):
    return wikitext_ids[:length].view(1, length)


@torch.no_grad()
def test_attention_quantization_changes_output_and_counts_sites(smollm2, wikitext_ids):
    model = smollm2.model
    x = _window(wikitext_ids)
    linear_only = SurgeryPlan(default=W4A8, skip=SKIP)
    quantize_model(model, linear_only)
    out_linear = model(x).logits
    restore_model(model)

    with_attention = SurgeryPlan(default=W4A8, attention=QuantSpec("int4", "token"), skip=SKIP)
    report = quantize_model(model, with_attention)
    out_attn = model(x).logits
    assert len(report.attention_sites) == model.config.num_hidden_layers == 30
    assert all(name.endswith("self_attn") for name in report.attention_sites)
    calls = [aq.calls for _, aq in attention_quantizers(model)]
    assert calls == [1] * 30
    assert (out_attn - out_linear).abs().max() > 1e-2


def test_attention_requested_on_model_without_sites_is_an_error():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(SurgeryError, match="0 attention sites"):
        quantize_model(model, SurgeryPlan(default=W4A8, attention=QuantSpec("int8", "token")))


@torch.no_grad()
@pytest.mark.parametrize("post_ln", [False, True])
def test_tiny_opt_attention_sites_and_layers(post_ln, tiny_opt, tiny_opt_postln):
    model = tiny_opt_postln if post_ln else tiny_opt
    x = torch.randint(3, 500, (2, 24))
    ref = model(x).logits
    report = quantize_model(model, SurgeryPlan(default=W4A8, attention=QuantSpec("int8", "token"), skip=SKIP))
    assert len(report.attention_sites) == 2
    assert len(report.layers) == 12  # 2 blocks x (q, k, v, out, fc1, fc2)
    assert "lm_head" in report.skipped
    assert any("project_in" in s for s in report.skipped) == post_ln
    out = model(x).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    with quantization_disabled(model):
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_quantized_linear_matches_manual_fake_quant(tiny_opt):
    layer = tiny_opt.model.decoder.layers[0].fc1
    w = layer.weight.detach().clone()
    quantize_model(tiny_opt, SurgeryPlan(default=W4A8, skip=SKIP))
    x = torch.randn(3, 5, w.shape[1])
    expected = torch.nn.functional.linear(
        fake_quantize(x, QuantSpec("int8", "token")), fake_quantize(w, QuantSpec("int4", "channel", axis=0)), layer.bias
    )
    torch.testing.assert_close(layer(x), expected)


@torch.no_grad()
def test_weight_fake_quant_is_cached_and_invalidated_on_change(tiny_opt):
    quantize_model(tiny_opt, SurgeryPlan(default=W4A8, skip=SKIP))
    layer = tiny_opt.model.decoder.layers[0].fc1
    first = layer.quantized_weight()
    assert layer.quantized_weight() is first  # cached, not recomputed per forward
    layer.weight.mul_(2.0)  # in-place edit (SmoothQuant, GPTQ) bumps the version counter
    second = layer.quantized_weight()
    assert second is not first
    torch.testing.assert_close(second, 2 * first)
    layer.weight_quantizer.configure(granularity="block", block=16)
    assert layer.quantized_weight() is not second


def test_weight_gradient_flows_through_ste_in_training(tiny_opt):
    quantize_model(tiny_opt, SurgeryPlan(default=W4A8, skip=SKIP))
    layer = tiny_opt.model.decoder.layers[0].fc1
    x = torch.randn(4, layer.in_features)
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_overrides_by_name_pattern(tiny_opt):
    plan = SurgeryPlan(default=W4A8, skip=SKIP, overrides={"*.fc2": {"act": "e4m3"}, "*.layers.0.*": {"weight": "int8"}})
    report = quantize_model(tiny_opt, plan)
    layers = dict(quantized_layers(tiny_opt))
    assert report.overrides["*.fc2"] == ["model.decoder.layers.0.fc2", "model.decoder.layers.1.fc2"]
    assert layers["model.decoder.layers.1.fc2"].input_quantizer.spec.format == "e4m3"
    assert layers["model.decoder.layers.1.fc1"].input_quantizer.spec.format == "int8"
    assert layers["model.decoder.layers.0.self_attn.q_proj"].weight_quantizer.spec.format == "int8"
    assert layers["model.decoder.layers.1.self_attn.q_proj"].weight_quantizer.spec.format == "int4"
    assert layers["model.decoder.layers.0.fc2"].weight_quantizer.spec.format == "int8"  # both patterns apply


def test_override_pattern_matching_nothing_is_an_error(tiny_opt):
    with pytest.raises(SurgeryError, match="matches no layer"):
        quantize_model(tiny_opt, SurgeryPlan(default=W4A8, overrides={"*.nope": {"act": "int8"}}))


@torch.no_grad()
def test_restore_gives_back_the_float_model(tiny_opt):
    x = torch.randint(3, 500, (1, 16))
    ref = tiny_opt(x).logits
    quantize_model(tiny_opt, SurgeryPlan(default=W4A8, attention=QuantSpec("int8", "token"), skip=SKIP))
    restore_model(tiny_opt)
    assert not quantized_layers(tiny_opt)
    assert type(tiny_opt.model.decoder.layers[0].fc1) is nn.Linear
    torch.testing.assert_close(tiny_opt(x).logits, ref)


def test_state_dict_keys_unchanged(tiny_opt):
    keys = set(tiny_opt.state_dict())
    quantize_model(tiny_opt, SurgeryPlan(default=W4A8, skip=SKIP))
    assert set(tiny_opt.state_dict()) == keys


@torch.no_grad()
def test_conv2d_and_hf_conv1d_are_wrapped_with_the_right_axes():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3), nn.Flatten(1), Conv1D(8, 6 * 4 * 4))
    x = torch.randn(2, 4, 6, 6)
    conv_w, hf_w = model[0].weight.clone(), model[2].weight.clone()
    report = quantize_model(model, SurgeryPlan(default=LayerQuant(weight=QuantSpec("int4", "channel"), act=QuantSpec("int8", "tensor"))))
    assert report.layers == ["0", "2"]
    # per-output-channel scales: conv weight [out, in, kh, kw] -> axis 0; HF Conv1D weight [in, out] -> axis 1
    torch.testing.assert_close(model[0].quantized_weight(), fake_quantize(conv_w, QuantSpec("int4", "channel", axis=0)))
    torch.testing.assert_close(model[2].quantized_weight(), fake_quantize(hf_w, QuantSpec("int4", "channel", axis=1)))
    out = model(x)
    h = torch.nn.functional.conv2d(fake_quantize(x, QuantSpec("int8", "tensor")), model[0].quantized_weight(), model[0].bias)
    h = fake_quantize(h.flatten(1), QuantSpec("int8", "tensor"))
    torch.testing.assert_close(out, h @ model[2].quantized_weight() + model[2].bias)


@torch.no_grad()
def test_block_weights_run_along_the_reduction_dimension(tiny_opt):
    layer = tiny_opt.model.decoder.layers[0].fc2  # [64, 128]: blocks of 32 along the 128 inputs
    w = layer.weight.clone()
    plan = SurgeryPlan(default=LayerQuant(weight=QuantSpec("int4", "block", block=32), act=QuantSpec("fp32")))
    quantize_model(tiny_opt, plan)
    expected = torch.cat([fake_quantize(chunk, QuantSpec("int4", "channel", axis=0)) for chunk in w.split(32, dim=1)], dim=1)
    torch.testing.assert_close(layer.quantized_weight(), expected)


@torch.no_grad()
def test_freezing_weights_keeps_outputs_and_drops_float_copies(tiny_opt):
    from qsim.surgery import freeze_quantized_weights

    quantize_model(tiny_opt, SurgeryPlan(default=W4A8, skip=SKIP))
    x = torch.randint(3, 500, (1, 16))
    before = tiny_opt(x).logits
    assert freeze_quantized_weights(tiny_opt) == 12
    layer = tiny_opt.model.decoder.layers[0].fc1
    assert layer._wq is None and not layer.weight_quantizer.active
    torch.testing.assert_close(tiny_opt(x).logits, before, rtol=0, atol=0)
    assert layer.quantized_weight() is layer.weight


@torch.no_grad()
def test_tied_lm_head_is_not_frozen(smollm2):
    from qsim.surgery import freeze_quantized_weights

    from qsim.models import load_smollm2

    model = smollm2.model
    embed = model.model.embed_tokens.weight.clone()
    down = model.model.layers[5].mlp.down_proj.weight.clone()
    quantize_model(model, SurgeryPlan(default=W4A8, skip=("*embed*",)))
    assert freeze_quantized_weights(model) == 210  # every decoder linear, not the tied lm_head
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert model.lm_head.weight_quantizer.active
    # Frozen in place into weights memory-mapped from the cache: the cache file itself is untouched.
    assert not torch.equal(model.model.layers[5].mlp.down_proj.weight, down)
    assert torch.equal(load_smollm2().model.model.layers[5].mlp.down_proj.weight, down)
