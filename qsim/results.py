"""Results are data: one atomically written result.json per run, keyed by its identity.

A result's identity (`identity`) hashes everything that can change its number: the
whole resolved config, the data it read, qsim's numerics version (qsim.NUMERICS_VERSION)
and the environment's part that can move a number (qsim.environment: package versions,
the weights' content identity, the BLAS mode). A result is stale when the identity its
config gets now differs from the stored one (`stale_reason`); sweeps never reuse a stale
result and `qsim tables` never shows one.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from . import NUMERICS_VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE = "result.json"


# Keys that cannot change a result (display, device placement; quant.causal only permits a
# non-causal plan, whose result records causal: false itself).
NON_SEMANTIC = {("progress",), ("model", "device_map"), ("quant", "causal")}

# Keys added to the schema after results existed, with the value that reproduces what ran before
# them. At that value a key is left out of the identity, so adding an option does not make every
# earlier result stale; any other value is part of it like every key.
ADDED_KEYS = {("quant", "accum"): "fp32", ("quant", "accum_chunk"): None, ("task", "max_samples"): None,
              ("model", "family"): None, ("model", "arch"): "", ("task", "max_new_tokens"): 32, ("task", "stride"): 128,
              ("task", "max_answer_tokens"): 30, ("task", "timeout"): 10.0, ("task", "tasks"): [], ("task", "include_path"): None,
              ("fpt", "weight_granularity"): "tensor", ("sensitivity", "seq_len"): 256,
              ("fpt", "attention"): False, ("task", "confirm_run_unsafe_code"): False,
              ("task", "allow_unsandboxed"): False}

# What result.json records about its identity (see `identity_fields`).
IDENTITY_FIELDS = ("identity", "config_hash", "config_changes", "data", "numerics_version")

# Why a result is stale, as `qsim tables` and the sweep count and log them.
NO_IDENTITY = "made before result identities"
OLDER_NUMERICS = "older numerics version"
NEWER_NUMERICS = "newer numerics version"
CONFIG_CHANGED = "defaults changed"
CONFIG_INVALID = "config no longer valid"
DATA_CHANGED = "data changed"
RECIPE_CHANGED = "identity recipe changed"
NO_ENVIRONMENT = "made before environment identities"
OTHER_ENVIRONMENT = "other environment"
MALFORMED = "malformed"  # not a result qsim could have written (result_problem): never reused or shown


@functools.lru_cache(maxsize=1)
def schema_defaults() -> dict:
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
    """Keep only what differs from the schema's defaults (and is semantic)."""
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


def _semantic(values, path=()):
    """The resolved config without the NON_SEMANTIC keys and the ADDED_KEYS at their old behaviour."""
    if not isinstance(values, dict):
        return values
    return {k: _semantic(v, path + (k,)) for k, v in values.items() if path + (k,) not in NON_SEMANTIC
            and not (path + (k,) in ADDED_KEYS and v == ADDED_KEYS[path + (k,)])}


def _sha(payload) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def config_changes(resolved: dict) -> dict:
    """The resolved config's values that differ from the schema's defaults: the config as asked for."""
    return _drop_defaults(resolved, schema_defaults())


def config_hash(resolved: dict) -> str:
    """sha256 of config_changes: names the config as asked for (the same across a change of
    defaults), so the sweep can say which stale result a job replaces. Reuse goes by `identity`."""
    return _sha(config_changes(resolved))


def identity(resolved: dict, data: dict, numerics_version: int = NUMERICS_VERSION, environment: dict | None = None) -> str:
    """sha256 of everything that can change a result's number: every resolved config value
    (defaults included, so a changed default changes it), the data the run reads (name,
    split after fallback, the offline file's sha256 or the hub id), qsim's numerics version and
    the environment's identity part (environment.identity_now: package versions, the weights'
    content identity, the BLAS mode). Without an environment, the digest of the rest (what
    results had before environments, and what pins.py names a preset's config by)."""
    payload = {"config": _semantic(resolved), "data": data, "numerics_version": numerics_version}
    if environment is not None:
        payload["environment"] = environment
    return _sha(payload)


