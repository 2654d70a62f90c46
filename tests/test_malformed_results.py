"""The results directory is read defensively (issue 21, section 4).

One malformed result.json beside a good one, in each shape the probe used: `qsim tables` skips
it with one counted line and fills the table from the good one; a sweep job whose identity a
malformed file names never reuses it (the job runs), says so, and the summary counts it;
results.load and the published check skip or name it. All in this process: the good result is
written as run.py writes it, and the one sweep job runs on the tiny OPT.
"""
import json
from pathlib import Path

import pytest

from qsim.results import MALFORMED, load, load_all_results, read_result, result_problem, stale_reason, write_json_atomic
from qsim.sweep import find_result, job_identity
from qsim.tables import build_all



@pytest.fixture(scope="module")
def good() -> dict:
    """A fresh result of the smoke sweep's job, as run.py writes it (value aside)."""
    from omegaconf import OmegaConf

    from qsim.sweep import compose_jobs

    [c] = compose_jobs([["+experiment=smoke", "format=w4a4", "method=abfp", "task.max_windows=1", "task.seq_len=32"]])
    job = job_identity(c)
    return {"task": "wikitext2", "metric": "ppl", "value": 33.0, "model": c.model.name, "checkpoint": "base",
            "formats": {"weight": "int4", "act": "int4"}, "method": "abfp", "steps": ["abfp"], "n": 64, "seq_len": 32,
            "protocol": c.task.protocol, "eval": {"windows": 1, "windows_available": 1, "split": "test"},
            "config": OmegaConf.to_container(c, resolve=True), **{k: v for k, v in job.items() if k != "config"},
            "finished_at": "2026-01-01T10:00:00+0000"}


def shapes(good: dict) -> dict[str, str]:
    """name -> the file's text, each with the job's identity in it where it can hold one."""
    def with_(**changes):
        return json.dumps({**good, **changes})

    return {
        "null": "null", "list": "[]",
        "list-naming-the-job": json.dumps([good]),
        "config-changes-list": with_(config_changes=[]),
        "data-list": with_(data=[]),
        "truncated": json.dumps(good)[:-40],
        "value-oops": with_(value="oops"), "value-null": with_(value=None), "value-nan": with_(value=float("nan")),
        "value-bool": with_(value=True),
        "numerics-version-string": with_(numerics_version="3"),
        "model-section-string": with_(config_changes={**good["config_changes"], "model": "x"}),
        "eval-split-list": with_(eval={**good["eval"], "split": ["test"]}),
    }


WHY = {"null": "top level is null, not an object", "list": "top level is list, not an object",
       "list-naming-the-job": "top level is list, not an object",
       "config-changes-list": "config_changes is not an object", "data-list": "data is not an object",
       "truncated": "not valid JSON (truncated?)", "value-oops": "value is not a finite number",
       "value-null": "value is not a finite number", "value-nan": "value is not a finite number",
       "value-bool": "value is not a finite number", "numerics-version-string": "numerics_version is not a known version",
       "model-section-string": "config_changes.model is not an object",
       "eval-split-list": "eval's split or extent is not typed"}


def test_each_shape_has_its_reason_and_a_good_result_has_none(good, tmp_path):
    assert result_problem(good) is None and stale_reason(good) is None
    for name, text in shapes(good).items():
        path = tmp_path / name / "result.json"
        path.parent.mkdir()
        path.write_text(text)
        assert read_result(path) == (None, WHY[name]), name
    # every reader goes through the one check: stale_reason calls a parsed bad one malformed
    assert stale_reason({**good, "value": "oops"}) == (MALFORMED, "value is not a finite number")


@pytest.fixture
def root(good, tmp_path) -> Path:
    """A results root with the good result and every malformed shape beside it."""
    root = tmp_path / "results"
    write_json_atomic(root / "runs" / "good" / "result.json", good)
    for name, text in shapes(good).items():
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "result.json").write_text(text)
    return root


