"""fpt (FPT baseline): Fisher-weighted output error, joint format and max search."""
import pytest
import torch

from conftest import cfg
from qsim import data
from qsim.config import ConfigError, validate
from qsim.methods import METHODS, StageContext
from qsim.methods.fpt import fisher_error
from qsim.models import ByteTokenizer
from qsim.pins import tiny_model
from qsim.run import build_plan
from qsim.surgery import quantized_layers, quantize_model


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
            assert q.spec.format == entry[role]["format"] and q.spec.mode == "static" and q.spec.granularity == "tensor"
            assert float(q.amax) == pytest.approx(entry[role]["amax"])
            formats.add(entry[role]["format"])
    with torch.no_grad():
        assert torch.isfinite(model(calib[:1]).logits).all()


@pytest.mark.parametrize("overrides,message", [
    (["fpt.preshift=true"], "not implemented"),
    (["fpt.candidates=[e4m3]"], "no candidate of 4 bits"),
    (["fpt.gamma1=2.0"], "gamma1 < gamma2"),
])
def test_bad_fpt_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg("model=tiny-opt", "format=w4a4", "method=fpt", *overrides))
