"""mofq: per-layer INT/FP format choice; export-overrides round trip."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, cfg
from qsim import data
from qsim.cli import overrides_yaml
from qsim.config import ConfigError, validate
from qsim.formats import get_format
from qsim.methods import METHODS, StageContext
from qsim.quantizer import fake_quantize
from qsim.run import build_plan
from qsim.surgery import quantization_disabled, quantize_model, quantized_layers


class Bar:
    def start(self, total):
        pass

    def advance(self, n=1, info=""):
        pass


def _tiny():
    from qsim.models import load_tiny_opt

    return load_tiny_opt(post_ln=False, dtype=torch.float32)


def _mofq(lm, *overrides):
    c = cfg("model=tiny-opt", "format=w4a4", "method=mofq", "progress=false", *overrides)
    validate(c)
    quantize_model(lm.model, build_plan(c))
    calib = data.calibration_windows(lm.tokenizer, "ptb", "test", 2, 64, 0)
    facts = {}
    for step in c.method.steps:
        facts[step] = METHODS[step].apply(StageContext(lm.model, calib, c, Bar()))
    return facts["mofq"], calib


def _on_grid(values, shape, gen):
    """A weight whose rows hold only `values` (each row reaching the largest): per-channel max scaling is exact."""
    idx = torch.randint(0, len(values), shape, generator=gen)
    w = values[idx] * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    w[:, 0] = values.max()
    return w


def test_metric_known_answer_and_choice_per_layer():
    """A weight on the INT4 grid has zero INT4 error (E2M1 cannot hold 5 or 7); one on the E2M1 grid
    zero E2M1 error (INT4 cannot hold 0.5 or 1.5 at scale 6/7): mofq picks each one's exact format.
    The activation errors equal the MSE of each candidate on the layer inputs captured separately."""
    lm = _tiny()
    gen = torch.Generator().manual_seed(0)
    layers = dict(lm.model.named_modules())
    int_name, fp_name = "model.decoder.layers.0.fc1", "model.decoder.layers.1.fc2"
    with torch.no_grad():
        w = layers[int_name].weight
        w.copy_(_on_grid(torch.arange(8.0), w.shape, gen) * 0.01)
        w = layers[fp_name].weight
        w.copy_(_on_grid(get_format("e2m1").code_points().abs().unique(), w.shape, gen) * 0.01)
    facts, calib = _mofq(lm)
    assert facts["layers"][int_name]["weight"]["format"] == "int4"
    assert facts["layers"][int_name]["weight"]["errors"]["int4"] == 0.0
    assert facts["layers"][int_name]["weight"]["errors"]["e2m1"] > 1e-7
    assert facts["layers"][fp_name]["weight"]["format"] == "e2m1"
    assert facts["layers"][fp_name]["weight"]["errors"]["e2m1"] == 0.0
    assert facts["layers"][fp_name]["weight"]["errors"]["int4"] > 1e-7

    quant = dict(quantized_layers(lm.model))
    name = "model.decoder.layers.0.self_attn.k_proj"
    seen = []
    hook = quant[name].register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad(), quantization_disabled(lm.model):
        for window in calib:
            lm.model(window[None], use_cache=False)
    hook.remove()
    x = torch.cat(seen)
    spec = quant[name].input_quantizer.spec
    for c in ("int4", "e2m1"):
        from dataclasses import replace

        expected = float((fake_quantize(x, replace(spec, format=c)) - x).pow(2).mean())
        assert facts["layers"][name]["act"]["errors"][c] == pytest.approx(expected, rel=1e-5)
    chosen = min(("int4", "e2m1"), key=lambda c: facts["layers"][name]["act"]["errors"][c])
    assert spec.format == chosen


@pytest.mark.parametrize("steps,metric", [("[abfp,mofq]", "mse"), ("[mofq]", "output")])
def test_mofq_never_worse_than_a_single_format(steps, metric):
    """Per layer and operand, the chosen format's error (by mofq's own metric) is the smallest candidate's,
    so never above all-INT4 or all-E2M1; candidates keep the layer's scaling (ABFP blocks of 64)."""
    lm = _tiny()
    facts, _ = _mofq(lm, f"method.steps={steps}", f"mofq.metric={metric}")
    quant = dict(quantized_layers(lm.model))
    assert len(facts["layers"]) == 12
    both = set()
    for name, roles in facts["layers"].items():
        for role, entry in roles.items():
            errors = entry["errors"]
            assert set(errors) == {"int4", "e2m1"}
            assert errors[entry["format"]] == min(errors.values()) <= max(errors.values())
            q = quant[name].weight_quantizer if role == "weight" else quant[name].input_quantizer
            assert q.spec.format == entry["format"]
            assert q.spec.granularity == ("block" if "abfp" in steps else ("channel" if role == "weight" else "token"))
            both.add(entry["format"])
    assert both == {"int4", "e2m1"}  # a real mixture on this model, not one format everywhere


@pytest.mark.parametrize("overrides,message", [
    (["mofq.metric=kl"], "unknown mofq.metric"),
    (["mofq.candidates=[int8,e4m3]"], "no candidate of 4 bits"),
    (["mofq.candidates=[int4,bf16]"], "float cast"),
    (["method.steps=[mofq,mse]"], "cannot be combined"),
])
def test_bad_mofq_values_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(cfg("model=tiny-opt", "format=w4a4", "method=mofq", *overrides))


def test_export_overrides_round_trip(tmp_path):
    """A mofq run's exported overrides, loaded with +overrides=NAME by a run without mofq, put the same
    quantizer spec (format and ABFP scaling) on every layer."""
    from qsim.run import run

    c = cfg("model=tiny-opt", "format=w4a4", "method=mofq", "method.steps=[abfp,mofq]", "progress=false",
            "calib.n_samples=2", "calib.seq_len=64", "task.max_windows=1", "task.seq_len=64")
    out = tmp_path / "mofq"
    result = run(c, out)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    text = subprocess.run([sys.executable, "-m", "qsim.cli", "export-overrides", str(out / "result.json")],
                          capture_output=True, text=True, check=True, env=env).stdout
    assert text == overrides_yaml(json.loads((out / "result.json").read_text()))
    (tmp_path / "search" / "overrides").mkdir(parents=True)
    (tmp_path / "search" / "overrides" / "roundtrip.yaml").write_text(text)

    lm_mofq = _tiny()
    _mofq(lm_mofq, "method.steps=[abfp,mofq]")
    c2 = cfg("model=tiny-opt", "format=w4a4", "method=abfp", "+overrides=roundtrip",
             f"hydra.searchpath=[file://{tmp_path / 'search'}]")
    assert len(c2.quant.overrides) == 12
    lm = _tiny()
    quantize_model(lm.model, build_plan(c2))
    exported = dict(quantized_layers(lm.model))
    chosen = result["methods"]["mofq"]["layers"]
    for name, layer in quantized_layers(lm_mofq.model):
        for attr in ("weight_quantizer", "input_quantizer"):
            assert getattr(exported[name], attr).spec == getattr(layer, attr).spec, (name, attr)
        assert exported[name].weight_quantizer.spec.format == chosen[name]["weight"]["format"]
    bad = subprocess.run([sys.executable, "-m", "qsim.cli", "export-overrides", str(tmp_path / "nothing.json")],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "nothing.json" in bad.stderr