def test_tables_skip_each_bad_file_with_one_counted_line(root, capsys):
    from qsim.tables import cmd_tables

    cmd_tables(["--results", str(root)])  # `qsim tables`, in this process
    [line] = [ln for ln in capsys.readouterr().out.splitlines() if "malformed" in ln]
    n = len(WHY)
    assert line.startswith(f"qsim tables: skipped {n} malformed result files: runs/config-changes-list/result.json "
                           "(config_changes is not an object), ") and line.endswith(f", and {n - 5} more")
    md = (root / "tables" / "table2.md").read_text()
    assert "| tiny-opt (32) [test, all windows, gptq protocol] | missing / - | 33.00 / - |" in md  # the good one
    assert f"skipped {n} malformed result files" in (root / "tables" / "index.md").read_text()


def test_every_reader_skips_them(root):
    skipped = []
    assert [r["_path"] for r in load_all_results(root, skipped)] == [str(root / "runs" / "good" / "result.json")]
    assert {Path(p).parent.name: why for p, why in skipped} == WHY
    frame = load(root)
    assert list(frame["value"]) == [33.0] and len(frame.attrs["skipped"]) == len(WHY)


def test_only_bad_files_still_say_so(root):
    (root / "runs" / "good" / "result.json").unlink()
    lines = build_all(root, root / "tables")
    assert lines[0].startswith(f"qsim tables: skipped {len(WHY)} malformed result files: ") and "no results yet" in lines[1]


@pytest.mark.parametrize("name", sorted(WHY))
def test_a_sweep_never_reuses_a_malformed_result_of_its_job(name, good, tmp_path):
    root = tmp_path / "results"
    path = root / "runs" / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(shapes(good)[name])
    malformed = []
    found, stale = find_result(root, good, malformed)
    assert found is None and stale == []
    text = path.read_text()
    named = good["identity"] in text or good["config_hash"] in text  # the cheap filter reads only these
    assert malformed == ([(path, WHY[name])] if named else [])


def test_the_sweep_reruns_the_job_and_its_summary_counts_the_file(good, tmp_path, monkeypatch):
    """A sweep job as Hydra's basic launcher runs it (in this process), then the sweep's summary."""
    from qsim.sweep import JobInfo, compose_jobs, run_sweep_job, summarize, summary_lines

    root = tmp_path / "results"
    monkeypatch.setenv("QSIM_RESULTS_DIR", str(root))
    bad = root / "runs" / "oops" / "result.json"
    write_json_atomic(bad, {**good, "value": "oops"})
    overrides = ["+experiment=smoke", "format=w4a4", "method=abfp", "task.max_windows=1", "task.seq_len=32", "progress=false"]
    [c] = compose_jobs([overrides])
    out_dir = root / "multirun" / "sweep" / "0"
    (out_dir / ".hydra").mkdir(parents=True)  # what Hydra makes before a job runs
    value = run_sweep_job(c, JobInfo(0, overrides, out_dir, "hydra._internal.core_plugins.basic_launcher.BasicLauncher"))
    assert isinstance(value, float) and value == json.loads((out_dir / "result.json").read_text())["value"]
    status = json.loads((out_dir / "status.json").read_text())
    assert status["status"] == "done" and status["malformed"] == [[str(bad), "value is not a finite number"]]
    lines = summary_lines(summarize(out_dir.parent))
    assert lines[0].startswith("qsim sweep: 1 jobs: 1 done, 0 skipped, 0 failed")
    assert lines[1] == "  skipped 1 malformed result file: runs/oops/result.json (value is not a finite number) (never reused)"
    assert json.loads(bad.read_text())["value"] == "oops"  # left as it was: results are the user's files


def test_the_published_check_names_a_malformed_entry(tmp_path):
    from qsim.published import load_published, stale_entries

    path = tmp_path / "x.json"
    path.write_text("[]")
    entry = type("Entry", (), {"id": "x", "path": path})()  # what stale_entries reads of a manifest entry
    assert stale_entries({"x": entry}) == [(entry, (MALFORMED, "top level is list, not an object"))]
    with pytest.raises(ValueError, match=r"^published entry x \(x.json\): malformed result file \(top level is list"):
        load_published(entry)
