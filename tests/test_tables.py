"""`qsim tables`: paper rows and columns, ours beside the paper's, missing is not
zero, the newest of several results wins and says so, nothing runs a model."""
import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qsim import NUMERICS_VERSION
from qsim.results import write_json_atomic
from qsim.tables import PAPER_CSV, build_all

from conftest import pinned

QSIM = [sys.executable, "-m", "qsim.cli"]
SHARED_PAPER_CSV = Path(__file__).resolve().parents[2] / "shared" / "paper" / "int_fp_qsim_tables.csv"


def qsim(*args, results: Path, timeout=300):
    env = {**os.environ, "QSIM_RESULTS_DIR": str(results)}
    return subprocess.run([*QSIM, *args], capture_output=True, text=True, env=env, timeout=timeout)


_CONFIGS: dict = {}


def composed(row: str, col: str, overrides=()) -> dict:
    """The resolved config of an experiment row x column (+ overrides), as a sweep job gets it."""
    key = (row, col, tuple(overrides))
    if key not in _CONFIGS:
        from qsim.sweep import compose_jobs

        [cfg] = compose_jobs([[f"+experiment/row={row}", f"+experiment/col={col}", *overrides]])
        _CONFIGS[key] = cfg
    return _CONFIGS[key]


def put_result(root: Path, name: str, *, value, row="opt-125m-1024", col="fp32", overrides=(), windows=None,
               available=280, finished_at="2026-01-01T10:00:00+0000", **extra) -> dict:
    """A result.json with what run.py writes, identity included, for an experiment row x column,
    without running the model. The OPT rows read the hub's validation split (as a run on the hub
    would); SmolLM2's read the offline test split."""
    from omegaconf import OmegaConf

    from qsim.results import identity_fields
    from qsim.run import data_read

    cfg = composed(row, col, overrides)
    hub = cfg.model.source == "hub"
    saved = os.environ.pop("QSIM_DATA_DIR") if hub else None
    try:
        fields = identity_fields(OmegaConf.to_container(cfg, resolve=True), data_read(cfg))
    finally:
        if saved is not None:
            os.environ["QSIM_DATA_DIR"] = saved
    split = fields["data"]["eval"][0]["split"]
    steps = list(cfg.method.steps)
    result = {
        "task": "wikitext2", "metric": "ppl", "value": value, "model": cfg.model.name, "checkpoint": cfg.model.checkpoint,
        "formats": {"weight": cfg.format.weight, "act": cfg.format.act}, "method": cfg.method.name, "steps": steps,
        "n": cfg.abfp.n if "abfp" in steps else None, "seq_len": cfg.task.seq_len, "protocol": cfg.task.protocol,
        "eval": {"value": value, "windows": windows or available, "windows_available": available, "split": split},
        "config": OmegaConf.to_container(cfg, resolve=True), **fields, "finished_at": finished_at, **extra,
    }
    write_json_atomic(root / "runs" / name / "result.json", result)
    return result


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def table_line(md: str, label: str) -> list[str]:
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


# sha256 of ../shared/paper/int_fp_qsim_tables.csv: a clone without ../shared still checks the copy
PAPER_CSV_SHA256 = "2be04cde57a6eda7535b5c3972022527895f5c4b073ec8c9a795d34ca3d62aaf"


def test_the_paper_numbers_are_a_verbatim_copy():
    assert hashlib.sha256(PAPER_CSV.read_bytes()).hexdigest() == PAPER_CSV_SHA256
    if SHARED_PAPER_CSV.exists():  # and, where the original is at hand, byte for byte
        assert PAPER_CSV.read_bytes() == SHARED_PAPER_CSV.read_bytes()


def test_no_results_says_so_and_exits_0(tmp_path):
    proc = qsim("tables", results=tmp_path / "nothing")
    assert proc.returncode == 0
    assert "no results yet" in proc.stdout and "qsim run -m +experiment=" in proc.stdout
    assert not (tmp_path / "nothing" / "tables").exists()


