"""Sweeps that survive being killed: resume, fail-soft, a summary at the end.

Hydra's multirun has none of these, so every multirun job goes through
`run_sweep_job`:

- **Resume**: a job whose identity (results.identity: the whole resolved
  config, the data it reads, qsim's numerics version, the environment's
  package versions, weights identity and BLAS mode; computed before any
  model loads) already has a complete, fresh result.json anywhere under the
  results root is skipped with one line. A stale result of the same config
  (another numerics version, changed data or defaults, another environment)
  is never reused: the job re-runs and says why in one line. Nor is a malformed
  one (results.result_problem): the job runs, and its status and the summary
  count the file. Writes are atomic (results.write_json_atomic), so "exists"
  means "complete".
- **No job runs twice at once**: the job holds an flock on
  `<root>/multirun/.locks/<identity>.lock` while it checks and runs; a duplicate
  job waits, then finds the result and skips. The kernel drops the lock when
  a process dies, even by SIGKILL.
- **Fail-soft**: an exception is written to the job's traceback.txt and its
  status.json; the job returns normally so the sweep goes on.
- **Summary**: `SweepSummary` (a Hydra callback) counts done, skipped and
  failed jobs from the status files when the sweep ends, writes summary.json
  and exits 1 if any job failed.
- **Fresh process per job under joblib (and ray)**: they reuse worker
  processes, so state one job leaves behind (torch settings, registries,
  modules a method patched) could leak into the next; each job runs in a child
  process instead, and a crash (segfault, OOM kill) fails only that job.

Every job writes only inside its own folder, plus its own lock file; nothing
appends to a shared file.

`QSIM_RESUME=0` re-runs jobs that already have a result.
"""
from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .results import (RESULT_FILE, malformed_line, read_result, result_paths, stale_reason, why_different,
                      write_json_atomic)

log = logging.getLogger("qsim")

STATUS_FILE = "status.json"
TRACEBACK_FILE = "traceback.txt"
SUMMARY_FILE = "summary.json"
LOCK_DIR = Path("multirun") / ".locks"  # inside a git-ignored folder
EXPECTED_IDENTITY_ENV = "QSIM_EXPECTED_IDENTITY"


def results_root() -> Path:
    """The results root, as conf/config.yaml computes it for hydra.run/sweep.dir."""
    return Path(os.environ.get("QSIM_RESULTS_DIR", "results"))


def resume_enabled() -> bool:
    return os.environ.get("QSIM_RESUME", "1").strip().lower() not in ("0", "false", "no", "off")


def job_identity(cfg) -> dict:
    """The identity fields run.py stores in result.json (the job config without the hydra node),
    plus the resolved config they were computed from."""
    from omegaconf import OmegaConf

    from .run import run_identity

    return {**run_identity(cfg), "config": OmegaConf.to_container(cfg, resolve=True)}


def find_result(root: Path, job: dict, malformed: list | None = None) -> tuple[Path | None, list[tuple[Path, tuple[str, str]]]]:
    """The newest complete, fresh result under root (a result.json, or a published entry: the
    same result) with the job's identity (or None), and the stale results of the same config as
    asked for (config_hash or identity), each with why. A file naming the job that is malformed
    (results.result_problem) is never reused: it goes to `malformed` as (path, why)."""
    ident, chash = job["identity"], job["config_hash"]
    needles = (f'"identity": "{ident}"', f'"config_hash": "{chash}"')
    fresh, stale = [], []
    for path in result_paths(root):
        try:
            if not any(n in path.read_text(errors="replace") for n in needles):  # cheap filter before parsing
                continue
        except OSError:
            continue
        item, why = read_result(path)
        if item is None:
            if malformed is not None:
                malformed.append((path, why))
            continue
        if item.get("identity") == ident:
            reason = stale_reason(item)  # e.g. an explicit value that was the default when it ran
        elif item.get("config_hash") == chash:
            reason = why_different(item, job)
        else:
            continue
        if reason is None:
            fresh.append((item.get("finished_at", ""), str(path)))
        else:
            stale.append((path, reason))
    return (Path(max(fresh)[1]) if fresh else None), stale


@contextlib.contextmanager
def identity_lock(root: Path, ident: str):
    """Exclusive per-identity lock; released on close or when the process dies."""
    lock_dir = Path(root) / LOCK_DIR
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{ident}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class JobFailed(RuntimeError):
    """A job that ran in a child process and failed; the child wrote the traceback."""

    def __init__(self, message: str, traceback_path: Path | None):
        super().__init__(message)
        self.traceback_path = traceback_path


