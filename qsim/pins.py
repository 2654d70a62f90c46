"""Numerics pins: a few tiny, seeded computations whose results stand for every number qsim makes.

tests/test_numerics_pins.py recomputes them and compares with tests/numerics_pins.json.
A commit that changes any of them fails that test until NUMERICS_VERSION
(qsim/__init__.py) is bumped and the pins are rewritten together:

    python -m qsim.pins             # compare, list what changed (exit 1 if anything did)
    python -m qsim.pins --update    # rewrite the pin file; refuses changed values
                                    # unless NUMERICS_VERSION is above the file's

What is pinned:
- exact (sha256 of the output bytes, NaNs made canonical): every registered
  format (formats.NAMED) under each rounding mode, fast kernel and reference,
  on one seeded input with ties, subnormals, overflow and specials; the
  quantizer at each format family x granularity x scale dtype (and asymmetric,
  static, two-level scales); each matmul accumulator (qsim/accum.py);
- method values (exact on the CPU class the pins were made on; on another, within
  CROSS_CPU_BAND, measured, or 1e-5):
  each method preset in conf/method/ (the folder is read, so a new preset is
  covered) run as run.py runs it (plan, surgery, calibration on 2 real PTB
  windows, QAT for 2 steps, frozen weights) on a tiny random OPT and a tiny
  random Llama with W4A4, scored by mean next-token NLL on 2 fixed WikiText-2
  windows. The models are initialised with std 0.2: at HF's 0.02 their
  outputs are nearly uniform and quantization moves the NLL by only ~1e-4.

Adding a format or a preset adds pins without a version bump (no existing
number changes), and so does changing a preset's config (a new default, a
new key it sets): each method pin stores the digest of the config it ran
(`approx_config`), and a pin under a new digest is a new pin; a version bump with no pinned value changed is allowed (a
change the pins cannot see, e.g. in the evaluation protocol, still needs one).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from contextlib import contextmanager
from pathlib import Path

from . import NUMERICS_VERSION
from .results import REPO_ROOT, write_json_atomic

PIN_FILE = REPO_ROOT / "tests" / "numerics_pins.json"
METHOD_CONF_DIR = REPO_ROOT / "conf" / "method"
REL_TOL = 1e-5
# Method pins are exact (==) on the CPU class they were made on (`cpu_class`: the same ISA for
# torch's kernels and MKL, the same MKL mode); elsewhere they hold within a band. The bands were
# measured by emulating an AVX2-only CPU on an AVX-512 one (ATEN_CPU_CAPABILITY=avx2,
# MKL_CBWR=AVX2,STRICT): 30 of 36 pins moved <= 6.4e-8; QAT's two steps and GPTQ's column
# rounding amplify last-bit differences (qat 7.0e-3, abfp-qat 3.6e-3, gptq 2.1e-4, gptq-abfp 6.7e-5).
# Each band is twice its preset's measured spread.
CROSS_CPU_BAND = {"qat": 1.4e-2, "abfp-qat": 7.2e-3, "gptq": 4.3e-4, "gptq-abfp": 1.4e-4}
INIT_STD = 0.2
PIN_MODELS = ("tiny-opt", "tiny-llama")
# A method preset's run: small enough for a test, every stage still doing its work.
METHOD_OVERRIDES = ["model=tiny-opt", "format=w4a4", "progress=false", "task.seq_len=64", "calib.n_samples=2", "calib.seq_len=32",
                    "qat.steps=2", "qat.seq_len=32", "qat.lr=1e-3", "qat.dataset=ptb", "qat.split=test"]
EVAL_WINDOWS, EVAL_SEQ_LEN = 2, 64
BUMP_HINT = ("If this change is intended, bump NUMERICS_VERSION in qsim/__init__.py and run "
             "`python -m qsim.pins --update` (results made under the old version then count as stale).")


class PinError(RuntimeError):
    """--update refused to write."""


@contextmanager
def threads(n: int):
    """Run the block with n torch threads (pins are made with one; tests check others give the same bits)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _one_thread():
    return threads(1)


def _digest(t) -> str:
    import torch

    t = t.detach().float().contiguous()
    t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)  # one NaN bit pattern on every CPU
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


# ---------------------------------------------------------------- formats and quantizer (bit-exact)