def identity_fields(resolved: dict, data: dict, environment: dict | None = None) -> dict:
    """What result.json records about its identity (IDENTITY_FIELDS and `environment`, what
    environment.describe records; described here if not given)."""
    if environment is None:
        from .environment import describe

        environment = describe(resolved)
    return {"identity": identity(resolved, data, NUMERICS_VERSION, environment["identity"]),
            "config_hash": config_hash(resolved), "config_changes": config_changes(resolved), "data": data,
            "numerics_version": NUMERICS_VERSION, "environment": environment}


def resolve_now(changes: dict) -> dict:
    """The resolved config that `changes` (config_changes of some run) gives under today's
    schema and defaults; raises KeyError if a key no longer exists."""
    return _overlay(schema_defaults(), changes)


def _overlay(defaults: dict, changes: dict, path: tuple = ()) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in changes.items():
        default = defaults.get(key)
        if isinstance(default, dict) and default and isinstance(value, dict):
            out[key] = _overlay(default, value, path + (key,))
        elif key in defaults or defaults == {}:  # an empty default is a free-form dict (quant.overrides)
            out[key] = copy.deepcopy(value)
        else:
            raise KeyError(f"{'.'.join(path + (key,))} is no longer a config key")
    return out


def data_now(data: dict) -> dict:
    """The stored data identities with each offline file re-hashed where QSIM_DATA_DIR has it now
    (a file that is not on this machine cannot be checked and keeps its stored hash)."""
    from . import data as data_mod

    root = data_mod.data_dir()
    out = {}
    for role, entries in data.items():
        out[role] = []
        for entry in entries:
            path = root / entry["file"] if root is not None and entry.get("source") == "offline" else None
            if path is not None and path.exists():
                entry = {**entry, "sha256": data_mod.file_sha256(path)}
            out[role].append(entry)
    return out


def _leaves(values, path=()):
    if isinstance(values, dict) and values:
        for k, v in values.items():
            yield from _leaves(v, path + (k,))
    else:
        yield ".".join(path), values


def _config_diff(old: dict, new: dict, limit: int = 3) -> str:
    a, b = dict(_leaves(_semantic(old))), dict(_leaves(_semantic(new)))
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    parts = [f"{k} {a.get(k, '<absent>')} -> {b.get(k, '<absent>')}" for k in keys[:limit]]
    return ", ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _environment_identity(environment) -> dict | None:
    return environment.get("identity") if isinstance(environment, dict) else None


def why_different(result: dict, now: dict) -> tuple[str, str] | None:
    """(kind, detail) if `result`'s identity differs from the one `now` (config, data,
    numerics_version, environment: what environment.describe records, or its identity part
    under "identity") gives; None if they are the same."""
    if any(k not in result for k in IDENTITY_FIELDS) or "config" not in result:
        return NO_IDENTITY, "result.json has no identity fields"
    env_now = _environment_identity(now.get("environment"))
    if identity(now["config"], now["data"], now["numerics_version"], env_now) == result["identity"]:
        return None
    version = result["numerics_version"]
    if version != now["numerics_version"]:
        kind = OLDER_NUMERICS if version < now["numerics_version"] else NEWER_NUMERICS
        return kind, f"made under numerics version {version}, now {now['numerics_version']}"
    if result["data"] != now["data"]:
        roles = sorted(r for r in result["data"].keys() | now["data"].keys() if result["data"].get(r) != now["data"].get(r))
        names = [f"{r} ({', '.join(e['dataset'] + ' ' + e['split'] for e in now['data'].get(r) or result['data'][r])})" for r in roles]
        return DATA_CHANGED, "data differs: " + "; ".join(names)
    if _semantic(result["config"]) != _semantic(now["config"]):
        return CONFIG_CHANGED, _config_diff(result["config"], now["config"])
    env_then = _environment_identity(result.get("environment"))
    if env_then is None:
        return NO_ENVIRONMENT, ("result.json records no environment (package versions, weights, BLAS mode): "
                                "made before they were part of a result's identity")
    if env_then != env_now:
        from .environment import differences

        return OTHER_ENVIRONMENT, ", ".join(differences(env_then, env_now)) or "the environments differ"
    return RECIPE_CHANGED, "the stored identity is not the hash of its stored config, data, version and environment"