@dataclass
class JobInfo:
    num: int
    overrides: list[str]
    out_dir: Path
    launcher: str

    @classmethod
    def current(cls) -> "JobInfo":
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        return cls(num=int(hc.job.num), overrides=list(hc.overrides.task), out_dir=Path(hc.runtime.output_dir),
                   launcher=str(hc.launcher.get("_target_", "")))

    @property
    def label(self) -> str:
        return f"job #{self.num} [{' '.join(self.overrides)}]"


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def needs_fresh_process(launcher_target: str) -> bool:
    """joblib (and ray) reuse their workers; basic runs jobs one after another in the
    launching process (the same as a single run); submitit starts a process per job."""
    return any(name in launcher_target.lower() for name in ("joblib", "ray"))


def _write_status(job: JobInfo, status: str, ident: dict, started: float, **extra) -> dict:
    record = {
        "status": status,
        "job_num": job.num,
        "overrides": job.overrides,
        "config_hash": ident["config_hash"],
        "identity": ident["identity"],
        "pid": os.getpid(),
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }
    write_json_atomic(job.out_dir / STATUS_FILE, record)
    return record


def _write_traceback(out_dir: Path, err: BaseException) -> Path:
    path = out_dir / TRACEBACK_FILE
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(err)))
    return path


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def run_sweep_job(cfg, job: JobInfo | None = None) -> float | None:
    """One multirun job: skip if done, else run it and record done or failed. Never raises
    for a failing job (KeyboardInterrupt and SystemExit still stop the sweep)."""
    job = job or JobInfo.current()
    started = time.time()
    try:
        ident = job_identity(cfg)
    except Exception as err:  # noqa: BLE001 - e.g. its data is missing: this job fails, the sweep goes on
        message, tb_path = _one_line(err), _write_traceback(job.out_dir, err)
        _write_status(job, "failed", {"config_hash": None, "identity": None}, started, error=message, traceback=str(tb_path))
        log.error("FAILED %s: %s (traceback: %s)", job.label, message, tb_path)
        return None
    root = results_root()
    with identity_lock(root, ident["identity"]):
        malformed: list = []
        existing, stale = find_result(root, ident, malformed) if resume_enabled() else (None, [])
        found = read_result(existing)[0] if existing is not None else None  # checked again: it is reused
        bad = {"malformed": [[str(p), why] for p, why in malformed]} if malformed else {}
        if malformed:
            log.warning("%s: %s", job.label, malformed_line(malformed, root))
        if found is not None:
            _write_status(job, "skipped", ident, started, result=str(existing), value=found["value"], **bad)
            log.info("skip %s: identity %s already has %s", job.label, ident["identity"], existing)
            return found["value"]
        if stale:
            path, (kind, detail) = stale[0]
            more = f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""
            log.info("re-run %s: the result %s%s of this config is stale: %s (%s)", job.label, path, more, kind, detail)
        job_pid = os.getpid()
        try:
            if needs_fresh_process(job.launcher):
                value, job_pid = _run_in_child(cfg, job, ident["identity"])
            else:
                from .run import run

                value = run(cfg, job.out_dir)["value"]
        except Exception as err:  # noqa: BLE001 - fail-soft: any job error is recorded, the sweep goes on
            if isinstance(err, JobFailed):
                message, tb_path = str(err), err.traceback_path
            else:
                message, tb_path = _one_line(err), _write_traceback(job.out_dir, err)
            _write_status(job, "failed", ident, started, error=message,
                          traceback=str(tb_path) if tb_path else None, **bad)
            log.error("FAILED %s: %s (traceback: %s)", job.label, message, tb_path)
            return None
    _write_status(job, "done", ident, started, result=str(job.out_dir / RESULT_FILE), value=value, job_pid=job_pid, **bad)
    return value


# ------------------------------------------------------------ fresh process per job

def _run_in_child(cfg, job: JobInfo, ident: str) -> tuple[float, int]:
    """Run the job in `python -m qsim.sweep <out_dir>` (the config goes over stdin);
    returns its value and the child's pid."""
    from omegaconf import OmegaConf

    env = {**os.environ, EXPECTED_IDENTITY_ENV: ident}
    text = OmegaConf.to_yaml(cfg, resolve=True)
    proc = subprocess.Popen([sys.executable, "-m", "qsim.sweep", str(job.out_dir)], stdin=subprocess.PIPE, text=True, env=env)
    proc.communicate(text)
    if proc.returncode == 0:
        return json.loads((job.out_dir / RESULT_FILE).read_text())["value"], proc.pid
    tb_path = job.out_dir / TRACEBACK_FILE
    if tb_path.exists():
        lines = [ln for ln in tb_path.read_text().splitlines() if ln.strip()]
        raise JobFailed(lines[-1] if lines else "failed", tb_path)
    if proc.returncode < 0:
        raise JobFailed(f"job process killed by {signal.Signals(-proc.returncode).name}", None)
    raise JobFailed(f"job process exited with code {proc.returncode}", None)


