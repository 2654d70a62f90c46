"""Tasks beyond perplexity: STS-B on the offline all-MiniLM-L6-v2 (qsim/tasks/stsb.py)."""
import json
import subprocess
import sys

import pytest
from scipy.stats import spearmanr

from conftest import REPO


def qsim_run(tmp_path, *args, env=None):
    return subprocess.run([sys.executable, "-m", "qsim.cli", "run", *args, "progress=false", f"hydra.run.dir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, env=env)


def test_spearman_is_the_rank_correlation_of_its_worked_example():
    # scipy's documented example; by hand: ranks x 1..5, y 1,2,3.5,5,3.5 -> rho = cov / (sd sd)
    assert spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]).statistic == pytest.approx(0.8207826816681233, abs=1e-15)


# (overrides, Spearman on the first 100 STS-B dev pairs, attention sites)
STSB_CASES = [(["format=fp32", "method=none"], 0.9433302099201905, 0),
              (["format=w4a8", "method=abfp"], 0.9413403661834389, 6)]


@pytest.mark.parametrize("overrides, spearman, sites", STSB_CASES, ids=["fp32", "w4a8-abfp"])
def test_minilm_on_stsb_offline(overrides, spearman, sites, tmp_path):
    run = qsim_run(tmp_path, "model=minilm", "task=stsb", "task.max_samples=100", *overrides)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["metric"], result["higher_is_better"]) == ("spearman", True)
    assert result["value"] == pytest.approx(spearman, rel=1e-4)
    assert result["eval"]["samples"] == 100 and result["eval"]["samples_available"] == 1500
    assert result["quantized"]["attention_sites"] == sites and result["quantized"]["layers"] == 37
    assert result["model_source"].startswith("package:") and result["data"]["eval"][0]["file"] == "glue/stsb/dev.tsv"


def test_stsb_without_its_data_stops_before_loading(tmp_path):
    import os

    env = {**os.environ, "QSIM_DATA_DIR": str(tmp_path / "nothing")}
    run = qsim_run(tmp_path, "model=minilm", "task=stsb", env=env)
    assert run.returncode == 2 and "glue/stsb/dev.tsv" in run.stderr and len(run.stderr.strip().splitlines()) == 1