def test_make_tables_on_an_empty_folder(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "QSIM_RESULTS_DIR": str(tmp_path / "empty")}
    proc = subprocess.run(["make", "-s", "-C", str(repo), "tables"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and "no results yet" in proc.stdout


def test_cells_show_ours_beside_the_paper_with_the_delta_and_missing_is_not_zero(tmp_path):
    root = tmp_path / "results"
    put_result(root, "fp32", value=26.0)
    put_result(root, "abfp", value=33.0, col="w4a4-abfp")
    lines = build_all(root, root / "tables")
    assert any(ln.startswith("Table II ") and " 2/16 " in ln for ln in lines)
    md = (root / "tables" / "table2.md").read_text()
    assert "| Model (Seq len) | FP32 | W4A4 ABFP | E2M1 ABFP | E1M2 ABFP |" in md
    assert table_line(md, "OPT 125M (1024)") == ["26.00 / 25.94 (+0.06)", "33.00 / 33.14 (-0.14)",
                                                 "missing / 37.59", "missing / 33.12"]
    assert table_line(md, "OPT 2.7B (256)") == ["missing / 13.35", "missing / 16.39", "missing / 32.77", "missing / 16.41"]
    rows = read_csv(root / "tables" / "table2.csv")
    assert len(rows) == 16  # the paper's 4 rows x 4 columns, nothing else
    by = {(r["row"], r["column"]): r for r in rows}
    assert by[("OPT 125M (1024)", "FP32")]["ours"] == "26.0" and float(by[("OPT 125M (1024)", "FP32")]["delta"]) == pytest.approx(0.06)
    missing = by[("OPT 350M (1024)", "E1M2 ABFP")]
    assert missing["status"] == "missing" and missing["ours"] == "" and missing["delta"] == "" and missing["paper"] == "32.41"
    # the same two results fill Table I's and Table X's cells too: cells are matched by content
    assert table_line((root / "tables" / "table1.md").read_text(), "OPT 125M (1024)")[0] == "26.00 / 25.94 (+0.06)"
    x = (root / "tables" / "table10.md").read_text()
    assert table_line(x, "Codegen 2B") == ["missing / 23.78", "missing / 23.17", "missing / 23.78"]  # a qsim task (humaneval)
    assert table_line(x, "ImageBind") == ["n/a / 72.5", "n/a / 70.4", "n/a / 71.6"]  # no qsim model


def test_the_newest_of_several_results_is_used_and_the_choice_is_stated(tmp_path):
    root = tmp_path / "results"
    put_result(root, "old", value=27.0, finished_at="2026-01-01T10:00:00+0000")
    put_result(root, "new", value=26.5, finished_at="2026-01-02T09:00:00+0000")
    put_result(root, "older", value=28.0, finished_at="2025-12-31T10:00:00+0000")
    build_all(root, root / "tables")
    md = (root / "tables" / "table2.md").read_text()
    assert table_line(md, "OPT 125M (1024)")[0] == "26.50 [1] / 25.94 (+0.56)"
    note = next(ln for ln in md.splitlines() if ln.startswith("[1]"))
    assert "3 results match; the newest is used (2026-01-02T09:00:00+0000, runs/new/result.json)" in note
    assert "27.00" in note and "28.00" in note
    row = next(r for r in read_csv(root / "tables" / "table2.csv") if r["row"] == "OPT 125M (1024)" and r["column"] == "FP32")
    assert row["results_matched"] == "3" and row["result"] == "runs/new/result.json"


def test_a_partial_or_offline_evaluation_gets_its_own_row_never_the_papers(tmp_path):
    root = tmp_path / "results"
    put_result(root, "few-windows", value=30.0, windows=8)  # OPT-125M, but 8 of 280 windows
    put_result(root, "smol", value=21.0, row="smollm2-135m", col="e1m2-abfp", windows=8)
    build_all(root, root / "tables")
    md = (root / "tables" / "table2.md").read_text()
    assert table_line(md, "OPT 125M (1024)")[0] == "missing / 25.94"
    assert table_line(md, "opt-125m (1024) [validation, 8 windows, paper protocol]")[0] == "30.00 / -"
    assert table_line(md, "smollm2-135m (256) [test, 8 windows, paper protocol]") == ["missing / -"] * 3 + ["21.00 / -"]
    # Figure 3 (E1M2 ABFP vs n) has SmolLM2's n=64 point
    assert (root / "tables" / "figure3.png").stat().st_size > 1000
    assert "| smollm2-135m (256) [test, 8 windows, paper protocol] | E1M2 ABFP | 21.00 | - |" in (root / "tables" / "index.md").read_text()


def rewrite(path: Path, result: dict, **changes) -> None:
    """Store `result` as a run made under other circumstances would have (its identity recomputed
    from its own config, data, numerics version and environment, as run.py would have written it then)."""
    from qsim.results import identity

    result = {**result, **changes}
    env = result.get("environment")
    result["identity"] = identity(result["config"], result["data"], result["numerics_version"],
                                  env["identity"] if env else None)
    write_json_atomic(path, result)


def test_stale_results_never_fill_a_cell_and_are_counted(tmp_path):
    root = tmp_path / "results"
    runs = root / "runs"
    put_result(root, "fresh", value=26.0)
    later = "2026-02-01T10:00:00+0000"  # each stale result is newer: if it counted, it would win its cell
    old = put_result(root, "old-numerics", value=99.0, finished_at=later)
    rewrite(runs / "old-numerics" / "result.json", old, numerics_version=NUMERICS_VERSION - 1)
    smol = put_result(root, "smol-fresh", value=21.0, row="smollm2-135m", col="e1m2-abfp", windows=8)
    other_file = {**smol["data"], "eval": [{**smol["data"]["eval"][0], "sha256": "0" * 64}]}
    put_result(root, "other-data", value=98.0, row="smollm2-135m", col="e1m2-abfp", finished_at=later)
    rewrite(runs / "other-data" / "result.json", smol, data=other_file, value=98.0, finished_at=later)
    # made when mse.candidates defaulted to 50: the value was not a change then
    mse = put_result(root, "old-default", value=97.0, col="w4a4-mse", overrides=["mse.candidates=50"], finished_at=later)
    rewrite(runs / "old-default" / "result.json", mse, config_changes={k: v for k, v in mse["config_changes"].items() if k != "mse"})
    before_identities = {k: v for k, v in put_result(root, "no-identity", value=96.0, finished_at=later).items()
                         if k not in ("identity", "config_changes", "data", "numerics_version")}
    write_json_atomic(runs / "no-identity" / "result.json", before_identities)
    # made from another GGUF, and made before result.json recorded its environment
    other_env = {**smol["environment"], "identity": {**smol["environment"]["identity"], "weights": {"sha256": "ab12" * 16}}}
    rewrite(runs / "other-gguf" / "result.json", smol, environment=other_env, value=95.0, finished_at=later)
    rewrite(runs / "no-environment" / "result.json", {k: v for k, v in smol.items() if k != "environment"},
            value=94.0, finished_at=later)

    proc = qsim("tables", results=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [line] = [ln for ln in proc.stdout.splitlines() if ln.startswith("qsim tables:")]
    assert line.startswith("qsim tables: ignored 6 stale results (")
    for part in ("1 older numerics version", "1 data changed", "1 defaults changed", "1 made before result identities",
                 "1 other environment", "1 made before environment identities"):
        assert part in line, line
    from qsim.results import stale_reason

    kind, detail = stale_reason(json.loads((runs / "other-gguf" / "result.json").read_text()))
    assert (kind, detail) == ("other environment", f"weights sha256 ab12ab12ab12... -> "
                              f"{smol['environment']['identity']['weights']['sha256'][:12]}...")
    assert table_line((root / "tables" / "table1.md").read_text(), "OPT 125M (1024)") == [
        "26.00 / 25.94 (+0.06)", "missing / 1130", "missing / 33.14"]
    md = (root / "tables" / "table2.md").read_text()
    assert table_line(md, "OPT 125M (1024)")[0] == "26.00 / 25.94 (+0.06)"  # no footnote: one result counts
    assert table_line(md, "smollm2-135m (256) [test, 8 windows, paper protocol]")[3] == "21.00 / -"
    assert "ignored 6 stale results" in (root / "tables" / "index.md").read_text()


def test_a_result_unlike_its_cells_definition_gets_its_own_labelled_row(tmp_path):
    root = tmp_path / "results"
    put_result(root, "fp32", value=26.0)
    put_result(root, "abfp", value=33.0, col="w4a4-abfp")
    put_result(root, "abfp-damp", value=33.0, col="w4a4-abfp", overrides=["gptq.damp=0.1"])  # GPTQ does not run: same cell
    put_result(root, "fp32-calib", value=26.0, col="fp32", overrides=["calib.n_samples=8"])  # nothing calibrates: same cell
    put_result(root, "no-attn", value=31.0, col="w4a4-abfp", overrides=["abfp.attention=false"])
    put_result(root, "bf16", value=26.1, col="fp32", overrides=["model.dtype=bfloat16"])
    put_result(root, "mse-calib", value=900.0, col="w4a4-mse", overrides=["calib.n_samples=8"])
    put_result(root, "mse-skip", value=800.0, col="w4a4-mse", overrides=["quant.skip=[lm_head]"])
    build_all(root, root / "tables")
    md = (root / "tables" / "table1.md").read_text()
    fp32, mse, abfp = table_line(md, "OPT 125M (1024)")
    assert fp32.startswith("26.00 [") and abfp.startswith("33.00 [") and mse == "missing / 1130"
    base = "opt-125m (1024) [validation, all windows, paper protocol, "
    assert table_line(md, base + "abfp.attention=false]") == ["missing / -", "missing / -", "31.00 / -"]
    assert table_line(md, base + "model.dtype=bfloat16]") == ["26.10 / -", "missing / -", "missing / -"]
    assert table_line(md, base + "calib.n_samples=8]") == ["missing / -", "900.00 / -", "missing / -"]
    assert table_line(md, base + 'quant.skip=["lm_head"]]') == ["missing / -", "800.00 / -", "missing / -"]
    rows = read_csv(root / "tables" / "table1.csv")
    assert {r["variant"] for r in rows} == {"", "abfp.attention=false", "model.dtype=bfloat16", "calib.n_samples=8",
                                            'quant.skip=["lm_head"]'}


def test_table8_columns_quantize_the_same_operands(tmp_path):
    root = tmp_path / "results"
    put_result(root, "rptq", value=41.0, col="w4a4-rptq")
    put_result(root, "abfp", value=33.0, col="w4a4-abfp")
    put_result(root, "rptq-linears-only", value=40.0, col="w4a4-rptq", overrides=["quant.attention=false"])
    build_all(root, root / "tables")
    md = (root / "tables" / "table8.md").read_text()
    assert table_line(md, "OPT 125M (1024)")[1:3] == ["41.00 / 41.48 (-0.48)", "33.00 / 33.14 (-0.14)"]
    label = "opt-125m (1024) [validation, all windows, paper protocol, quant.attention=false]"
    assert table_line(md, label)[1] == "40.00 / -"
    assert "All columns quantize the same operands" in md
    cfg_rptq, cfg_abfp = composed("opt-125m-1024", "w4a4-rptq"), composed("opt-125m-1024", "w4a4-abfp")
    assert cfg_rptq.quant.attention and cfg_abfp.abfp.attention  # the attention matmul operands in both


def test_a_non_causal_result_gets_its_own_row_and_a_footnote(tmp_path):
    root = tmp_path / "results"
    put_result(root, "causal", value=33.0, col="w4a4-abfp", causal=True)
    put_result(root, "non-causal", value=32.0, col="w4a4-abfp", causal=False)
    build_all(root, root / "tables")
    md = (root / "tables" / "table2.md").read_text()
    assert table_line(md, "OPT 125M (1024)")[1] == "33.00 / 33.14 (-0.14)"
    label = "opt-125m (1024) [validation, all windows, paper protocol, causal=false]"
    assert table_line(md, label)[1] == "32.00 \u2020 / -"
    assert "\u2020 non-causal (the result says `causal: false`)" in md


def test_results_from_two_cpus_are_footnoted_with_both(tmp_path):
    """The CPU is not in the identity: results from two CPUs both count, and the table names them."""
    root = tmp_path / "results"
    put_result(root, "fp32", value=26.0)
    put_result(root, "abfp", value=33.0, col="w4a4-abfp")
    build_all(root, root / "tables")
    assert "CPUs:" not in (root / "tables" / "table2.md").read_text()  # one CPU: no footnote
    result = put_result(root, "abfp", value=33.0, col="w4a4-abfp")
    env = result["environment"]
    moved = {**result, "environment": {**env, "cpu": {**env["cpu"], "model": "AMD EPYC 7B13", "capability": "AVX2"}}}
    write_json_atomic(root / "runs" / "abfp" / "result.json", moved)
    build_all(root, root / "tables")
    md = (root / "tables" / "table2.md").read_text()
    assert table_line(md, "OPT 125M (1024)")[:2] == ["26.00 / 25.94 (+0.06)", "33.00 / 33.14 (-0.14)"]  # both fresh
    [note] = [ln for ln in md.splitlines() if ln.startswith("CPUs:")]
    here = f"{env['cpu']['model']} ({env['cpu']['capability']})"
    assert "ran on 2 CPUs" in note and "AMD EPYC 7B13 (AVX2): 1 result" in note and f"{here}: 1 result" in note
    assert {r["cpu"] for r in read_csv(root / "tables" / "table2.csv") if r["ours"]} == {here, "AMD EPYC 7B13 (AVX2)"}


def test_tables_never_load_torch(tmp_path):
    root = tmp_path / "results"
    put_result(root, "fp32", value=26.0)
    code = ("import sys; from qsim.cli import main; main(['tables']); "
            "assert 'torch' not in sys.modules, 'qsim tables imported torch'")
    env = {**os.environ, "QSIM_RESULTS_DIR": str(root)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / "tables" / "table2.md").exists()


@pytest.mark.slow
def test_table2_offline_end_to_end_on_smollm2(tmp_path):
    """The real Table II experiment, offline, at a toy size (2 of its 4 columns), then the table."""
    root = tmp_path / "results"
    run = qsim("run", "-m", "+experiment=table2-offline", "experiment/col=fp32,e1m2-abfp", "task.max_windows=1",
               "task.seq_len=64", "progress=false", results=root, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "qsim sweep: 2 jobs: 2 done, 0 skipped, 0 failed" in run.stdout
    proc = qsim("tables", results=root)
    assert proc.returncode == 0 and "Table II " in proc.stdout
    md = (root / "tables" / "table2.md").read_text()
    fp32, w4a4, e2m1, e1m2 = table_line(md, "smollm2-135m (64) [test, 1 window, paper protocol]")
    assert w4a4 == e2m1 == "missing / -"
    values = {r["method"]: r["value"] for r in map(json.loads, map(Path.read_text, root.rglob("result.json")))}
    assert pinned(values["none"], 58.37251361937298) and pinned(values["abfp"], 541.9836148557783), values
    assert (fp32, e1m2) == (f"{values['none']:.2f} / -", f"{values['abfp']:.2f} / -")
    assert table_line(md, "OPT 125M (1024)") == ["missing / 25.94", "missing / 33.14", "missing / 37.59", "missing / 33.12"]


def _as_task(root: Path, name: str, result: dict, task: str, metric: str, samples: int, available: int) -> None:
    result.update(task=task, metric=metric)
    result["eval"] = {"value": result["value"], "samples": samples, "samples_available": available, "split": "validation"}
    write_json_atomic(root / "runs" / name / "result.json", result)


def test_table_x_task_cells_match_on_task_and_extent_not_windows(tmp_path):
    """BERT's SQuAD F1 on the whole dev set fills its paper cell; 100 questions get their own
    row, labelled with task, metric and extent; a sentence encoder's STS-B its own row."""
    root = tmp_path / "results"
    _as_task(root, "bert", put_result(root, "bert", value=86.0, row="bert-base", col="w4a8-abfp"), "squad", "f1", 10570, 10570)
    _as_task(root, "part", put_result(root, "part", value=80.0, row="bert-base", col="fp32", overrides=["task.max_samples=100"]),
             "squad", "f1", 100, 10570)
    _as_task(root, "sts", put_result(root, "sts", value=0.8673, row="minilm-stsb", col="fp32"), "stsb", "spearman", 1500, 1500)
    build_all(root, root / "tables")
    x = (root / "tables" / "table10.md").read_text()
    assert table_line(x, "BERT-base") == ["missing / 86.81", "missing / 83.57", "86.00 / 86.12 (-0.12)"]
    assert table_line(x, "bert-base [squad F1, validation, 100 samples]") == ["80.00 / -", "missing / -", "missing / -"]
    assert table_line(x, "minilm [stsb Spearman, validation, all samples]") == ["0.8673 / -", "missing / -", "missing / -"]
