"""qsim sensitivity: per-unit loss changes; a known answer on SmolLM2."""
import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, cfg
from qsim import data
from qsim.models import ByteTokenizer
from qsim.pins import tiny_model
from qsim.run import build_plan
from qsim.sensitivity import PrefixCache, mean_loss, measure, sensitivity_units
from qsim.surgery import all_quantizers, quantize_model


def _set_only(model, units, keep, on_rest):
    for _, q in all_quantizers(model):
        q.enabled = on_rest
    for name, _, quantizers in units:
        if name == keep:
            for q in quantizers:
                q.enabled = not on_rest


def test_numbers_are_the_losses_of_those_configurations(one_thread):
    """`only` and `all_but` are the loss changes of exactly those enabled sets; every quantizer is on afterwards."""
    model = tiny_model("tiny-llama")
    quantize_model(model, build_plan(cfg("format=w4a4", "method=abfp")))
    windows = data.calibration_windows(ByteTokenizer(), "ptb", "test", 2, 32, 0)
    out = measure(model, windows)
    units = sensitivity_units(model)
    assert [r["unit"] for r in out["units"]] == [u[0] for u in units]
    assert len(units) == 14 + 2 and {u[1] for u in units} == {"layer", "attention"}  # 2 x 7 linears, 2 attention sites
    assert all(q.enabled for _, q in all_quantizers(model))
    assert out["loss_quantized"] == pytest.approx(mean_loss(model, windows), rel=1e-6)
    for row in (out["units"][2], out["units"][-1]):
        _set_only(model, units, row["unit"], on_rest=False)
        assert row["only"] == pytest.approx(mean_loss(model, windows) - out["loss_float"], abs=1e-6)
        _set_only(model, units, row["unit"], on_rest=True)
        assert row["all_but"] == pytest.approx(out["loss_quantized"] - mean_loss(model, windows), abs=1e-6)
    for _, q in all_quantizers(model):
        q.enabled = False
    assert out["loss_float"] == pytest.approx(mean_loss(model, windows), rel=1e-6)


@pytest.mark.slow
def test_the_layer_made_sensitive_ranks_first_both_ways(smollm2, one_thread):
    """SmolLM2 at W8A8 except one layer at INT2 weights and inputs: among the layers of its block, it costs
    the most when it alone is quantized and recovers the most when it alone is left in float."""
    sensitive = "model.layers.1.mlp.up_proj"
    c = cfg("format=w8a8", "method=none", f"+quant.overrides={{{sensitive}:{{weight:int2,act:int2}}}}")
    quantize_model(smollm2.model, build_plan(c))
    windows = data.calibration_windows(smollm2.tokenizer, "ptb", "test", 2, 64, 0)
    out = measure(smollm2.model, windows, patterns=["model.layers.1.*"])
    assert len(out["units"]) == 7
    by_only = sorted(out["units"], key=lambda r: -r["only"])
    by_all_but = sorted(out["units"], key=lambda r: -r["all_but"])
    assert by_only[0]["unit"] == by_all_but[0]["unit"] == sensitive
    assert by_only[0]["only"] > 5 * abs(by_only[1]["only"])
    assert by_all_but[0]["all_but"] > 5 * abs(by_all_but[1]["all_but"])


def test_sensitivity_cli_writes_csv_png_and_top(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "qsim.cli", "sensitivity", "model=tiny-opt", "format=w4a4",
                          "method=abfp", "sensitivity.seq_len=32", "sensitivity.windows=2", "sensitivity.top=3",
                          "progress=false", "--out", str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    rows = list(csv.DictReader(open(tmp_path / "sensitivity.csv")))
    assert len(rows) == 12 + 2  # 12 linears, 2 attention sites (abfp quantizes attention)
    assert {r["kind"] for r in rows} == {"layer", "attention"}
    assert (tmp_path / "sensitivity.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "sensitivity.json").read_text())
    assert (saved["windows"], saved["seq_len"]) == (2, 32)
    assert "rank" in run.stdout and run.stdout.count("model.decoder.layers.") >= 3
    bad = subprocess.run([sys.executable, "-m", "qsim.cli", "sensitivity", "model=tiny-opt", "format=w9"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown format" in bad.stderr
    # its windows' length (and the calibration's, when the method calibrates) is checked against the
    # positions, the task's is not
    long = subprocess.run([sys.executable, "-m", "qsim.cli", "sensitivity", "model=tiny-opt", "format=w4a4", "method=mse",
                           "calib.seq_len=300"],
                          capture_output=True, text=True, env=env)
    assert long.returncode == 2 and "calib.seq_len=300 is longer than model 'tiny-opt' has positions (256)" in long.stderr
    long = subprocess.run([sys.executable, "-m", "qsim.cli", "sensitivity", "model=tiny-opt", "sensitivity.seq_len=300"],
                          capture_output=True, text=True, env=env)
    assert long.returncode == 2 and "sensitivity.seq_len=300 is longer" in long.stderr


def test_prefix_cache_gives_the_same_numbers(one_thread):
    """Replaying the blocks before a unit's block from stored outputs changes no number."""
    model = tiny_model("tiny-llama")
    quantize_model(model, build_plan(cfg("format=w4a4", "method=abfp")))
    windows = data.calibration_windows(ByteTokenizer(), "ptb", "test", 2, 32, 0)
    cache = PrefixCache(model)
    assert cache.prefix == "model.layers" and cache.block_of("model.layers.1.mlp.up_proj") == 1
    cached = measure(model, windows, prefix_cache=True)
    plain = measure(model, windows, prefix_cache=False)
    assert [r["unit"] for r in cached["units"]] == [r["unit"] for r in plain["units"]]
    for a, b in zip(cached["units"], plain["units"]):
        assert a["loss_only"] == pytest.approx(b["loss_only"], rel=1e-9, abs=0)
        assert a["loss_all_but"] == pytest.approx(b["loss_all_but"], rel=1e-9, abs=0)
    assert not any("forward" in vars(m) for m in model.modules())  # every stub removed
