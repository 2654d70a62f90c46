"""A method preset never overrides what the user wrote (issue 21, section 3).

For every preset in conf/method/: each quant.* key its stages force is refused with one line
when the user set it to another value, and recorded (result.json `method_set`) when the value
came from anywhere else. The forced keys are written out below from each stage's `configure`
(qsim/methods/*.py) and checked against what the stages do, so a new stage or preset that
forces a key fails here until it is listed. Checks run in-process on composed configs (no model
loads); one CLI run proves the one line and exit 2, one tiny run the record.
"""
import json
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from qsim.config import ConfigError, group_choices
from qsim.presets import check_user_keys, method_set, user_keys

ABFP = {"quant.weight.granularity": "block", "quant.weight.block": 64, "quant.weight.axis": -1,
        "quant.weight.scale_dtype": "bf16", "quant.act.granularity": "block", "quant.act.block": 64,
        "quant.act.axis": -1, "quant.act.scale_dtype": "bf16", "quant.attention": True}
RTN = {"quant.weight.granularity": "channel", "quant.act.granularity": "token", "quant.act.axis": -1}
GPTQ = {"quant.weight.granularity": "channel", "quant.weight.symmetric": False}
# preset -> key -> the value its stages run with, whatever the config says (format w4a8)
FORCED = {
    "none": {}, "qat": {}, "rotate": {}, "smoothquant": {}, "mofq": {},
    "rtn": RTN, "rotate-rtn": RTN,
    "abfp": ABFP, "abfp-qat": ABFP, "abfp-sq": ABFP, "rotate-abfp": ABFP,
    "gptq-abfp": {**ABFP, "quant.weight.symmetric": True},  # GPTQ onto ABFP blocks: symmetric max scaling
    "gptq": GPTQ, "gptq-lorc": GPTQ, "rotate-gptq": GPTQ,
    "mse": {"quant.weight.granularity": "channel", "quant.act.granularity": "tensor", "quant.attention": True},
    "rptq": {"quant.weight.granularity": "channel", "quant.act.granularity": "channel", "quant.act.axis": -1},
    "fpt": {"quant.weight.granularity": "channel", "quant.act.granularity": "tensor"},  # fpt.weight_granularity: channel
}
# each key a user could write, with values covering every forced one and another
PROBES = {"quant.weight.granularity": ["tensor", "block"], "quant.weight.block": [32, 64],
          "quant.weight.axis": [0, -1], "quant.weight.scale_dtype": ["fp32", "bf16"],
          "quant.weight.symmetric": [True, False], "quant.act.granularity": ["tensor", "channel"],
          "quant.act.block": [32, 64], "quant.act.axis": [-2, -1], "quant.act.scale_dtype": ["fp32", "bf16"],
          "quant.act.symmetric": [True, False], "quant.attention": [True, False]}


@pytest.fixture(scope="module")
def presets():
    """Each preset composed once (w4a8 on the tiny OPT, which needs no weights to plan)."""
    from qsim.sweep import compose_jobs

    names = group_choices("method")
    jobs = compose_jobs([[f"method={m}", "format=w4a8", "model=tiny-opt"] for m in names])
    return {name: OmegaConf.to_container(job, resolve=True) for name, job in zip(names, jobs)}


def with_value(config: dict, key, value):
    """The preset's config with `key` at `value` (as a file or the command line would set it)."""
    out = OmegaConf.create(config)
    OmegaConf.update(out, key, value)
    return out


def test_every_preset_is_listed():
    assert sorted(FORCED) == group_choices("method")


@pytest.mark.parametrize("preset", sorted(FORCED))
def test_the_keys_a_preset_forces_are_the_listed_ones(preset, presets):
    forced = {}
    for key, values in PROBES.items():
        for value in values:
            try:
                chosen = method_set(with_value(presets[preset], key, value))
            except ValueError:  # a plan preflight refuses anyway (e.g. asymmetric fp32 outputs)
                continue
            for c in chosen:
                if c["key"] == key and c["config"] == value:
                    forced.setdefault(key, set()).add(c["value"])
    assert {k: v.pop() for k, v in forced.items() if len(v) == 1} == FORCED[preset]
    assert all(len(v) <= 1 for v in forced.values())


CASES = [(preset, key) for preset in sorted(FORCED) for key in FORCED[preset]]


