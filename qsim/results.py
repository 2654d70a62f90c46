"""Results are data: one atomically written result.json per run, keyed by a config hash."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE = "result.json"


# Keys that cannot change a result (display, device placement).
NON_SEMANTIC = {("progress",), ("model", "device_map")}


def _schema_defaults() -> dict:
    """Every section's dataclass defaults (the group sections too, whose own default is MISSING)."""
    import dataclasses
    import typing

    from omegaconf import OmegaConf

    from .config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    out = {}
    for f in dataclasses.fields(RunConfig):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out[f.name] = OmegaConf.to_container(OmegaConf.structured(kind), resolve=False)
        else:
            out[f.name] = f.default
    return out


def _drop_defaults(values, defaults, path=()):
    """Keep only what differs from the schema's defaults, so adding a config key
    with a default (a qsim upgrade) leaves every existing hash unchanged."""
    if not isinstance(values, dict):
        return values
    out = {}
    for key, value in values.items():
        sub = path + (key,)
        if sub in NON_SEMANTIC:
            continue
        default = defaults.get(key, "???") if isinstance(defaults, dict) else "???"
        if isinstance(value, dict) and isinstance(default, dict):
            kept = _drop_defaults(value, default, sub)
            if kept:
                out[key] = kept
        elif value != default:
            out[key] = value
    return out


def config_hash(resolved: dict) -> str:
    """sha256 of the resolved config's non-default, result-changing values."""
    semantic = _drop_defaults(resolved, _schema_defaults())
    blob = json.dumps(semantic, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def git_sha() -> str | None:
    if not (REPO_ROOT / ".git").exists():  # an installed wheel: not the sha of a repo that happens to enclose it
        return None
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {
        "qsim": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git": git_sha(),
    }


def load_results(root: Path) -> list[dict]:
    """Every complete result.json under root (partial files cannot exist: writes are atomic)."""
    out = []
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            item = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        item["_path"] = str(path)
        out.append(item)
    return out
