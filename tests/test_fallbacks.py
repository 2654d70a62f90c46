"""No silent fallbacks: what surgery leaves in float is listed with its reason, nn.Linear subclasses and
nn.MultiheadAttention are quantized (or reported), and every method stage that cannot do its work on a
part of the model says so in its facts, or stops with one line."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import cfg
from qsim import data
from qsim.config import ConfigError
from qsim.methods import METHODS, MethodError, StageContext
from qsim.methods.gptq import run_gptq
from qsim.methods.qat import finetune
from qsim.quantizer import QuantSpec, fake_quantize
from qsim.run import build_plan, preflight
from qsim.surgery import (
    FLOAT_MHA_OUT_PROJ,
    NORM_REASON,
    SEPARATE_QKV_REASON,
    LayerQuant,
    QuantMultiheadAttention,
    SurgeryError,
    SurgeryPlan,
    compact_names,
    freeze_quantized_weights,
    quantization_disabled,
    quantize_model,
    quantized_layers,
    restore_model,
)

ACT, WEIGHT = QuantSpec("int8", "token"), QuantSpec("int4", "channel")
W4A8 = LayerQuant(weight=WEIGHT, act=ACT)


class Bar:
    def start(self, total):
        pass

    def advance(self, n=1, info=""):
        pass


# ---------------------------------------------------------------- layers

class KeepsForward(nn.Linear):
    """A subclass with its own attribute, nn.Linear's forward."""

    def describe(self):
        return f"{self.in_features}->{self.out_features}"


