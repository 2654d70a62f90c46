"""The `qsim` command: bad input stops before any model loads, on one line, exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsim import NUMERICS_VERSION
from qsim.results import stale_reason
from conftest import pinned

QSIM = [sys.executable, "-m", "qsim.cli"]


def qsim(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*QSIM, *args], capture_output=True, text=True, env=full_env, timeout=timeout)


BAD_INPUT = [
    (["model=gpt5"], "unknown model 'gpt5'; valid: ", "smollm2-135m"),
    (["format=w9a9"], "unknown format 'w9a9'; valid: ", "w4a8"),
    (["method=magic"], "unknown method 'magic'; valid: ", "abfp"),
    (["task=mmlu"], "unknown task 'mmlu'; valid: ", "wikitext2"),
    (["task=imagenet"], "task=imagenet scores image-classifier models", "is a causal-lm"),
    (["format.weight=int1"], "format.weight='int1'", "2..16"),
    (["format.act=e9m9"], "e9m9", "k + m <= 15"),
    (["method=abfp", "abfp.n=0"], "abfp.n", ">= 1"),
    (["task.seq_len=1"], "task.seq_len must be >= 2", "got 1"),
    (["+quant.overrides={*.nope:{act:int8}}"], "override pattern '*.nope' matches no layer", "model.layers.0"),
    (["+quant.overrides={*.fc2:{act:int99}}"], "int99", "2..16"),
    (["nonsense_key=3"], "nonsense_key", "unknown config key"),
    (["abfp.n=abc"], "abfp.n", "abc"),
    (["method=abfp", "abfp.scale_format=bf16"], "scale_format must be an int or minifloat format", "e4m3"),
    (["method=gptq-abfp", "abfp.scale_format=int8"], "abfp.scale_format", "not supported"),
    (["format=w4a8", "method=abfp", "quant.v_axis=seq"], "non-causal quantization: attention V", "set quant.causal=false"),
    (["format=w4a8", "quant.act.granularity=tensor"], "non-causal quantization: layer inputs", "set quant.causal=false"),
    (["quant.v_axis=rows"], "unknown quant.v_axis 'rows'; valid: ", "head_dim"),
    (["model=tiny-opt", "task.seq_len=64", "format=w4a8", "method=mse"], "calib.seq_len=512 is longer than model 'tiny-opt' has positions (256)", "<=256"),
    (["task.seq_len=9000"], "task.seq_len=9000 is longer than model 'smollm2-135m' has positions", "task.seq_len<="),
]


def assert_one_line_error(code, stdout, stderr, must, also):
    assert code == 2, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("qsim: error: ")
    assert must in lines[0] and also in lines[0]
    assert "Traceback" not in stderr + stdout
    assert "load" not in stdout  # stopped before the model loaded


@pytest.mark.parametrize("args,must,also", BAD_INPUT, ids=[a[0][-1] for a in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_no_traceback(args, must, also, capsys):
    """`qsim run` checks every job before Hydra starts (cli.preflight_overrides), here in-process;
    the next test runs the real command for a few of these."""
    from qsim.cli import preflight_overrides

    with pytest.raises(SystemExit) as stopped:
        preflight_overrides(list(args))
    out = capsys.readouterr()
    assert_one_line_error(stopped.value.code, out.out, out.err, must, also)


@pytest.mark.parametrize("args,must,also", [BAD_INPUT[0], BAD_INPUT[12], BAD_INPUT[-1]], ids=["model", "value", "positions"])
def test_bad_input_on_the_command_line_is_one_line_exit_2(args, must, also):
    proc = qsim("run", *args)
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, must, also)


def test_bad_sweep_value_is_caught_before_any_job_runs(tmp_path):
    proc = qsim("run", "-m", "format=w4a8", "abfp.n=64,0", "method=abfp")
    assert proc.returncode == 2
    assert "abfp.n" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "results").exists()


def test_missing_offline_data_names_the_env_var(tmp_path):
    proc = qsim("run", env={"QSIM_DATA_DIR": str(tmp_path)})
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert "QSIM_DATA_DIR" in line and "wikitext-2-raw-v1/test.jsonl" in line
    assert len(line.splitlines()) == 1


def test_formats_lists_every_format_with_max():
    proc = qsim("formats")
    assert proc.returncode == 0
    out = proc.stdout
    for name, maxval in [("e4m3", "448"), ("e5m2", "57344"), ("e2m1", "6"), ("e3m2", "28"), ("e2m3", "7.5"),
                         ("e1m2", "1.75"), ("int4", "7"), ("int8", "127"), ("e4m3_finite", "480")]:
        row = next(ln for ln in out.splitlines() if f" {name} " in ln)
        assert f" {maxval} " in row, row


def test_unknown_command():
    proc = qsim("frobnicate")
    assert proc.returncode == 2 and "valid: run, formats" in proc.stderr


def test_run_end_to_end_writes_result(tmp_path):
    results = tmp_path / "results"
    proc = qsim("run", "format=w4a8", "task.max_windows=2", "task.seq_len=128", env={"QSIM_RESULTS_DIR": str(results)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    [path] = list(results.rglob("result.json"))
    result = json.loads(path.read_text())
    env = result["environment"]  # what can move the number, in the identity; threads and CPU recorded
    from qsim.environment import file_sha256
    from qsim.models import smollm2_gguf_path

    assert env["identity"]["weights"] == {"sha256": file_sha256(smollm2_gguf_path())}
    assert env["identity"]["blas"] == "AUTO,STRICT" and env["blas"]["torch_imported_first"] is False
    assert set(env["identity"]["packages"]) == {"torch", "transformers", "tokenizers", "numpy"}
    assert env["threads"] >= 1 and env["cpu"]["capability"] and env["cpu"]["machine"]
    assert result["metric"] == "ppl" and pinned(result["value"], 85.39324050165231), result["value"]
    assert result["formats"]["weight"] == "int4" and result["formats"]["act"] == "int8"
    assert result["tokens_evaluated"] == 256
    assert result["quantized"]["layers"] == 210 and result["quantized"]["skipped"] == ["lm_head"]
    assert {reason: f["count"] for reason, f in result["quantized"]["float_modules"].items()} == {
        "skipped by pattern 'lm_head'": 1, "embedding lookup": 1, "norm: elementwise scale, no matmul": 61}
    assert result["quantized"]["weight"]["granularity"] == "channel"
    assert result["quantized"]["act"]["granularity"] == "token"
    for key in ("identity", "config_hash", "versions", "timings", "config", "model_source", "checkpoint"):
        assert result[key]
    assert result["numerics_version"] == NUMERICS_VERSION and stale_reason(result) is None  # fresh as written
    assert [(e["dataset"], e["split"], e["source"]) for e in result["data"]["eval"]] == [("wikitext2", "test", "offline")]
    assert set(result["timings"]) >= {"load", "quantize", "calibrate", "evaluate", "total"}
    assert (path.parent / ".hydra" / "config.yaml").exists()
    assert "ppl" in proc.stdout and "qsim result" in proc.stdout


def test_hub_model_offline_fails_on_one_line_naming_the_paper_checkpoint():
    proc = qsim("run", "model=opt-125m", "model.checkpoint=paper", "task.max_windows=1", env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("qsim: error:")]
    assert len(lines) == 1 and "Aalaa/opt-125m-finetuned-wikitext2" in lines[0] and "smollm2-135m" in lines[0]
    assert "Traceback" not in proc.stderr


def test_paper_checkpoint_only_for_opt():
    proc = qsim("run", "model.checkpoint=paper")
    assert proc.returncode == 2 and "only opt-* models" in proc.stderr


# ---------------------------------------------------------------- presets: README == conf/, each composes

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_choices(group: str) -> set[str]:
    """The preset names in the README's configuration table row `group=`."""
    row = next(ln for ln in README.read_text().splitlines() if ln.startswith(f"| `{group}=` |"))
    names = row.split("|")[2].split("`")[1::2]
    return {n for n in names if "=" not in n and not n.startswith(f"{group}.")}


def _readme_recovery_methods() -> set[str]:
    section = README.read_text().split("## Recovery methods", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    return {n for ln in rows for n in ln.split("|")[1].split("`")[1::2]}


@pytest.mark.parametrize("group", ["model", "format", "method"])
def test_every_preset_the_readme_lists_exists_composes_and_validates(group):
    from qsim.config import group_choices, validate

    from conftest import cfg

    presets = set(group_choices(group))
    listed = _readme_choices(group) | (_readme_recovery_methods() if group == "method" else set())
    assert listed == presets, f"README lists {sorted(listed - presets)} not in conf/{group}/; " \
                              f"conf/{group}/ has {sorted(presets - listed)} the README does not list"
    scored_by = {"causal-lm": "wikitext2", "code-lm": "humaneval", "qa-encoder": "squad", "sentence-encoder": "stsb",
                 "seq-classifier": "sst2", "image-classifier": "imagenet"}  # a task each family is scored on
    for name in sorted(presets):
        c = cfg(f"{group}={name}")
        if group == "model":
            from qsim.models import family_of

            c = cfg(f"model={name}", f"task={scored_by[family_of(c.model)]}")
        validate(c)
