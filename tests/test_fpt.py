"""fpt (FPT baseline): Fisher-weighted output error, joint format and max search."""
import pytest
import torch

from conftest import cfg
from qsim import data
from qsim.config import ConfigError, validate
from qsim.methods import METHODS, StageContext
from qsim.methods.fpt import channel_shifts, fisher_error
from qsim.models import ByteTokenizer
from qsim.pins import tiny_model
from qsim.run import build_plan
from qsim.surgery import (attention_quantizers, freeze_quantized_weights, quantization_disabled, quantized_layers,
                          quantize_model)


class Bar:
    def start(self, total):
        pass

    def advance(self, n=1, info=""):
        pass


def test_fisher_error_by_hand():
    """O = X W^T; only the output element with a non-zero squared gradient counts."""
    x = torch.tensor([[1.0, 2.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # O = [1, 2]
    wq = torch.tensor([[1.5, 0.0], [0.0, 0.0]])  # O^ = [1.5, 0]: errors 0.5 and 2
    assert fisher_error(x, w, torch.tensor([[4.0, 0.0]]), x, wq) == pytest.approx(4 * 0.25 / 2)
    assert fisher_error(x, w, torch.tensor([[0.0, 1.0]]), x, wq) == pytest.approx(4 / 2)


def test_fpt_search_never_increases_the_error_and_sets_static_quantizers(one_thread):
    model = tiny_model("tiny-llama")
    c = cfg("format=e2m1", "method=fpt", "fpt.steps=20", "fpt.rounds=2")
    validate(c)
    quantize_model(model, build_plan(c))
    calib = data.calibration_windows(ByteTokenizer(), "ptb", "test", 2, 32, 0)
    facts = METHODS["fpt"].apply(StageContext(model, calib, c, Bar()))
    layers = dict(quantized_layers(model))
    assert len(facts["layers"]) == 14
    formats = set()
    for name, entry in facts["layers"].items():
        rounds = entry["rounds"]
        assert len(rounds) == 4  # 2 rounds x (act, weight)
        assert all(b <= a for a, b in zip(rounds, rounds[1:]))
        for role, q in (("act", layers[name].input_quantizer), ("weight", layers[name].weight_quantizer)):
            assert entry[role]["format"] in ("e2m1", "e1m2", "e3m0")
            granularity = "tensor" if role == "act" else "channel"  # the fpt preset: per-channel weights, as the paper
            assert q.spec.format == entry[role]["format"] and q.spec.mode == "static" and q.spec.granularity == granularity
            assert float(q.amax.max()) == pytest.approx(entry[role]["amax"]) and q.amax.numel() == (
                1 if role == "act" else layers[name].out_features)
            formats.add(entry[role]["format"])
    with torch.no_grad():
        assert torch.isfinite(model(calib[:1]).logits).all()


@pytest.mark.parametrize("overrides,message", [
    (["fpt.candidates=[e4m3]"], "no candidate of 4 bits"),
    (["fpt.gamma1=2.0"], "gamma1 < gamma2"),
    (["fpt.attention=true", "format.attn=fp32"], "leaves them in float"),
    (["fpt.weight_granularity=block"], "tensor or channel"),
])
def test_bad_fpt_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg("model=tiny-opt", "format=w4a4", "method=fpt", *overrides))


def test_channel_shifts_by_hand():
    """Eq. 18 at the initial rho: floor(log2(M / m_j)) clipped to [0, 2^e - 1]; an all-zero channel gets the top."""
    m = torch.tensor([8.0, 1.0, 0.3, 0.0, 5.0])
    assert channel_shifts(m, 2).tolist() == [0, 3, 3, 3, 0]  # E2M1: up to 3
    assert channel_shifts(m, 3).tolist() == [0, 3, 4, 7, 0]  # log2(8 / 0.3) = 4.74
    assert channel_shifts(m, 1).tolist() == [0, 1, 1, 1, 0]
    assert channel_shifts(m, 0).tolist() == [0, 0, 0, 0, 0]  # INT: no exponent to shift


def _fpt_tiny_llama(*overrides):
    model = tiny_model("tiny-llama")
    c = cfg("format=e2m1", "method=fpt", "fpt.steps=10", "fpt.rounds=1", *overrides)
    validate(c)
    quantize_model(model, build_plan(c))
    calib = data.calibration_windows(ByteTokenizer(), "ptb", "test", 2, 32, 0)
    facts = METHODS["fpt"].apply(StageContext(model, calib, c, Bar()))
    return model, calib, facts


def test_preshift_folds_exactly_and_quantizes_the_shifted_input(one_thread):
    """fpt (preset default: pre-shifted exponent bias): with quantization off the output is the
    float model's bit for bit; on, a layer computes Q(x 2^s) (Q(W) 2^-s)^T; freezing keeps it."""
    assert cfg("method=fpt").fpt.preshift and not cfg("method=fpt", "fpt.preshift=false").fpt.preshift
    model, calib, facts = _fpt_tiny_llama()
    assert facts["preshift"] and sum(facts["formats"]["act"].values()) == 14
    shifted = {n: l for n, l in quantized_layers(model) if l.input_shift is not None}
    assert shifted, "no layer got an exponent shift"
    for name, layer in shifted.items():
        shift = facts["layers"][name]["act"]["shift"]
        assert shift["max"] == int(layer.input_shift.max()) <= 3 and shift["channels"] == int((layer.input_shift > 0).sum())
    with torch.no_grad(), quantization_disabled(model):
        folded = model(calib).logits
        assert torch.equal(folded, tiny_model("tiny-llama")(calib).logits)
    name, layer = next(iter(shifted.items()))
    x = torch.randn(3, layer.in_features)
    s = layer.input_shift
    with torch.no_grad():
        by_hand = layer.input_quantizer(x * torch.exp2(s)) @ (layer.weight_quantizer(layer.weight) * torch.exp2(-s)).T
        assert torch.equal(layer(x), by_hand)
        before = model(calib).logits
        freeze_quantized_weights(model)
        assert torch.equal(model(calib).logits, before)


def test_fpt_baseline_sets_no_shift(one_thread):
    model, _, facts = _fpt_tiny_llama("fpt.preshift=false")
    assert not facts["preshift"]
    assert all(layer.input_shift is None for _, layer in quantized_layers(model))
    assert all("shift" not in entry["act"] for entry in facts["layers"].values())


def test_fisher_error_of_batched_products_is_the_mean_over_heads():
    """Attention products are [batch, heads, t, .]: the error is the mean of the per-head errors."""
    gen = torch.Generator().manual_seed(0)
    x, w, xq, wq = (torch.randn(1, 3, 5, 4, generator=gen) for _ in range(4))
    g2 = torch.rand(1, 3, 5, 5, generator=gen)
    per_head = [fisher_error(x[0, h], w[0, h], g2[0, h], xq[0, h], wq[0, h]) for h in range(3)]
    assert fisher_error(x, w, g2, xq, wq) == pytest.approx(sum(per_head) / 3, rel=1e-6)  # fp32 products


def test_fpt_attention_searches_qk_and_pv_operands(one_thread):
    """fpt.attention=true: each site's Q, K, P, V get a searched format and static per-tensor max."""
    model, calib, facts = _fpt_tiny_llama("fpt.attention=true")
    assert len(facts["attention"]) == 2 and sum(facts["formats"]["attention"].values()) == 2 * 4
    for name, aq in attention_quantizers(model):
        entry = facts["attention"][name]
        for product in ("qk", "pv"):
            rounds = entry[f"rounds_{product}"]
            assert len(rounds) == 2 and rounds[1] <= rounds[0]
        for op in "qkvp":
            q = getattr(aq, op)
            assert q.spec.format == entry[op]["format"] in ("e2m1", "e1m2", "e3m0")
            assert q.spec.mode == "static" and q.spec.granularity == "tensor"
            assert float(q.amax) == pytest.approx(entry[op]["amax"])
        assert aq.observe is None  # the collection hook is gone
    assert 0 < entry["p"]["amax"] <= 1.2  # probabilities: at most gamma2 x their max
    with torch.no_grad():
        assert torch.isfinite(model(calib).logits).all()
