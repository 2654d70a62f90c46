"""Sweeps: real `qsim run -m` subprocesses on the tiny random OPT (+experiment=smoke).

Resume after SIGKILL (submitit_local), fail-soft, a fresh process per job under
joblib, one run per identity even when duplicates race, never a stale result
reused (another numerics version, a changed default, changed data, another
environment or none recorded); and the
paper experiments: every job composes, and together they cover every paper cell.
"""
import copy
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from qsim import NUMERICS_VERSION
from qsim.config import CONF_DIR
from qsim.methods import METHODS
from qsim.results import identity, stale_reason, write_json_atomic
from qsim.sweep import compose_jobs, conf_context, expand_jobs, find_result, job_identity
from qsim.tables import Column, load_paper, planned_cell, runnable_models

from conftest import cfg

QSIM = [sys.executable, "-m", "qsim.cli"]
SMOKE = ["+experiment=smoke", "format=w4a4", "progress=false"]


def sweep(results: Path, *args, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "QSIM_RESULTS_DIR": str(results)}
    return subprocess.run([*QSIM, "run", "-m", *SMOKE, *args], capture_output=True, text=True, env=env, timeout=timeout)


def results_by_hash(results: Path) -> dict[str, list[Path]]:
    """Every result.json under results, by config hash; each must be complete JSON."""
    out: dict[str, list[Path]] = {}
    for path in results.rglob("result.json"):
        item = json.loads(path.read_text())  # a partial file would raise here
        assert isinstance(item["value"], float) and item["config_hash"]
        out.setdefault(item["config_hash"], []).append(path)
    return out


def sweep_dirs(results: Path) -> list[Path]:
    return sorted(p.parent for p in results.glob("multirun/*/*/multirun.yaml"))


