"""A fresh clone installs from the lock alone: `make install` into a new virtual environment (its
own site-packages only), then `qsim run` on the tiny OPT. A package missing from
requirements.lock, or an install step missing from the Makefile, fails here, not on a new machine.

The clone is the tracked files as they are in the work tree: on CI, a fresh clone, that is the
commit itself; in a work tree, the change about to be committed, while a file that nobody added to
git is left out, as a clone would leave it out. pip installs offline from a wheelhouse that holds
every wheel the lock names (`~/.cache/qsim/wheelhouse`, or under QSIM_CACHE_DIR): the registry
answers without cache headers, so pip's own cache would fetch ~300 MB on every run. A pin the
wheelhouse lacks is fetched (PyPI, the machine's torch wheel on disk) before the install."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from conftest import pinned
from test_packaging import TINY_OPT_W4A8_PPL

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def lock_pins(path: Path = LOCK) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        if m := PIN.match(line):
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def wheelhouse(pins: dict[str, Version]) -> Path:
    """A folder with a wheel for every pin that installs on this interpreter; missing ones are
    fetched (pip wheel: sdists are built once) into a temp folder and moved in whole."""
    folder = Path(os.environ.get("QSIM_CACHE_DIR", Path.home() / ".cache" / "qsim")) / "wheelhouse"
    folder.mkdir(parents=True, exist_ok=True)
    tags = set(sys_tags())
    have = set()
    for wheel in folder.glob("*.whl"):
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        if tags & set(wheel_tags):
            have.add((name, version))
    missing = [f"{name}=={version}" for name, version in pins.items() if (name, version) not in have]
    if missing:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp, *missing],
                                  capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"fetching {missing}:\n{proc.stderr[-3000:]}"
            for wheel in Path(tmp).glob("*.whl"):
                os.replace(wheel, folder / wheel.name)  # whole files only: a concurrent run never sees half a wheel
    return folder


def copy_tracked(dest: Path) -> Path:
    """The files git tracks, as they are in the work tree (symlinks stay links: qsim/conf)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src, dst = REPO / rel, dest / rel
        if not src.is_symlink() and not src.exists():
            continue  # deleted in the work tree, the deletion not yet committed
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)
    return dest


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_fresh_clone_installs_from_the_lock_and_runs(tmp_path):
    pins = lock_pins()
    assert pins["torch"].local == "cpu" and pins["transformers"] == Version("5.24.0")  # results/published/
    wheels = wheelhouse(pins)
    clone, venv, elsewhere = copy_tracked(tmp_path / "clone"), tmp_path / "venv", tmp_path / "elsewhere"
    elsewhere.mkdir()
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)  # no --system-site-packages
        python = venv / "bin" / "python"

        # Nothing of this process may leak in: its PYTHONPATH, its make, a kernel choice or folder.
        # Bytecode: pip compiles none (all of it would double the install time); each process
        # writes what it imports (PYTHONDONTWRITEBYTECODE dropped), so the later ones start fast.
        drop = {"PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "QSIM_KERNELS", "QSIM_NATIVE_DIR",
                "PYTHONDONTWRITEBYTECODE"}
        env = {k: v for k, v in os.environ.items() if k not in drop}
        # offline, from the wheelhouse only
        env.update(PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels), PIP_COMPILE="0",
                   QSIM_RESULTS_DIR=str(elsewhere / "results"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

        def call(*args, cwd=elsewhere, timeout=300):
            proc = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
            assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            return proc.stdout

        call("make", "install", f"PYTHON={python}", cwd=clone, timeout=600)  # its last step: pip check
        assert list((clone / "qsim" / "_native").glob("qsim_native-*.so"))  # make install compiled the kernels

        # exactly the lock, and pip and qsim: nothing more, nothing less, no other version
        listing = call(python, "-c", "import importlib.metadata as m, json; "
                       "print(json.dumps([[d.metadata['Name'], d.version] for d in m.distributions()]))")
        installed = {canonicalize_name(name): Version(version) for name, version in json.loads(listing)}
        installed.pop("pip")
        assert installed.pop("qsim") == Version("0.1.0")
        wrong = {k: (installed.get(k), pins.get(k)) for k in installed.keys() | pins.keys()
                 if installed.get(k) != pins.get(k)}
        assert not wrong, f"(installed, locked): {wrong}"

        # qsim is the clone's, editable; both offline models are found, in the venv
        found = call(python, "-c", "import qsim; from qsim.models import smollm2_gguf_path, sbert_dir; "
                     "print(qsim.__file__); print(smollm2_gguf_path()); "
                     "print(sbert_dir('sentence-transformers/all-MiniLM-L6-v2'))")
        module, gguf, minilm = (Path(line) for line in found.splitlines())
        assert module.is_relative_to(clone) and gguf.is_file() and gguf.is_relative_to(venv) and minilm.is_relative_to(venv)

        call(venv / "bin" / "qsim", "run", "model=tiny-opt", "format=w4a8", "task.seq_len=64", "task.max_windows=1",
             "progress=false")
        [result] = [json.loads(p.read_text()) for p in (elsewhere / "results").rglob("result.json")]
        assert result["model"] == "tiny-opt" and result["tokens_evaluated"] == 64
        assert result["versions"]["torch"] == str(pins["torch"])
        assert result["versions"]["transformers"] == str(pins["transformers"])
        assert result["kernels"] == "native"
        assert pinned(result["value"], TINY_OPT_W4A8_PPL), result["value"]
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # 1.7 GB, torch's mostly