def _child_main(out_dir: str) -> int:
    """Entry point of the child: rebuild the typed config, check the identity, run."""
    import yaml
    from omegaconf import OmegaConf

    from .config import RunConfig
    from .run import run

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    out = Path(out_dir)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.create(yaml.safe_load(sys.stdin.read())))
        expected = os.environ.get(EXPECTED_IDENTITY_ENV)
        if expected and job_identity(cfg)["identity"] != expected:
            raise RuntimeError(f"identity changed in the child process ({job_identity(cfg)['identity']} != {expected})")
        run(cfg, out)
    except Exception as err:  # noqa: BLE001 - reported to the parent through traceback.txt
        _write_traceback(out, err)
        print(f"qsim: error: {_one_line(err)}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------ summary

def job_dirs(sweep_dir: Path) -> list[Path]:
    """Every job folder Hydra created in a sweep (it writes .hydra/ before the job runs)."""
    return sorted(p.parent for p in Path(sweep_dir).rglob(".hydra") if p.is_dir() and p.parent != Path(sweep_dir))


def summarize(sweep_dir: Path) -> dict:
    """Counts of done, skipped and failed jobs; a job folder with no status died mid-run."""
    jobs = []
    for d in job_dirs(sweep_dir):
        try:
            record = json.loads((d / STATUS_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            record = None
        if not isinstance(record, dict) or record.get("status") not in ("done", "skipped", "failed"):
            record = {"status": "failed", "error": "no status.json: the job process died before finishing"}
        record["dir"] = str(d)
        jobs.append(record)
    counts = {k: sum(j["status"] == k for j in jobs) for k in ("done", "skipped", "failed")}
    malformed = {pair[0]: pair[1] for j in jobs for pair in j.get("malformed") or []
                 if isinstance(pair, list) and len(pair) == 2}  # one entry per file
    return {"sweep_dir": str(sweep_dir), "jobs": len(jobs), **counts,
            "failed_jobs": [j for j in jobs if j["status"] == "failed"],
            "malformed_results": [[p, why] for p, why in sorted(malformed.items())],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def summary_lines(summary: dict) -> list[str]:
    lines = [f"qsim sweep: {summary['jobs']} jobs: {summary['done']} done, {summary['skipped']} skipped, "
             f"{summary['failed']} failed ({Path(summary['sweep_dir']) / SUMMARY_FILE})"]
    for j in summary["failed_jobs"]:
        where = j.get("traceback") or j["dir"]
        lines.append(f"  failed: {' '.join(j.get('overrides', [])) or j['dir']}: {j.get('error')} ({where})")
    if summary.get("malformed_results"):
        lines.append(f"  {malformed_line(summary['malformed_results'], results_root())} (never reused)")
    return lines


try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra < 1.1
    _HydraCallback = object


class SweepSummary(_HydraCallback):
    """Hydra callback (hydra.callbacks.sweep_summary._target_=qsim.sweep.SweepSummary)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        summary = summarize(sweep_dir)
        write_json_atomic(sweep_dir / SUMMARY_FILE, summary)
        print("\n".join(summary_lines(summary)), flush=True)
        if summary["failed"]:
            sys.exit(1)


# ------------------------------------------------------------ experiments

@contextlib.contextmanager
def conf_context():
    """Hydra initialized on conf/; nested uses share the outer one (composing many jobs)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .config import CONF_DIR, register_configs

    if GlobalHydra.instance().is_initialized():
        yield
        return
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qsim"):
            yield
    finally:
        GlobalHydra.instance().clear()


def sweep_params(overrides: list[str]) -> dict[str, str]:
    """hydra.sweeper.params of the config these overrides compose (e.g. an experiment's grid)."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    plain = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides)) if not o.is_sweep_override()]
    with conf_context():
        cfg = compose(config_name="config", overrides=plain, return_hydra_config=True)
        node = cfg.hydra.sweeper.get("params")
        params = OmegaConf.to_container(node, resolve=False) if node else {}
    return {str(k): str(v) for k, v in params.items()}


def compose_jobs(jobs: list[list[str]]) -> list:
    """Each job's run config (hydra node dropped), or the composition error for that job."""
    from hydra import compose

    out = []
    with conf_context():
        for job in jobs:
            try:
                out.append(compose(config_name="config", overrides=list(job)))
            except Exception as err:  # noqa: BLE001 - returned to the caller per job
                out.append(err)
    return out


def merged_overrides(overrides: list[str]) -> list[str]:
    """The experiment's sweeper params, then the command line, one entry per key (the
    command line wins), as Hydra's basic sweeper combines them; sweeps stay sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [f"{k}={v}" for k, v in sweep_params(overrides).items()] + list(overrides)
    by_key = {o.get_key_element(): o.input_line for o in OverridesParser.create().parse_overrides(lines)}
    return list(by_key.values())


def expand_jobs(overrides: list[str]) -> list[list[str]]:
    """Each job's override list: the product of merged_overrides' sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = []
    for o in OverridesParser.create().parse_overrides(merged_overrides(overrides)):
        key = o.get_key_element()
        if o.is_sweep_override():
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([f"{key}={o.get_value_element_as_str()}"])
    return [list(job) for job in itertools.product(*axes)]


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1]))
