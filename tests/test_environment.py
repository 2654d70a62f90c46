"""The environment a result records (qsim.environment): package versions, the weights' content
identity, threads, CPU, BLAS mode; its identity part, the weight digests cached on disk, and the
SmolLM2 fp32 cache named by the GGUF's digest."""
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys

import torch

from qsim import BLAS_REPRODUCIBLE
from qsim.environment import DIGEST_CACHE, describe, differences, file_sha256, identity_now
from qsim.models import _smollm2_cache, sbert_dir, smollm2_gguf_path

from conftest import cfg


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_describe_records_what_can_move_a_number_and_hashes_the_identity_part():
    env = describe(cfg())  # SmolLM2, wikitext2
    ident = env["identity"]
    assert ident["packages"] == {n: importlib.metadata.version(n) for n in ("torch", "transformers", "tokenizers", "numpy")}
    assert ident["weights"] == {"sha256": sha256_of(smollm2_gguf_path())}  # the file's bytes, not its path
    assert ident["blas"] == os.environ["MKL_CBWR"] == BLAS_REPRODUCIBLE and env["blas"]["mkl"] is True
    assert env["blas"]["torch_imported_first"] is False  # conftest imports qsim before torch
    assert env["threads"] == torch.get_num_threads()
    assert env["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]["machine"]
    assert len(env["cpu"]["flags_sha256"]) == 12
    assert env["packages"]["safetensors"] == importlib.metadata.version("safetensors")
    assert env["weights"]["source"] == "gguf" and env["weights"]["file"] == str(smollm2_gguf_path())
    # lm_eval's version is in the identity of lm_eval runs only
    assert "lm_eval" in describe(cfg("task=lm_eval", "task.tasks=[arc_easy]"))["identity"]["packages"]
    # MiniLM: the files its folder loads from; hub models: the revision asked for, said not to be a content hash
    minilm = describe(cfg("model=minilm", "task=stsb"))["weights"]
    files = sorted(p for p in sbert_dir("sentence-transformers/all-MiniLM-L6-v2").iterdir() if p.name in minilm["files"])
    assert "model.safetensors" in minilm["files"] and "README.md" not in minilm["files"]
    assert minilm["sha256"] == hashlib.sha256("".join(f"{p.name}\0{sha256_of(p)}\n" for p in files).encode()).hexdigest()
    hub = identity_now(cfg("model=opt-125m"))["weights"]
    assert hub == {"id": "facebook/opt-125m", "revision": "main"}
    assert "not a content hash" in describe(cfg("model=opt-125m"))["weights"]["note"]
    assert identity_now(cfg("model=tiny-opt"))["weights"] == {"generated": "the config (architecture, size, model.seed)"}


def test_differences_name_what_differs():
    now = {"packages": {"torch": "2.13.0+cpu", "transformers": "5.25.0"}, "weights": {"sha256": "cd34" * 16}, "blas": "AUTO,STRICT"}
    then = {"packages": {"torch": "2.13.0+cpu", "transformers": "5.24.0"}, "weights": {"sha256": "ab12" * 16}, "blas": "none"}
    assert differences(then, now) == ["transformers 5.24.0 -> 5.25.0", "weights sha256 ab12ab12ab12... -> cd34cd34cd34...",
                                      "BLAS mode none -> AUTO,STRICT"]
    assert differences(now, now) == []


def test_weight_digests_are_read_once_then_from_the_cache_and_key_the_smollm2_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QSIM_CACHE_DIR", str(tmp_path / "cache"))
    gguf = smollm2_gguf_path()
    digest = sha256_of(gguf)
    assert file_sha256(gguf) == digest
    store = tmp_path / "cache" / DIGEST_CACHE
    entry = json.loads(store.read_text())[str(gguf.resolve())]
    assert entry["sha256"] == digest and entry["size"] == gguf.stat().st_size and entry["mtime_ns"] == gguf.stat().st_mtime_ns
    # the fp32 cache folder is named by the digest
    assert _smollm2_cache() == tmp_path / "cache" / f"smollm2-135m-instruct-q4_1-fp32-{digest[:16]}"
    # a second call reads the digest from the json, not the file: plant another digest there
    planted = {**entry, "sha256": "0123456789abcdef" * 4}
    store.write_text(json.dumps({str(gguf.resolve()): planted}))
    assert file_sha256(gguf) == planted["sha256"]
    assert _smollm2_cache().name.endswith("-0123456789abcdef")  # another GGUF content, another cache folder

    # a file rewritten in place (same path) is hashed again
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"a" * 1000)
    first = file_sha256(weights)
    before = weights.stat().st_mtime_ns
    weights.write_bytes(b"b" * 1000)  # same size; a later mtime (set, not left to the clock's granularity)
    os.utime(weights, ns=(before + 10**9, before + 10**9))
    assert file_sha256(weights) == sha256_of(weights) != first
    assert json.loads(store.read_text())[str(weights.resolve())]["sha256"] == sha256_of(weights)


def test_the_identity_part_is_computed_without_torch(tmp_path):
    """`qsim tables` checks freshness without importing torch: whether torch's BLAS is MKL is
    asked of a child process once, then read from the cache."""
    code = ("import sys; from qsim.environment import identity_now; from qsim.config import compose_config; "
            "from omegaconf import OmegaConf; "
            "c = OmegaConf.to_container(compose_config(['model=tiny-opt']), resolve=True); "
            "print(identity_now(c)['blas']); assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "QSIM_CACHE_DIR": str(tmp_path)}
    env.pop("MKL_CBWR", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == BLAS_REPRODUCIBLE  # set by `import qsim`
    [(origin, cached)] = json.loads((tmp_path / "torch-blas.json").read_text()).items()
    assert cached["mkl"] is True and cached["version"] == importlib.metadata.version("torch")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**env, "MKL_CBWR": "COMPATIBLE"}, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "COMPATIBLE", proc.stderr[-2000:]
