"""The Python API (qsim.quantize, qsim.evaluate): the CLI's validation, surgery and numbers."""
import pytest
import torch

import qsim
from qsim import data
from qsim.config import ConfigError, compose_config
from qsim.models import ByteTokenizer, load_tiny_opt
from qsim.run import build_plan, calibrate
from qsim.surgery import quantize_model

from test_causality import tiny_llama


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_quantize_is_the_cli_surgery_and_method_stages(one_thread):
    ids = torch.randint(3, 500, (1, 32), generator=torch.Generator().manual_seed(0))
    model, report = qsim.quantize(tiny_llama(), format="w4a4", method="abfp", abfp__n=32)
    assert len(report.layers) == 14 and len(report.attention_sites) == 2 and report.causal
    assert report.config.abfp.n == 32 and "abfp" in report.methods
    same = tiny_llama()
    quantize_model(same, build_plan(compose_config(["format=w4a4", "method=abfp", "abfp.n=32"])))
    assert torch.equal(_logits(model, ids), _logits(same, ids))
    assert not torch.equal(_logits(model, ids), _logits(tiny_llama(), ids))


def test_calibration_from_a_tokenizer_or_from_given_windows(one_thread):
    tok = ByteTokenizer()
    windows = data.calibration_windows(tok, "ptb", "test", 2, 32, 0)
    a, ra = qsim.quantize(tiny_llama(), format="w4a8", method="smoothquant", tokenizer=tok,
                          overrides=["calib.n_samples=2", "calib.seq_len=32"])
    b, rb = qsim.quantize(tiny_llama(), format="w4a8", method="smoothquant", calib=windows)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    facts = [{k: v for k, v in r.methods["smoothquant"].items() if k != "seconds"} for r in (ra, rb)]
    assert facts[0] == facts[1] and facts[0]["alpha"] == 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "w9"}, "unknown format"),
    ({"method": "smoothquant"}, "method 'smoothquant' needs calibration data: pass calib= token windows or tokenizer="),
    ({"quant__v_axis": "seq"}, "non-causal quantization"),
])
def test_bad_settings_raise_the_cli_one_line_error(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ConfigError, match=message):
        qsim.quantize(model, **kwargs)
    assert not any("Quant" in type(m).__name__ for m in model.modules())  # refused before any surgery


def test_evaluate_gives_the_cli_number_on_tiny_opt(one_thread):
    lm = load_tiny_opt(post_ln=False, dtype=torch.float32)
    qsim.quantize(lm.model, format="w4a8", method="abfp")
    out = qsim.evaluate(lm.model, lm.tokenizer, task__seq_len=64, task__max_windows=2)
    assert out["metric"] == "ppl" and out["windows"] == 2
    # `qsim run model=tiny-opt format=w4a8 method=abfp task.seq_len=64 task.max_windows=2`
    assert out["value"] == pytest.approx(514.0083824780363, rel=1e-4)
    with pytest.raises(ConfigError, match=r"task.seq_len=512 is longer than model 'OPTForCausalLM' has positions \(256\)"):
        qsim.evaluate(lm.model, lm.tokenizer, task__seq_len=512)


def test_evaluate_knows_the_family_of_the_model_it_is_given(one_thread):
    """A QA encoder is scored extractively, as `qsim run model=tiny-bert-qa task=squad` does; a
    task that does not score its family is the CLI's error."""
    from qsim.models import load_tiny

    lm = load_tiny("bert", "qa-encoder", torch.float32)
    qsim.quantize(lm.model, format="w4a8", method="abfp")
    out = qsim.evaluate(lm.model, lm.tokenizer, task="squad", task__max_samples=6)
    assert (out["metric"], out["mode"], out["samples"]) == ("f1", "extractive", 6)
    assert out["value"] == pytest.approx(19.861111111111114, abs=1e-9)  # test_task_families' CLI run
    with pytest.raises(ConfigError, match="task=wikitext2 scores causal-lm or code-lm models"):
        qsim.evaluate(lm.model, lm.tokenizer, task="wikitext2")
