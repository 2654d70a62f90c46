"""A non-editable install works on its own: `pip install .` into a fresh virtual environment
(on top of the installed dependencies, no index), then `qsim` from another directory finds
conf/ (presets, experiments, launchers) and the paper's numbers as package data."""
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cfg, pinned
from qsim.run import run

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"conf": REPO / "conf", "paper": REPO / "results" / "paper"}  # qsim/<name> -> repo folder
NOT_SOURCE = {".git", ".venv", "build", "dist", ".pytest_cache", ".benchmarks", "__pycache__"}


def _copy_source(dest: Path) -> Path:
    """The working tree without git, build leftovers and results (except the paper's numbers).
    pip builds in the source folder: a copy keeps build/ and *.egg-info out of the repo, and a
    stale build/lib (a file deleted since) out of the wheel."""
    def ignore(folder, names):
        skip = {n for n in names if n in NOT_SOURCE or n.endswith(".egg-info")}
        if Path(folder) == REPO / "results":
            skip |= {n for n in names if n != "paper"}
        return skip

    return Path(shutil.copytree(REPO, dest, symlinks=True, ignore=ignore))  # qsim/conf stays a symlink


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix in (".yaml", ".md", ".csv")}


def test_wheel_install_runs_from_another_directory(tmp_path):
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed dependencies are this interpreter's, whether it is the system's or a venv's:
    # --system-site-packages would give a venv's base interpreter's instead (without qsim's
    # dependencies, with an old setuptools and no bdist_wheel). A .pth lists this interpreter's
    # site-packages as plain folders, so their own .pth files (the editable qsim's) do not run.
    # --without-pip: this interpreter's pip installs into the venv (ensurepip would add ~10 s).
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    outer = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (Path(purelib) / "_qsim_test_outer.pth").write_text("".join(f"{d}\n" for d in outer if Path(d).is_dir()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing may shadow the venv's qsim
    env.update(QSIM_RESULTS_DIR=str(elsewhere / "results"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

    def call(*args, timeout=120):
        proc = subprocess.run([str(a) for a in args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc.stdout

    source = _copy_source(tmp_path / "src")
    # no build isolation: the lock's setuptools (the dev extra) builds the wheel, offline
    call(python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet", source)
    installed = Path(call(python, "-c", "import qsim; print(qsim.__file__)").strip()).parent
    assert installed.is_relative_to(venv) and not installed.is_symlink(), installed  # not the editable checkout
    for name, folder in SHIPPED.items():
        assert not (installed / name).is_symlink()  # real copies, not links back into a checkout
        assert _files(installed / name) == _files(folder), name

    formats = call(venv / "bin" / "qsim", "formats")
    assert " e4m3 " in formats and " 448 " in formats

    # a one-job sweep of the smoke experiment (conf/experiment/), then the same job as a plain run:
    # the tiny OPT, W4A8, one window of 64 tokens
    qsim = venv / "bin" / "qsim"
    call(qsim, "run", "-m", "+experiment=smoke", "format=w4a8", "method=none", "task.max_windows=1", "progress=false")
    call(qsim, "run", "model=tiny-opt", "format=w4a8", "task.seq_len=64", "task.max_windows=1", "progress=false")
    results = [json.loads(p.read_text()) for p in (elsewhere / "results").rglob("result.json")]
    assert len(results) == 2 and {r["model"] for r in results} == {"tiny-opt"}
    assert all(r["tokens_evaluated"] == 64 and r["versions"]["git"] is None for r in results)  # a wheel: no git sha
    # the checkout's number, and the pinned one
    checkout = run(cfg("model=tiny-opt", "format=w4a8", "task.seq_len=64", "task.max_windows=1", "progress=false"),
                   tmp_path / "checkout")
    for result in results:
        assert result["config_hash"] == checkout["config_hash"]
        assert result["value"] == pytest.approx(checkout["value"], rel=1e-6)
        assert pinned(result["value"], TINY_OPT_W4A8_PPL), result["value"]

    tables = call(qsim, "tables")
    assert "Table II     0/16 paper cells ours" in tables  # the paper's 16 cells: its CSV was found


TINY_OPT_W4A8_PPL = 518.7591213096783  # tiny OPT (seed 0), W4A8, WikiText-2 test, 1 window of 64 bytes