def format_input(fmt):
    """Seeded values over the format's whole range: normals, subnormals, exact ties between
    code points, values past max, signed zeros, inf and NaN."""
    import torch

    gen = torch.Generator().manual_seed(0)
    big = float(min(fmt.max, 1e30))
    tiny = float(max(fmt.min_subnormal, 1e-30))
    parts = [torch.randn(1024, generator=gen) * big / 3, torch.randn(512, generator=gen) * tiny * 16,
             torch.randn(512, generator=gen)]
    points = getattr(fmt, "code_points", None)
    if points is not None:
        cp = points().float()
        parts.append((cp[1:] + cp[:-1]) / 2)  # ties
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), big, -big, big * 1.5, -big * 1.5,
                tiny / 2, -tiny / 2, tiny * 1.5, -tiny * 1.5]
    parts.append(torch.tensor(specials))
    return torch.cat(parts)


def format_pins() -> dict[str, str]:
    import torch

    from .formats import NAMED, ROUNDINGS, get_format

    out = {}
    for name, base in NAMED.items():
        for rounding in (("nearest",) if base.kind == "cast" else ROUNDINGS):
            fmt = get_format(name, rounding)
            x = format_input(fmt)
            torch.manual_seed(0)  # stochastic rounding
            out[f"format/{name}/{rounding}/fast"] = _digest(fmt.quantize(x))
            if hasattr(fmt, "quantize_reference"):
                torch.manual_seed(0)
                out[f"format/{name}/{rounding}/reference"] = _digest(fmt.quantize_reference(x))
    return out


def quantizer_input():
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 24, 96, generator=gen) * (torch.rand(96, generator=gen) * 4 + 0.05)
    x[0, 3, 7] = 40.0  # an outlier channel value
    return x


def quantizer_pins() -> dict[str, str]:
    import torch

    from .quantizer import GRANULARITIES, SCALE_DTYPES, SCALED_FORMATS, QuantSpec, fake_quantize

    x = quantizer_input()
    out = {}
    for fmt in ("int4", "int8", "e2m1", "e4m3"):
        for granularity in GRANULARITIES:
            for scale_dtype in SCALE_DTYPES:
                for symmetric in ((True, False) if fmt.startswith("int") else (True,)):
                    try:
                        spec = QuantSpec(fmt, granularity, block=32, scale_dtype=scale_dtype, symmetric=symmetric)
                    except ValueError:  # a combination the quantizer refuses (e4m3 scales need symmetric blocks)
                        continue
                    key = f"quantizer/{fmt}/{granularity}/{scale_dtype}/{'sym' if symmetric else 'asym'}"
                    out[key] = _digest(fake_quantize(x, spec))
        static = QuantSpec(fmt, "tensor", mode="static")
        out[f"quantizer/{fmt}/tensor/static"] = _digest(fake_quantize(x, static, torch.tensor(2.5)))
        for scale_format in ("int8", "e4m3"):
            spec = QuantSpec(fmt, "block", block=32, scale_dtype="bf16", scale_format=scale_format)
            out[f"quantizer/{fmt}/block/bf16/two-level-{scale_format}"] = _digest(fake_quantize(x, spec))
    for name in SCALED_FORMATS:
        for variant in ({"scale_rule": "floor"}, {"scale_rule": "ceil"}, {"global_scale": "tensor"}):
            spec = QuantSpec(name, **variant)
            out[f"quantizer/{name}/" + "/".join(f"{k}={v}" for k, v in variant.items())] = _digest(fake_quantize(x, spec))
    return out


# ---------------------------------------------------------------- method presets (within REL_TOL)

def method_presets() -> list[str]:
    return sorted(p.stem for p in METHOD_CONF_DIR.glob("*.yaml"))