def statuses(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/status.json"))]


def summary_line(proc) -> str:
    return next(ln for ln in proc.stdout.splitlines() if ln.startswith("qsim sweep:"))


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    results = tmp_path / "results"
    # a hub model that is not in the cache passes the checks before load (offline, its config is
    # not at hand) and fails while loading: a real run-time failure
    args = ["method=abfp", "task.max_windows=1", "model.hf_id=qsim-test/not-in-cache", "model.source=hub,tiny-opt"]
    proc = sweep(results, *args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "qsim sweep: 2 jobs: 1 done, 0 skipped, 1 failed" in summary_line(proc)
    assert "could not load 'qsim-test/not-in-cache'" in proc.stdout  # the summary names the failure
    [first] = sweep_dirs(results)
    failed, done = statuses(first)
    assert failed["status"] == "failed" and "model.source=hub" in failed["overrides"]
    assert failed["error"].startswith("ModelLoadError: could not load 'qsim-test/not-in-cache'")
    assert "Traceback" in Path(failed["traceback"]).read_text()
    assert done["status"] == "done" and Path(done["result"]).exists()
    assert json.loads((first / "summary.json").read_text())["failed"] == 1

    # again: the finished job is skipped with one line, the failed one is tried again
    again = sweep(results, *args)
    assert again.returncode == 1
    assert "qsim sweep: 2 jobs: 0 done, 1 skipped, 1 failed" in summary_line(again)
    skip_lines = [ln for ln in again.stdout.splitlines() + again.stderr.splitlines() if "skip job #1" in ln]
    assert len(skip_lines) == 1 and done["result"] in skip_lines[0]
    assert [len(v) for v in results_by_hash(results).values()] == [1]


def _group_alive(pgid: int) -> bool:
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                return True
        except (psutil.Error, ProcessLookupError):
            continue
    return False


def test_sigkill_midway_then_restart_loses_nothing_and_runs_nothing_twice(tmp_path):
    results = tmp_path / "results"
    # 3 jobs, started together by submitit_local: one finishes in a second, two take several more
    args = ["hydra/launcher=submitit_local", "method=none", "task.seq_len=64", "task.max_windows=1,24,25"]
    env = {**os.environ, "QSIM_RESULTS_DIR": str(results)}
    proc = subprocess.Popen([*QSIM, "run", "-m", *SMOKE, *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(results.rglob("result.json")):
        assert proc.poll() is None, "the sweep ended before any result appeared"
        assert time.time() < deadline, "no result.json within 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and every job process (one process group)
    proc.wait()
    while _group_alive(proc.pid):
        time.sleep(0.1)

    before = {h: paths[0].read_bytes() for h, paths in results_by_hash(results).items()}
    completed = len(before)
    assert 1 <= completed <= 3

    again = sweep(results, *args)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"3 jobs: {3 - completed} done, {completed} skipped, 0 failed" in summary_line(again)
    after = results_by_hash(results)
    assert len(after) == 3, "every job has a result"
    assert all(len(paths) == 1 for paths in after.values()), "no job ran twice"
    for h, content in before.items():
        assert after[h][0].read_bytes() == content, "a result finished before the kill was rewritten"
    restart = statuses(sweep_dirs(results)[-1])
    assert sorted(s["status"] for s in restart) == sorted(["skipped"] * completed + ["done"] * (3 - completed))
    assert {s["config_hash"] for s in restart if s["status"] == "skipped"} == set(before)


def test_joblib_runs_each_job_in_a_fresh_process_and_duplicates_run_once(tmp_path):
    results = tmp_path / "results"
    # two workers, three jobs: a worker is reused; the two seq_len=48 jobs are the same config
    args = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=none", "task.max_windows=1",
            "task.seq_len=48,48,32"]
    proc = sweep(results, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 jobs: 2 done, 1 skipped, 0 failed" in summary_line(proc)
    jobs = statuses(sweep_dirs(results)[-1])
    ran = [s for s in jobs if s["status"] == "done"]
    assert len({s["pid"] for s in jobs}) < len(jobs), "a joblib worker ran more than one job"
    assert len({s["job_pid"] for s in ran}) == 2 and not {s["job_pid"] for s in ran} & {s["pid"] for s in jobs}
    assert all(len(paths) == 1 for paths in results_by_hash(results).values())

    # the child's config hash is the parent's: a second sweep skips everything
    again = sweep(results, *args)
    assert "3 jobs: 0 done, 3 skipped, 0 failed" in summary_line(again)


# ------------------------------------------------------------ identity: a stale result is never reused

BUMPED = [sys.executable, "-c", "import qsim; qsim.NUMERICS_VERSION += 1\nfrom qsim.cli import main; main()"]


def test_a_bumped_numerics_version_reruns_the_job_and_the_table_ignores_the_old_result(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "QSIM_RESULTS_DIR": str(results)}
    args = ["method=abfp", "task.max_windows=1", "task.seq_len=32"]
    first = sweep(results, *args)
    assert "1 jobs: 1 done, 0 skipped" in summary_line(first), first.stderr[-2000:]
    # the same sweep after a commit that bumps NUMERICS_VERSION
    bumped = subprocess.run([*BUMPED, "run", "-m", *SMOKE, *args], capture_output=True, text=True, env=env, timeout=240)
    assert "1 jobs: 1 done, 0 skipped" in summary_line(bumped), bumped.stderr[-2000:]
    [rerun] = [ln for ln in bumped.stdout.splitlines() + bumped.stderr.splitlines() if "re-run job #0" in ln]
    assert f"older numerics version (made under numerics version {NUMERICS_VERSION}, now {NUMERICS_VERSION + 1})" in rerun
    versions = sorted(json.loads(p.read_text())["numerics_version"] for p in results.rglob("result.json"))
    assert versions == [NUMERICS_VERSION, NUMERICS_VERSION + 1]

    tables = subprocess.run([*BUMPED, "tables"], capture_output=True, text=True, env=env, timeout=120)
    assert tables.returncode == 0, tables.stderr[-2000:]
    assert tables.stdout.splitlines()[0] == "qsim tables: ignored 1 stale result (1 older numerics version)"
    md = (results / "tables" / "table2.md").read_text()
    [row] = [ln for ln in md.splitlines() if ln.startswith("| tiny-opt (32)")]
    assert "[1]" not in row and "results match" not in md  # one result fills the cell, not both


def test_a_changed_default_changes_the_identity_and_the_old_result_is_not_reused(tmp_path):
    job = job_identity(cfg("model=tiny-opt", "format=w4a4", "method=mse"))
    assert job["config"]["mse"]["candidates"] == 100
    # what run.py wrote for this job when mse.candidates defaulted to 50
    old_config = copy.deepcopy(job["config"])
    old_config["mse"]["candidates"] = 50
    old = {"value": 123.0, "config": old_config, "config_changes": job["config_changes"], "config_hash": job["config_hash"],
           "data": job["data"], "numerics_version": NUMERICS_VERSION, "environment": job["environment"],
           "identity": identity(old_config, job["data"], NUMERICS_VERSION, job["environment"]["identity"]),
           "finished_at": "2026-01-01T10:00:00+0000"}
    assert old["config_hash"] == job["config_hash"]  # the config as asked for is the same ...
    assert old["identity"] != job["identity"]  # ... what made the number is not
    path = tmp_path / "results" / "runs" / "old" / "result.json"
    write_json_atomic(path, old)
    assert stale_reason(json.loads(path.read_text())) == ("defaults changed", "mse.candidates 50 -> 100")
    done, stale = find_result(tmp_path / "results", job)
    assert done is None and stale == [(path, ("defaults changed", "mse.candidates 50 -> 100"))]


def test_a_published_entry_is_a_finished_result_of_its_job(tmp_path):
    """results/published/<id>.json is the whole result.json plus its commit: a sweep job with its
    identity is skipped (make table10-offline renders the published cells without re-running)."""
    job = job_identity(cfg("model=tiny-opt", "format=w4a4", "method=abfp"))
    fields = {k: job[k] for k in ("config_hash", "data", "identity", "environment")}
    published = tmp_path / "results" / "published" / "tiny-w4a4.json"
    write_json_atomic(published, {"value": 1.0, "config": job["config"], "config_changes": job["config_changes"],
                                  **fields, "numerics_version": NUMERICS_VERSION,
                                  "finished_at": "2026-01-01T10:00:00+0000", "published": {"commit": "0" * 40}})
    write_json_atomic(tmp_path / "results" / "published" / "other.json",
                      {"value": 2.0, "identity": "0" * 16, "config_hash": "1" * 16, "numerics_version": NUMERICS_VERSION})
    assert find_result(tmp_path / "results", job) == (published, [])


def made_elsewhere(path: Path, result: dict, **identity_changes) -> dict:
    """Store `result` as the same run in another environment would have written it: its
    environment's identity part changed, its identity recomputed from it (as run.py computes it)."""
    result = copy.deepcopy(result)
    env = result["environment"]["identity"]
    for key, value in identity_changes.items():
        env[key] = {**env[key], **value} if isinstance(value, dict) else value
    result["identity"] = identity(result["config"], result["data"], result["numerics_version"], env)
    write_json_atomic(path, result)
    return result


def test_a_result_from_another_environment_is_rerun_and_the_table_ignores_it(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "QSIM_RESULTS_DIR": str(results)}
    args = ["method=abfp", "task.max_windows=1", "task.seq_len=32"]
    first = sweep(results, *args)
    assert "1 jobs: 1 done, 0 skipped" in summary_line(first), first.stderr[-2000:]
    [path] = list(results.rglob("result.json"))
    result = json.loads(path.read_text())
    recorded = result["environment"]
    transformers = importlib.metadata.version("transformers")
    assert recorded["identity"]["packages"]["transformers"] == transformers and recorded["packages"]["python"]
    assert recorded["identity"]["weights"] == {"generated": "the config (architecture, size, model.seed)"}
    assert recorded["threads"] >= 1 and recorded["cpu"]["capability"] and recorded["blas"]["mkl_cbwr"] == "AUTO,STRICT"
    assert stale_reason(result) is None
    # the same job, made with another transformers
    made_elsewhere(path, result, packages={"transformers": "5.0.0-other"})
    detail = f"transformers 5.0.0-other -> {transformers}"
    assert stale_reason(json.loads(path.read_text())) == ("other environment", detail)
    again = sweep(results, *args)
    assert "1 jobs: 1 done, 0 skipped" in summary_line(again), again.stderr[-2000:]
    [rerun] = [ln for ln in again.stdout.splitlines() + again.stderr.splitlines() if "re-run job #0" in ln]
    assert f"is stale: other environment ({detail})" in rerun
    tables = subprocess.run([*QSIM, "tables"], capture_output=True, text=True, env=env, timeout=120)
    assert tables.returncode == 0, tables.stderr[-2000:]
    assert tables.stdout.splitlines()[0] == "qsim tables: ignored 1 stale result (1 other environment)"


def test_a_result_without_an_environment_is_stale_and_not_reused(tmp_path):
    """Results written before the environment entered the identity are never reused."""
    job = job_identity(cfg("model=tiny-opt", "format=w4a4", "method=abfp"))
    old = {k: v for k, v in job.items() if k != "environment"}
    old.update(value=1.0, identity=identity(job["config"], job["data"]), finished_at="2026-01-01T10:00:00+0000")
    path = tmp_path / "results" / "runs" / "old" / "result.json"
    write_json_atomic(path, old)
    kind, detail = stale_reason(json.loads(path.read_text()))
    assert kind == "made before environment identities" and "records no environment" in detail
    done, stale = find_result(tmp_path / "results", job)
    assert done is None and [(p, k) for p, (k, _) in stale] == [(path, kind)]


def test_a_changed_data_file_changes_the_identity_of_the_runs_that_read_it(tmp_path, monkeypatch):
    source = Path(os.environ["QSIM_DATA_DIR"])
    copy_dir = tmp_path / "data"
    for rel in ("wikitext-2-raw-v1/test.jsonl", "ptb/test.txt"):
        (copy_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / rel, copy_dir / rel)
    monkeypatch.setenv("QSIM_DATA_DIR", str(copy_dir))
    rptq, plain = cfg("model=tiny-opt", "format=w4a4", "method=rptq"), cfg("model=tiny-opt", "format=w4a4", "method=none")
    before = {name: job_identity(c) for name, c in (("rptq", rptq), ("none", plain))}
    assert [e["dataset"] for e in before["rptq"]["data"]["calib"]] == ["ptb"] and "calib" not in before["none"]["data"]
    result = {**before["rptq"], "value": 1.0}
    with open(copy_dir / "ptb" / "test.txt", "a") as f:
        f.write(" a corrected line\n")
    assert job_identity(rptq)["identity"] != before["rptq"]["identity"]  # calibrates on PTB
    assert job_identity(plain)["identity"] == before["none"]["identity"]  # never reads it
    assert stale_reason(result) == ("data changed", "data differs: calib (ptb test)")
    with open(copy_dir / "wikitext-2-raw-v1" / "test.jsonl", "a") as f:
        f.write(json.dumps({"text": " one more line"}) + "\n")
    assert job_identity(plain)["identity"] != before["none"]["identity"]


# ------------------------------------------------------------ the paper experiments

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
PAPER_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith(("table", "figure")) and not e.endswith("-offline")]


@pytest.fixture(scope="module")
def composed():
    """experiment -> [(job overrides, config)], every job composed once; a job that does not
    compose (e.g. a method preset missing from conf/method/) fails every test that uses it."""
    with conf_context():
        jobs = {e: expand_jobs([f"+experiment={e}"]) for e in EXPERIMENTS}
        configs = iter(compose_jobs([job for e in EXPERIMENTS for job in jobs[e]]))
    out = {}
    for e in EXPERIMENTS:
        out[e] = []
        for job in jobs[e]:
            cfg = next(configs)
            if isinstance(cfg, Exception):
                raise AssertionError(f"{e}: {job}: {cfg}")
            out[e].append((job, cfg))
    return out


def _cell(cfg):
    from omegaconf import OmegaConf

    calibrated = any(METHODS[s].needs_calibration for s in cfg.method.steps)
    return planned_cell(OmegaConf.to_container(cfg, resolve=True), calibrated)


def test_experiments_are_the_paper_tables_and_figures():
    names = {f"table{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 10)} | {"figure3", "figure4", "figure5"}
    assert set(PAPER_EXPERIMENTS) == names
    assert {e for e in EXPERIMENTS if e.endswith("-offline")} == {f"{n}-offline" for n in names}


@pytest.mark.parametrize("experiment", PAPER_EXPERIMENTS)
def test_experiment_covers_every_paper_cell_and_its_offline_variant_the_same_columns(experiment, composed):
    from qsim.config import validate

    good = composed[experiment]
    offline = composed[f"{experiment}-offline"]
    for _, cfg in good + offline:
        validate(cfg)
    cells = {_cell(cfg) for _, cfg in good}
    paper = load_paper()
    if experiment.startswith("table"):
        roman = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII", 10: "X"}[int(experiment[5:])]
        wanted = {(p.row, p.column) for p in paper if p.table == roman and p.row.model in runnable_models()}
    else:  # the figures: Table II's rows (seq_len 1024 / 256), each series at n = 64 and 128
        series = {"figure3": [("e1m2", "e1m2", "abfp")], "figure4": [("int4", "int4", "abfp"), ("int4", "int4", "abfp-qat")],
                  "figure5": [("int4", "int8", "abfp"), ("int4", "int8", "abfp-qat")]}[experiment]
        rows = list(dict.fromkeys(p.row for p in paper if p.table == "II"))
        wanted = {(r, Column(w, a, m, n)) for r in rows for (w, a, m) in series for n in (64, 128)}
    assert wanted <= cells, sorted(wanted - cells, key=str)[:5]
    assert all(row.is_paper_eval for row, _ in cells)  # whole validation split, run_clm, paper checkpoint, no variant
    # offline: one SmolLM2 perplexity row with a small window count (table10: and its offline tasks), the same columns
    ppl = [(job, cfg) for job, cfg in offline if cfg.task.name == "wikitext2"]
    assert {cfg.model.name for _, cfg in ppl} == {"smollm2-135m"}
    assert all(cfg.task.max_windows and cfg.task.max_windows <= 16 for _, cfg in ppl)
    tasks = {(cfg.model.name, cfg.task.name) for _, cfg in offline}
    assert tasks == ({("smollm2-135m", "wikitext2"), ("smollm2-135m", "squad"), ("smollm2-135m", "sst2"), ("minilm", "stsb")}
                     if experiment == "table10" else {("smollm2-135m", "wikitext2")})
    assert {_cell(cfg)[1] for _, cfg in offline} == {col for _, col in cells}
    assert all(_cell(cfg)[0].variant == () for _, cfg in offline)  # one offline row: each job is its cell's definition


def test_the_opt_rows_name_the_paper_checkpoints(composed):
    good = composed["table2"]
    ids = {cfg.model.paper_hf_id for _, cfg in good}
    assert {cfg.model.checkpoint for _, cfg in good} == {"paper"}
    assert ids == {"Aalaa/opt-125m-finetuned-wikitext2", "lnair/opt-350m-wikitext2", "lnair/opt-1.3b-wikitext2",
                   "lnair/opt-2.7b-wikitext2"}