def stale_reason(result: dict) -> tuple[str, str] | None:
    """(kind, detail) when a result is stale: its stored identity no longer equals the identity
    its config gets now (another numerics version, a changed default, changed data, another
    environment, or no identity at all); None when it may be reused and shown."""
    from .environment import identity_now

    why = result_problem(result)
    if why:
        return MALFORMED, why
    if any(k not in result for k in IDENTITY_FIELDS) or "config" not in result:
        return NO_IDENTITY, "result.json has no identity fields"
    try:
        config = resolve_now(result["config_changes"])
    except KeyError as err:
        return CONFIG_INVALID, str(err.args[0])
    stored = result.get("environment") if isinstance(result.get("environment"), dict) else None
    return why_different(result, {"config": config, "data": data_now(result["data"]),
                                  "numerics_version": NUMERICS_VERSION,
                                  "environment": {"identity": identity_now(config, stored)}})


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


# Typed top-level fields of a result (each checked when present: results made before identities
# lack some, and are stale, not malformed).
RESULT_TYPES = {"identity": str, "config_hash": str, "config": dict, "config_changes": dict, "data": dict,
                "environment": dict, "eval": dict, "formats": dict, "finished_at": str, "task": str, "metric": str,
                "method": str, "model": str, "steps": list, "causal": bool, "published": dict}


_SCALARS = (str, int, float, bool, type(None))


def _schema_shape(values: dict, defaults: dict, path: str) -> str | None:
    """Where `values` differs in kind from the schema: a section that is not a dict, a list key
    that is not a list, a scalar key that holds a dict or list (readers hash and walk these)."""
    for key, value in values.items():
        if key not in defaults:
            continue  # an unknown key: resolve_now calls that stale (config no longer valid)
        default, where = defaults[key], f"{path}.{key}"
        if isinstance(default, dict) and default:
            if not isinstance(value, dict):
                return f"{where} is not an object"
            why = _schema_shape(value, default, where)
            if why:
                return why
        elif isinstance(default, list):
            if not isinstance(value, (list, type(None))) or not all(isinstance(v, _SCALARS) for v in value or []):
                return f"{where} is not a list of values"
        elif not isinstance(default, dict) and not isinstance(value, _SCALARS):
            return f"{where} is not a single value"
    return None


def result_problem(item) -> str | None:
    """Why `item` (a parsed result file) is not a result qsim could have written, or None. Every
    reader (tables, sweeps, published, results.load) skips such a file and counts it."""
    import math

    if not isinstance(item, dict):
        return f"top level is {type(item).__name__ if item is not None else 'null'}, not an object"
    value = item.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "value is not a finite number"
    for key, kind in RESULT_TYPES.items():
        if key in item and not isinstance(item[key], kind):
            return f"{key} is not {'an object' if kind is dict else 'a ' + kind.__name__}"
    if "numerics_version" in item:
        version = item["numerics_version"]
        # a newer version is a real result of newer code (stale here), not a malformed one
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            return "numerics_version is not a known version"
    for entries in item.get("data", {}).values():
        if not isinstance(entries, list) or not all(
                isinstance(e, dict) and isinstance(e.get("dataset"), str) and isinstance(e.get("split"), str)
                and (e.get("source") != "offline" or isinstance(e.get("file"), str)) for e in entries):
            return "data is not a list of datasets per role"
    if not all(isinstance(s, str) for s in item.get("steps", [])):
        return "steps are not names"
    ev = item.get("eval", {})
    if not isinstance(ev.get("split", ""), str) or any(
            isinstance(ev[k], bool) or not isinstance(ev[k], int) or ev[k] < 0
            for k in ("windows", "windows_available", "samples", "samples_available") if k in ev):
        return "eval's split or extent is not typed"
    for key in ("config", "config_changes"):
        why = _schema_shape(item.get(key, {}), schema_defaults(), key)
        if why:
            return why
    return None