def tiny_model(name: str):
    """A seeded tiny random model (init std INIT_STD): OPT as qsim.models builds it, or a Llama
    with grouped-query attention and tied embeddings, like SmolLM2."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTForCausalLM

    from .models import tiny_opt_config

    torch.manual_seed(0)
    if name == "tiny-opt":
        config = tiny_opt_config()
        config.init_std = INIT_STD
        return OPTForCausalLM(config).eval()
    if name == "tiny-llama":
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             initializer_range=INIT_STD, tie_word_embeddings=True)
        return LlamaForCausalLM(config).eval()
    raise ValueError(f"unknown pin model {name!r}; valid: {', '.join(PIN_MODELS)}")


def _eval_ids(tokenizer):
    from . import data

    ids = data.tokenize(tokenizer, data.join_text(data.load_rows("wikitext2", "test")[:100]))
    return ids[: EVAL_WINDOWS * EVAL_SEQ_LEN]


def accum_pins() -> dict[str, str]:
    """Each matmul accumulator (qsim/accum.py) on one seeded product, bit for bit."""
    import torch

    from .accum import ACCUMULATORS, Accumulator, matmul

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 70, generator=gen) * 100
    b = torch.randn(70, 5, generator=gen)
    out = {}
    for fmt in ACCUMULATORS:
        if fmt == "fp32":  # torch's matmul: its last bits depend on the CPU's BLAS
            continue
        for chunk in (None, 1, 16, 70):
            out[f"accum/{fmt}/chunk{chunk}"] = _digest(matmul(a, b, Accumulator(fmt, chunk)))
    return out


def method_pin(cfg, model_name: str) -> float:
    """Mean next-token NLL of the tiny model after the run's quantization and method stages."""
    import torch

    from .models import ByteTokenizer
    from .run import calibrate, preflight
    from .surgery import freeze_quantized_weights, quantize_model
    from .tasks import perplexity

    plan = preflight(cfg)
    model = tiny_model(model_name)
    tokenizer = ByteTokenizer()
    torch.manual_seed(cfg.seed)
    quantize_model(model, plan)
    calibrate(model, tokenizer, cfg)
    freeze_quantized_weights(model)
    return perplexity(model, _eval_ids(tokenizer), EVAL_SEQ_LEN, EVAL_WINDOWS, 1)["mean_nll"]


def _preset_config(preset: str):
    from .config import compose_config

    return compose_config(METHOD_OVERRIDES + [f"method={preset}"])


def method_configs(presets: list[str] | None = None) -> dict[str, str]:
    """Per method pin, a digest of the config it runs: a preset whose config changed (a new
    default, a new key) has a new pin, not a moved one, and needs no numerics version bump."""
    from omegaconf import OmegaConf

    from .results import identity

    out = {}
    for preset in method_presets() if presets is None else presets:
        digest = identity(OmegaConf.to_container(_preset_config(preset), resolve=True), {}, 0)
        out.update({f"method/{preset}/{model_name}": digest for model_name in PIN_MODELS})
    return out


def method_pins(presets: list[str] | None = None) -> dict[str, float]:
    out = {}
    for preset in method_presets() if presets is None else presets:
        cfg = _preset_config(preset)
        for model_name in PIN_MODELS:
            out[f"method/{preset}/{model_name}"] = method_pin(cfg, model_name)
    return out


def compute(presets: list[str] | None = None) -> dict:
    """Every pin as it comes out of the code now: {"exact": {...}, "approx": {...}, "approx_config": {...}}."""
    with _one_thread():
        return {"exact": {**format_pins(), **quantizer_pins(), **accum_pins()}, "approx": method_pins(presets),
                "approx_config": method_configs(presets)}


# ---------------------------------------------------------------- compare and update

def load(path: Path = PIN_FILE) -> dict | None:
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def cpu_class() -> str:
    """What decides the last bits of torch's and MKL's float results on this machine: the
    architecture, torch's kernel ISA, MKL's mode and the CPU's SIMD extensions."""
    import os
    import platform

    import torch

    simd = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                simd = sorted({f for f in line.split(":", 1)[1].split()
                               if f.startswith(("avx", "amx", "fma", "f16c", "sse", "asimd", "sve"))})
                break
    except OSError:
        pass
    return (f"{platform.machine()} aten={torch.backends.cpu.get_cpu_capability()} "
            f"mkl_cbwr={os.environ.get('MKL_CBWR', '')} simd={','.join(simd)}")


def band(key: str) -> float:
    """The relative band of a method pin on another CPU class (key: method/<preset>/<model>)."""
    return CROSS_CPU_BAND.get(key.split("/")[1], REL_TOL)