@pytest.mark.parametrize("preset,key", CASES, ids=[f"{p}-{k}" for p, k in CASES])
def test_a_forced_key_the_user_set_is_refused_and_left_unset_is_recorded(preset, key, presets):
    forced = FORCED[preset][key]
    other = next(v for v in PROBES[key] if v != forced)
    cfg = with_value(presets[preset], key, other)
    written = f"{key}={str(other).lower() if isinstance(other, bool) else other}"
    with pytest.raises(ConfigError) as err:
        check_user_keys(cfg, user_keys([f"method={preset}", written]))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{written} is set, but method '{preset}'"), message
    # the same value from a config file, not the command line: the method's choice, recorded
    recorded = [c for c in check_user_keys(cfg, user_keys([f"method={preset}"])) if c["key"] == key]
    assert recorded and all(c["value"] == forced and c["config"] == other for c in recorded)
    # the user writing what the method runs is no conflict
    check_user_keys(with_value(presets[preset], key, forced), user_keys([f"{key}={forced}"]))


@pytest.mark.parametrize("line,method,runs", [
    (["method=rtn", "quant.weight.granularity=block"], "rtn", "channel"),
    (["method=abfp", "quant.weight.granularity=channel"], "abfp", "block")])
def test_the_issues_commands_are_refused_even_with_fp32_operands(line, method, runs):
    """As typed in the issue (format fp32 by default): the result would still name a setting
    that did not run."""
    from qsim.config import compose_config

    with pytest.raises(ConfigError, match=rf"^{line[1]} is set, but method '{method}' \(its {method} stage\) "
                                          rf"sets it to {runs}: "):
        check_user_keys(compose_config(line), user_keys(line))


def test_a_command_line_value_wins_over_the_presets_own_yaml():
    """conf/method/fpt.yaml sets fpt.weight_granularity and fpt.preshift: the command line wins,
    in either order, and the stage runs it (no conflict: it is the method's own key)."""
    from qsim.config import compose_config
    from qsim.run import build_plan

    for order in (["method=fpt", "fpt.weight_granularity=tensor"], ["fpt.weight_granularity=tensor", "method=fpt"]):
        c = compose_config(["format=w4a8", "model=tiny-opt", *order])
        assert c.fpt.weight_granularity == "tensor" and c.fpt.preshift is True
        assert build_plan(c).default.weight.granularity == "tensor"
        check_user_keys(c, user_keys(order))


def test_user_keys_reads_the_command_line():
    keys = user_keys(["method=rtn", "+experiment=smoke", "quant.weight={granularity:block,block:32}",
                      "~quant.act.axis", "abfp.n=32,64", "++quant.attention=true", "hydra.run.dir=x"])
    assert keys == {"quant.weight.granularity", "quant.weight.block", "abfp.n", "quant.attention"}


def test_the_python_api_refuses_a_setting_its_method_changes(tiny_opt):
    import qsim

    with pytest.raises(ConfigError, match=r"^quant.weight.granularity=block is set, but method 'rtn'"):
        qsim.quantize(tiny_opt, format="w4a8", method="rtn", quant__weight__granularity="block")
    _, report = qsim.quantize(tiny_opt, format="w4a8", method="abfp")
    assert {"key": "quant.weight.granularity", "operand": "weight", "value": "block", "config": "channel",
            "by": "abfp"} in report.method_set


def test_the_cli_says_it_on_one_line_with_exit_2_before_loading(tmp_path):
    env = {**os.environ, "QSIM_RESULTS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "qsim.cli", "run", "method=abfp", "format=w4a8",
                           "quant.weight.granularity=channel"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("qsim: error: quant.weight.granularity=channel is set, but method 'abfp' (its abfp "
                                   "stage) sets it to block: drop the key, or use a method that keeps it")
    assert not list(tmp_path.rglob("result.json"))


def test_result_json_records_what_the_method_chose(tmp_path):
    from qsim.config import compose_config
    from qsim.run import run

    c = compose_config(["model=tiny-opt", "format=w4a8", "method=rtn", "quant.act.axis=-2", "task.max_windows=1",
                        "task.seq_len=32", "progress=false"])
    # quant.act.axis came from a file here (explicit: nothing), so rtn's -1 runs and is recorded
    result = run(c, tmp_path, explicit=frozenset())
    stored = json.loads((tmp_path / "result.json").read_text())
    assert stored["method_set"] == result["method_set"] == [
        {"key": "quant.act.axis", "operand": "act", "value": -1, "config": -2, "by": "rtn"}]
    assert stored["quantized"]["act"]["axis"] == -1
    with pytest.raises(ConfigError, match=r"^quant.act.axis=-2 is set, but method 'rtn'"):
        run(c, tmp_path / "again", explicit=user_keys(["quant.act.axis=-2"]))