def read_result(path: Path) -> tuple[dict | None, str | None]:
    """(result, None) for a well-formed result file, (None, why) for a malformed or unreadable one."""
    try:
        item = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        return None, f"unreadable: {err.strerror or err}" if isinstance(err, OSError) else "not UTF-8 text"
    except ValueError:
        return None, "not valid JSON (truncated?)"
    why = result_problem(item)
    return (None, why) if why else (item, None)


def malformed_line(skipped: list[tuple[Path, str]], root: Path | str | None = None, limit: int = 5) -> str:
    """One line counting the malformed result files a reader skipped, naming the first few."""
    def shown(path):
        try:
            return str(Path(path).resolve().relative_to(Path(root).resolve())) if root is not None else str(path)
        except ValueError:
            return str(path)

    names = ", ".join(f"{shown(p)} ({why})" for p, why in skipped[:limit])
    more = f", and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"skipped {len(skipped)} malformed result file{'s' * (len(skipped) != 1)}: {names}{more}"


def load_results(root: Path, pattern: str = RESULT_FILE, skipped: list | None = None) -> list[dict]:
    """Every well-formed result file under root matching `pattern` (partial files cannot exist:
    writes are atomic), each with its path as `_path`; malformed ones go to `skipped` as (path, why)."""
    return _read_results(sorted(Path(root).rglob(pattern)), skipped)


def result_paths(root: Path | str):
    """Every run's result file under root: result.json files and the published entries
    (results/published/<id>.json, the same result with the commit that made it)."""
    yield from sorted(Path(root).rglob(RESULT_FILE))
    yield from sorted(p for p in Path(root).rglob("*.json") if p.parent.name == "published" and p.name != RESULT_FILE)


def load_all_results(root: Path | str, skipped: list | None = None) -> list[dict]:
    """Every run's well-formed result under root (result_paths), each with its path as `_path`;
    malformed ones (result_problem) go to `skipped` as (path, why)."""
    return _read_results(result_paths(root), skipped)


def _read_results(paths, skipped: list | None = None) -> list[dict]:
    out = []
    for path in paths:
        item, why = read_result(path)
        if item is None:
            if skipped is not None:
                skipped.append((path, why))
            continue
        item["_path"] = str(path)
        out.append(item)
    return out


def load(root: Path | str = "results"):
    """Every result under `root` (result.json files, and results/published/<id>.json) as a pandas
    DataFrame, one row per run: task, metric, value, model, formats, method, windows, freshness
    (`stale`: results.stale_reason's kind or None), the CPU and thread count it ran with, the
    result's path, and every resolved config value as a flat `config.<key>` column."""
    import pandas as pd

    from .environment import cpu_label

    rows = []
    skipped: list = []
    for r in load_all_results(root, skipped):
        if "config" not in r:
            continue
        reason = stale_reason(r)
        row = {"path": r["_path"], "task": r.get("task"), "metric": r.get("metric"), "value": r["value"],
               "model": r.get("model"), "weight": r.get("formats", {}).get("weight"), "act": r.get("formats", {}).get("act"),
               "method": r.get("method"), "windows": r.get("eval", {}).get("windows"), "causal": r.get("causal", True),
               "numerics_version": r.get("numerics_version"), "stale": reason[0] if reason else None,
               "cpu": cpu_label(r["environment"]) if r.get("environment") else None,
               "threads": (r.get("environment") or {}).get("threads"), "finished_at": r.get("finished_at")}
        row.update({f"config.{k}": v for k, v in _leaves(r["config"])})
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.attrs["skipped"] = [(str(p), why) for p, why in skipped]  # malformed files, not rows
    if skipped:
        import logging

        logging.getLogger("qsim").warning("qsim.results.load: %s", malformed_line(skipped, root))
    return frame