class OwnForward(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


@torch.no_grad()
def test_linear_subclasses_quantized_by_isinstance_or_reported():
    torch.manual_seed(0)
    model = nn.Sequential(KeepsForward(8, 8), nn.ReLU(), OwnForward(8, 4))
    keys = set(model.state_dict())
    x = torch.randn(3, 8)
    report = quantize_model(model, SurgeryPlan(default=W4A8))
    assert report.layers == ["0"]
    assert report.float_modules == {"Linear subclass with its own forward (OwnForward)": ["2"]}
    first = model[0]
    assert isinstance(first, KeepsForward) and first.describe() == "8->8" and set(model.state_dict()) == keys
    hidden = F.linear(fake_quantize(x, ACT), fake_quantize(first.weight, QuantSpec("int4", "channel", axis=0)), first.bias)
    torch.testing.assert_close(model(x), 2 * F.linear(hidden.relu(), model[2].weight, model[2].bias))
    other = nn.Sequential(KeepsForward(2, 2))
    quantize_model(other, SurgeryPlan(default=W4A8))
    assert type(other[0]) is type(model[0])  # one quantized class per subclass, built once
    restore_model(model)
    assert type(model[0]) is KeepsForward


def _encoder(batch_first=True, norm_first=False, nested=False):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()


def _manual_mha(mha, x):
    """Batch-first self-attention from scratch: quantized input and in-projection, quantized
    attention output into a quantized out_proj."""
    b, t, e = x.shape
    h = mha.num_heads
    w_in = fake_quantize(mha.in_proj_weight, QuantSpec("int4", "channel", axis=0))
    q, k, v = (fake_quantize(x, ACT) @ w_in.T + mha.in_proj_bias).chunk(3, -1)
    q, k, v = (z.reshape(b, t, h, e // h).transpose(1, 2) for z in (q, k, v))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(e // h), -1)
    o = (probs @ v).transpose(1, 2).reshape(b, t, e)
    w_out = fake_quantize(mha.out_proj.weight, QuantSpec("int4", "channel", axis=0))
    return fake_quantize(o, ACT) @ w_out.T + mha.out_proj.bias


@torch.no_grad()
def test_multihead_attention_is_quantized_at_the_right_points():
    model = _encoder()
    mha = model.layers[0].self_attn
    x = torch.randn(2, 5, 16)
    report = quantize_model(model, SurgeryPlan(default=W4A8))
    assert isinstance(mha, QuantMultiheadAttention)
    assert report.layers == [f"layers.{i}.{n}" for i in range(2) for n in ("self_attn", "self_attn.out_proj", "linear1", "linear2")]
    torch.testing.assert_close(mha(x, x, x, need_weights=False)[0], _manual_mha(mha, x), rtol=1e-5, atol=1e-5)
    # in (seq, batch, features) layout too
    mha.batch_first = False
    out = mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)[0]
    torch.testing.assert_close(out.transpose(0, 1), _manual_mha(mha, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding_mask", [False, True])
@torch.no_grad()
def test_encoder_fast_paths_do_not_bypass_quantized_layers(padding_mask):
    """In eval without grad torch runs nn.TransformerEncoderLayer as one fused kernel on the raw weights,
    and nn.TransformerEncoder turns padded input into nested tensors: surgery switches both off."""
    model = _encoder(nested=True)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if padding_mask else None
    ref = model(x, src_key_padding_mask=mask)
    quantize_model(model, SurgeryPlan(default=W4A8))
    seen = []
    for name, layer in quantized_layers(model):
        layer.input_quantizer.observer = lambda _q, _x, name=name: seen.append(name)
    model(x, src_key_padding_mask=mask)
    assert sorted(set(seen)) == sorted(n for n, _ in quantized_layers(model))
    for _, layer in quantized_layers(model):
        layer.input_quantizer.observer = None
    out = model(x, src_key_padding_mask=mask)
    keep = ~mask if padding_mask else torch.ones(2, 5, dtype=torch.bool)
    assert (out - ref)[keep].abs().max() > 1e-2
    with quantization_disabled(model):
        torch.testing.assert_close(model(x, src_key_padding_mask=mask)[keep], ref[keep], rtol=1e-5, atol=1e-5)
    restore_model(model)
    assert model.use_nested_tensor and not model.layers[0]._forward_pre_hooks
    torch.testing.assert_close(model(x, src_key_padding_mask=mask)[keep], ref[keep])


def test_multihead_attention_trains_and_freezes():
    model = _encoder()
    quantize_model(model, SurgeryPlan(default=W4A8))
    model.train()
    model(torch.randn(2, 5, 16)).sum().backward()
    mha = model.layers[0].self_attn
    assert mha.in_proj_weight.grad.abs().sum() > 0 and mha.out_proj.weight.grad.abs().sum() > 0
    model.eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        before = model(x)
        assert freeze_quantized_weights(model) == 8
        assert not mha.weight_quantizer.active
        # the same weight values; torch's attention kernels may round the last bit differently
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)


def test_multihead_attention_operands_or_outputs_are_an_error():
    with pytest.raises(SurgeryError, match="nn.MultiheadAttention 'layers.0.self_attn' computes them inside"):
        quantize_model(_encoder(), SurgeryPlan(default=W4A8, attention=QuantSpec("int8", "token")))
    with_output = LayerQuant(weight=WEIGHT, act=ACT, output=QuantSpec("int8", "token"))
    with pytest.raises(SurgeryError, match="in-projection outputs"):
        quantize_model(_encoder(), SurgeryPlan(default=with_output))


def test_float_multihead_attention_keeps_its_out_proj_float():
    model = _encoder()
    report = quantize_model(model, SurgeryPlan(default=W4A8, skip=("layers.1.self_attn",)))
    assert report.float_modules == {
        "skipped by pattern 'layers.1.self_attn'": ["layers.1.self_attn"],
        FLOAT_MHA_OUT_PROJ: ["layers.1.self_attn.out_proj"],
        NORM_REASON: ["layers.0.norm1", "layers.0.norm2", "layers.1.norm1", "layers.1.norm2"],
    }
    cross = nn.ModuleDict({"attn": nn.MultiheadAttention(16, 4, kdim=8, vdim=8)})
    report = quantize_model(cross, SurgeryPlan(default=W4A8))
    assert report.layers == []
    assert report.float_modules == {SEPARATE_QKV_REASON: ["attn"], FLOAT_MHA_OUT_PROJ: ["attn.out_proj"]}


class LayerScale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return x * self.gamma


def test_unsupported_weight_bearing_modules_are_listed():
    model = nn.ModuleDict({
        "stem": nn.Conv3d(2, 4, 3), "up": nn.ConvTranspose1d(4, 4, 3), "scale": LayerScale(4),
        "fc": nn.Linear(4, 4), "bn": nn.BatchNorm1d(4), "emb": nn.Embedding(10, 4), "act": nn.GELU(),
    })
    report = quantize_model(model, SurgeryPlan(default=W4A8))
    assert report.layers == ["fc"]
    assert report.float_modules == {
        "no quantized class for Conv3d": ["stem"],
        "no quantized class for ConvTranspose1d": ["up"],
        "no quantized class for LayerScale": ["scale"],
        NORM_REASON: ["bn"],
        "embedding lookup": ["emb"],
    }


def test_compact_names():
    names = [f"model.layers.{i}.input_layernorm" for i in range(30)] + ["model.norm", "lm_head"]
    names += ["blocks.0.experts.3.w", "blocks.1.experts.3.w", "blocks.3.experts.3.w", "blocks.0.experts.4.w", "x.7"]
    assert compact_names(names) == [
        "model.layers.{0-29}.input_layernorm", "model.norm", "lm_head",
        "blocks.{0-1,3}.experts.3.w", "blocks.0.experts.4.w", "x.7",
    ]
    assert compact_names([]) == []


@pytest.mark.slow
def test_smollm2_float_modules_all_have_their_reason(smollm2):
    report = quantize_model(smollm2.model, build_plan(cfg("format=w4a8")))
    assert len(report.layers) == 210
    assert {reason: compact_names(names) for reason, names in report.float_modules.items()} == {
        "skipped by pattern 'lm_head'": ["lm_head"],
        "embedding lookup": ["model.embed_tokens"],
        NORM_REASON: ["model.layers.{0-29}.input_layernorm", "model.layers.{0-29}.post_attention_layernorm", "model.norm"],
    }
    assert len(report.float_modules[NORM_REASON]) == 61


# ---------------------------------------------------------------- methods: small causal LMs built here

class TinyLM(nn.Module):
    """Token embedding, then `body`, then a head; called like a transformers model."""

    def __init__(self, body: nn.Module, vocab=50, width=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = body
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids, use_cache=False):
        return self.head(self.body(self.embed(input_ids)))


class Unreached(nn.Module):
    """fc runs; zero_fed only ever sees zeros; unused never runs."""

    def __init__(self, width=16):
        super().__init__()
        self.fc, self.zero_fed, self.unused = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, h):
        return self.fc(h) + self.zero_fed(h * 0)


class ConvBody(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.fc = nn.Linear(width, width)

    def forward(self, h):
        return self.fc(self.conv(h.transpose(1, 2)).transpose(1, 2))


def _calib(n=2, seq_len=12):
    return torch.randint(0, 50, (n, seq_len), generator=torch.Generator().manual_seed(0))


def _simulated(model, *overrides):
    c = cfg("model=tiny-opt", *overrides)
    quantize_model(model, build_plan(c))
    return c


@pytest.mark.parametrize("overrides, message", [
    (["method=mse", "format=fp32"], r"mse calibrates static activation ranges, but no activation quantizer has one \(format.act=fp32"),
    (["method=mse", "format=mxfp4", "mse.attention=false"], "no activation quantizer has one"),
    (["method=rptq", "format=fp32"], "rptq clusters activation ranges, but format.act is fp32"),
    (["method=gptq", "format.weight=fp32", "format.act=int8"], "gptq rounds weights, but format.weight is fp32"),
    (["method.steps=[gptq,qat]", "format=w4a16"], "qat after gptq"),
])
def test_stages_with_nothing_to_do_fail_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        preflight(cfg(*overrides))
    assert "\n" not in str(err.value)


def test_mse_records_quantizers_without_data_and_stops_when_none_saw_any():
    torch.manual_seed(0)
    model = TinyLM(Unreached())
    c = _simulated(model, "method=mse", "format=w4a8", "mse.attention=false")
    facts = METHODS["mse"].apply(StageContext(model, _calib(), c, Bar()))
    assert facts["dynamic_fallback"] == ["body.unused.input"] and facts["zero_inputs"] == ["body.zero_fed.input"]
    assert facts["calibrated"] == 3  # fc, zero_fed, head
    assert model.body.unused.input_quantizer.spec.mode == "dynamic"

    lonely = TinyLM(Unreached())
    c = _simulated(lonely, "method=mse", "format=w4a8", "mse.attention=false", "quant.skip=[head,body.fc,body.zero_fed]")
    with pytest.raises(MethodError, match="none of the 1 activation quantizers saw calibration data"):
        METHODS["mse"].apply(StageContext(lonely, _calib(), c, Bar()))


def test_rptq_records_convolutions_and_unreached_inputs():
    torch.manual_seed(0)
    model = TinyLM(ConvBody())
    c = _simulated(model, "method=rptq", "format=w4a4")
    facts = METHODS["rptq"].apply(StageContext(model, _calib(), c, Bar()))
    assert facts["dynamic_fallback"] == {"channels-first input (convolution): per-token dynamic": ["body.conv"]}
    assert facts["layers"] == 2  # fc and head clustered
    spec = model.body.conv.input_quantizer.spec
    assert (spec.granularity, spec.axis, spec.mode) == ("token", 1, "dynamic")
    with torch.no_grad():
        assert torch.isfinite(model(_calib())).all()

    unreached = TinyLM(Unreached())
    c = _simulated(unreached, "method=rptq", "format=w4a4")
    facts = METHODS["rptq"].apply(StageContext(unreached, _calib(), c, Bar()))
    assert facts["dynamic_fallback"] == {"not reached by the calibration windows: per-token dynamic": ["body.unused"]}


def test_smoothquant_lists_what_it_leaves_and_stops_when_nothing_is_left(tiny_opt):
    from qsim.models import load_tiny_opt

    c = _simulated(tiny_opt, "method=smoothquant", "format=w4a8")
    facts = METHODS["smoothquant"].apply(StageContext(tiny_opt, _calib(seq_len=32), c, Bar()))
    assert facts["folded_into_norm"] == 8
    assert facts["not_smoothed"] == {"scope 'norm': input neither a norm's output nor shared": [
        "model.decoder.layers.{0-1}.self_attn.out_proj", "model.decoder.layers.{0-1}.fc2"]}
    assert facts["norms_folded"] == ["model.decoder.layers.{0-1}.final_layer_norm",
                                     "model.decoder.layers.{0-1}.self_attn_layer_norm"]

    model = load_tiny_opt(post_ln=False, dtype=torch.float32).model
    c = _simulated(model, "method=smoothquant", "format=w4a8", "quant.skip=[lm_head,'*_proj','*fc1']")  # fc2 is left
    with pytest.raises(MethodError, match=r"smoothquant found nothing to smooth in OPTForCausalLM "
                                          r"\(scope 'norm': input neither a norm's output nor shared: 2\)"):
        METHODS["smoothquant"].apply(StageContext(model, _calib(seq_len=32), c, Bar()))


class Block(nn.Module):
    def __init__(self, width=16, reached=True):
        super().__init__()
        self.fc, self.unused, self.reached = nn.Linear(width, width), nn.Linear(width, width), reached

    def forward(self, h):
        return h + self.fc(h) if self.reached else h


class Blocks(nn.Module):
    def __init__(self, reached=True):
        super().__init__()
        self.layers = nn.ModuleList([Block(reached=reached) for _ in range(3)])

    def forward(self, h):
        for block in self.layers:
            h = block(h)
        return h


def test_gptq_lists_layers_left_at_rtn_and_stops_when_it_rounds_none():
    torch.manual_seed(0)
    model = TinyLM(Blocks())
    c = _simulated(model, "method=gptq", "format=w4a16", "gptq.max_blocks=2")
    facts = run_gptq(model, _calib(4, 16), c.gptq)
    assert facts["layers"] == 2
    assert facts["rtn_layers"] == {
        "not reached in its block by the calibration windows": ["body.layers.{0-1}.unused"],
        "past gptq.max_blocks": ["body.layers.2.fc", "body.layers.2.unused"],
        "outside the decoder blocks (body.layers)": ["head"],
    }
    idle = TinyLM(Blocks(reached=False))
    c = _simulated(idle, "method=gptq", "format=w4a16")
    with pytest.raises(MethodError, match=r"gptq rounded no layer in body.layers\[0:3\] \(not reached in its block "
                                          r"by the calibration windows: 6; outside the decoder blocks"):
        run_gptq(idle, _calib(4, 16), c.gptq)


class TiedLM(nn.Module):
    """Only an embedding and the head tied to it: freezing embeddings freezes everything."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head


def test_qat_with_everything_frozen_is_an_error():
    model = TiedLM()
    c = _simulated(model, "method=qat", "format=w4a8", "qat.steps=1", "qat.seq_len=8")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(MethodError, match="qat has no trainable parameter in TiedLM"):
        finetune(model, torch.zeros(1, 8, dtype=torch.long), c.qat)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_empty_calibration_text_fails_before_loading(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw-v1").symlink_to(data.data_dir() / "wikitext-2-raw-v1")  # the evaluation text
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "test.txt").write_text("\n \n\n")
    monkeypatch.setenv("QSIM_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"needs calibration data: .*ptb/test.txt holds no text") as err:
        preflight(cfg("method=mse", "format=w4a8"))
    assert "\n" not in str(err.value)
    (tmp_path / "ptb" / "test.txt").write_text("too short\n")
    from qsim.models import ByteTokenizer

    with pytest.raises(data.DataError, match="ptb test has 9 tokens, fewer than calib seq_len 64"):
        data.calibration_windows(ByteTokenizer(), "ptb", "test", 2, 64, 0)