def changed(pinned: dict, now: dict) -> list[str]:
    """Keys present in both whose value moved (exact: any difference; approx: any difference on
    the CPU class the pins were made on, else beyond the key's `band`), unless the pin's config
    changed: see `reconfigured`."""
    out = []
    skip = set(reconfigured(pinned, now))
    same_cpu = pinned.get("cpu_class") == now.get("cpu_class", cpu_class())
    for key, value in now.get("exact", {}).items():
        old = pinned.get("exact", {}).get(key)
        if old is not None and old != value:
            out.append(f"{key}: sha256 {old[:12]}... -> {value[:12]}...")
    for key, value in now.get("approx", {}).items():
        old = pinned.get("approx", {}).get(key)
        if old is None or key in skip:
            continue
        if (value != old) if same_cpu else abs(value - old) > band(key) * abs(old):
            rule = "exact on this CPU class" if same_cpu else f"band {band(key):.1e} on another CPU class"
            out.append(f"{key}: {old!r} -> {value!r} (rel {abs(value - old) / abs(old):.2e}; {rule})")
    return out


def reconfigured(pinned: dict, now: dict) -> list[str]:
    """Method pins whose preset's config digest differs between `pinned` and `now`."""
    old, new = pinned.get("approx_config", {}), now.get("approx_config", {})
    return sorted(k for k in new if k in old and old[k] != new[k])


def added_and_removed(pinned: dict, now: dict) -> tuple[list[str], list[str]]:
    old = set(pinned.get("exact", {})) | set(pinned.get("approx", {}))
    new = set(now.get("exact", {})) | set(now.get("approx", {}))
    return sorted(new - old), sorted(old - new)


def update(now: dict, version: int = NUMERICS_VERSION, path: Path = PIN_FILE) -> str:
    """Write `now` as the pins of `version`. Refuses (PinError) when a pinned value changed and
    `version` is not above the file's, or when `version` is below it."""
    pinned = load(path)
    moved = changed(pinned, now) if pinned else []
    if pinned is not None:
        if version < pinned["numerics_version"]:
            raise PinError(f"NUMERICS_VERSION {version} is below the pin file's {pinned['numerics_version']}")
        if moved and version == pinned["numerics_version"]:
            raise PinError(f"{len(moved)} pinned value(s) changed under the same NUMERICS_VERSION {version}:\n  "
                           + "\n  ".join(moved) + f"\nbump NUMERICS_VERSION in qsim/__init__.py to {version + 1} first.")
    import torch
    import transformers

    write_json_atomic(Path(path), {"numerics_version": version, "rel_tol": REL_TOL,
                                   "made_with": {"torch": torch.__version__, "transformers": transformers.__version__},
                                   "cpu_class": now.get("cpu_class", cpu_class()),
                                   "exact": dict(sorted(now["exact"].items())),
                                   "approx": dict(sorted(now["approx"].items())),
                                   "approx_config": dict(sorted(now.get("approx_config", {}).items()))})
    added, removed = added_and_removed(pinned or {}, now)
    redone = reconfigured(pinned or {}, now)
    parts = [f"{len(moved)} changed", f"{len(added)} added", f"{len(removed)} removed",
             f"{len(redone)} with a new config"]
    bumped = pinned is not None and version > pinned["numerics_version"]
    note = f"; numerics version {pinned['numerics_version']} -> {version}" if bumped else ""
    return f"wrote {path}: {', '.join(parts)}{note}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qsim.pins", description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="rewrite the pin file (needs a NUMERICS_VERSION bump if a value changed)")
    opts = parser.parse_args(argv)
    from . import data

    if data.data_dir() is None:
        print(f"qsim pins: error: set {data.DATA_ENV} (e.g. ../shared/data): the pins read PTB and WikiText-2", file=sys.stderr)
        return 2
    now = compute()
    if opts.update:
        try:
            print(update(now))
        except PinError as err:
            print(f"qsim pins: refused: {err}", file=sys.stderr)
            return 1
        return 0
    pinned = load() or {}
    moved = changed(pinned, now)
    added, removed = added_and_removed(pinned, now)
    redone = reconfigured(pinned, now)
    for line in moved:
        print(f"changed  {line}")
    for key in redone:
        print(f"config   {key} (its preset's config changed: a new pin)")
    for key in added:
        print(f"new      {key}")
    for key in removed:
        print(f"gone     {key}")
    if pinned.get("numerics_version") != NUMERICS_VERSION:
        print(f"pin file is for numerics version {pinned.get('numerics_version')}, code is {NUMERICS_VERSION}")
    if moved or added or removed or redone or pinned.get("numerics_version") != NUMERICS_VERSION:
        print(BUMP_HINT if moved else "run `python -m qsim.pins --update`")
        return 1
    print(f"all {len(now['exact']) + len(now['approx'])} pins match (numerics version {NUMERICS_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
