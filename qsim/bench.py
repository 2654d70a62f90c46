"""`make bench`: speed and memory of the simulation, written to results/bench/<date>.json.

Measured, never asserted (tests do not time anything):
1. model overhead: the same SmolLM2 WikiText-2 windows as FP32 and as each
   simulated configuration, interleaved FP32, X, FP32, Y, ... window by window so
   machine drift cancels; ratio to the neighbouring FP32 runs, median over the
   windows (each window is one repeat) and the passes over them;
2. format kernels: fake-quantize throughput on a 4M-element fp32 tensor vs
   x.clone() (the memory-bound limit) and qtorch's float_quantize;
3. calibration cost: GPTQ (128 x 512 tokens), SmoothQuant and MSE wall time
   and peak RSS, each in its own process;
4. load time: first load (GGUF dequantization into an empty cache) vs cached;
5. memory: peak RSS of an FP32 eval vs a W4A8 ABFP eval, each in its own process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .results import REPO_ROOT, versions, write_json_atomic

MODEL_CONFIGS = {
    "W4A8 RTN": ["format=w4a8", "method=rtn"],
    "W4A8 ABFP n=64 +attention (the default)": ["format=w4a8", "method=abfp"],
    "W4A8 ABFP n=64 +attention, bf16 accumulator per 128": ["format=w4a8", "method=abfp", "quant.accum=bf16",
                                                            "quant.accum_chunk=128"],
    "W4A8 ABFP n=64": ["format=w4a8", "method=abfp", "abfp.attention=false"],
    "E2M1 ABFP n=64": ["format=e2m1", "method=abfp", "abfp.attention=false"],
    "W4-AE4M3 ABFP n=64": ["format=w4-ae4m3", "method=abfp", "abfp.attention=false"],
    "W4A4 ABFP n=64 +attention": ["format=w4a4", "method=abfp", "abfp.attention=true"],
    "W4A4 ABFP n=64 +attention +rotate": ["format=w4a4", "method=rotate-abfp", "abfp.attention=true"],
}
KERNEL_FORMATS = ["int4", "int8", "e2m1", "e1m2", "e4m3"]
SCALED_KERNEL_FORMATS = ["mxfp4", "mxfp8_e4m3", "nvfp4"]
QTORCH_BITS = {"e2m1": (2, 1), "e1m2": (1, 2), "e4m3": (4, 3)}


def _timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _timeit_beside(fn, reference, repeats: int) -> tuple[float, float]:
    """Median seconds of fn and of reference, timed alternately (reference, fn, reference, ...):
    both see the same allocator and machine state, so their ratio is steady."""
    fn(), reference()
    ours, theirs = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reference()
        theirs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fn()
        ours.append(time.perf_counter() - t0)
    return statistics.median(ours), statistics.median(theirs)


# ---------------------------------------------------------------- 1. model overhead

def model_overhead(windows: int, repeats: int, seq_len: int = 512) -> dict:
    """Interleaved per window: FP32, X1, FP32, X2, ..., FP32 on window 0, then window 1, ...
    Each X timing is divided by the mean of the FP32 timings just before and after it (same
    window, seconds apart, so drift cancels); the ratio is the median over windows x repeats."""
    from .config import compose_config
    from .data import join_text, load_rows, tokenize
    from .methods import METHODS, StageContext
    from .models import load_smollm2
    from .run import build_plan
    from .surgery import quantize_model
    from .tasks import perplexity

    base = load_smollm2()
    ids = tokenize(base.tokenizer, join_text(load_rows("wikitext2", "test")))
    models = {"FP32": base.model}
    for name, overrides in MODEL_CONFIGS.items():
        lm = load_smollm2()
        cfg = compose_config(overrides)
        quantize_model(lm.model, build_plan(cfg))
        for step in cfg.method.steps:  # stages without calibration (rotation) change the model itself
            if not METHODS[step].needs_calibration:
                METHODS[step].apply(StageContext(lm.model, None, cfg))
        models[name] = lm.model

    seconds = {name: [[] for _ in range(windows)] for name in models}
    nll = {name: [0.0] * windows for name in models}

    def evaluate(name: str, window: int) -> float:
        t0 = time.perf_counter()
        out = perplexity(models[name], ids[window * seq_len : (window + 1) * seq_len], seq_len, 1, 1)
        seconds[name][window].append(time.perf_counter() - t0)
        nll[name][window] = out["mean_nll"]
        return seconds[name][window][-1]

    ratios = {name: [] for name in MODEL_CONFIGS}
    for name in models:  # warm-up; also fills the weight caches
        perplexity(models[name], ids, seq_len, 1, 1)
    for _ in range(repeats):
        for window in range(windows):
            before = evaluate("FP32", window)
            for name in MODEL_CONFIGS:
                t = evaluate(name, window)
                after = evaluate("FP32", window)
                ratios[name].append(t / ((before + after) / 2))
                before = after
    tokens = windows * seq_len
    table = {}
    for name in models:
        total = sum(statistics.median(per_window) for per_window in seconds[name])
        row = {"seconds": total, "tokens_per_s": tokens / total, "ppl": math.exp(sum(nll[name]) / windows)}
        if name == "FP32":
            row["ratio"] = 1.0
        else:
            row.update(ratio=statistics.median(ratios[name]), ratio_min=min(ratios[name]),
                       ratio_max=max(ratios[name]), ratio_of_totals=total / table["FP32"]["seconds"])
            if name in RELATIVE_TARGETS:
                base = RELATIVE_TARGETS[name][0]
                row["ratio_to_base"] = row["ratio"] / statistics.median(ratios[base])
        table[name] = row
    return {"windows": windows, "seq_len": seq_len, "repeats": repeats, "samples_per_ratio": windows * repeats,
            "interleaving": "per window: FP32, X, FP32, Y, ..., FP32", "threads": torch.get_num_threads(),
            "configs": table}


# ---------------------------------------------------------------- 1b. decode throughput

DECODE_CONFIG = ("W4A8 ABFP n=64 +attention (the default)", ["format=w4a8", "method=abfp"])
DECODE_TARGET = 1.3


@torch.no_grad()
def _decode(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds to prefill prompt and greedily decode new_tokens, one token a step through the KV cache."""
    t0 = time.perf_counter()
    out = model(input_ids=prompt, use_cache=True)
    for _ in range(new_tokens):
        token = out.logits[:, -1:].argmax(-1)
        out = model(input_ids=token, cache=out.cache, use_cache=True)
    return time.perf_counter() - t0


def decode_throughput(new_tokens: int = 128, prompt_tokens: int = 64, repeats: int = 3) -> dict:
    """Generation speed (tokens/s) of FP32 and the default quantized config, interleaved
    FP32, X, FP32, ... ; the ratio is the median of X over the mean of its neighbours."""
    from .config import compose_config
    from .data import join_text, load_rows, tokenize
    from .models import load_smollm2
    from .run import build_plan
    from .surgery import quantize_model

    base = load_smollm2()
    prompt = tokenize(base.tokenizer, join_text(load_rows("wikitext2", "test")))[:prompt_tokens][None]
    quantized = load_smollm2()
    quantize_model(quantized.model, build_plan(compose_config(DECODE_CONFIG[1])))
    _decode(base.model, prompt, 8), _decode(quantized.model, prompt, 8)  # warm-up
    fp32, ours, ratios = [], [], []
    before = _decode(base.model, prompt, new_tokens)
    fp32.append(before)
    for _ in range(repeats):
        t = _decode(quantized.model, prompt, new_tokens)
        after = _decode(base.model, prompt, new_tokens)
        ours.append(t), fp32.append(after)
        ratios.append(t / ((before + after) / 2))
        before = after
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "config": DECODE_CONFIG[0],
            "fp32_tokens_per_s": new_tokens / statistics.median(fp32),
            "tokens_per_s": new_tokens / statistics.median(ours), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "target": DECODE_TARGET}


# ---------------------------------------------------------------- 2. format kernels

def format_kernels(numel: int = 1 << 22, repeats: int = 25) -> dict:
    """Each kernel on 4M fp32 elements, in x.clone() times: the compiled kernels (native.c, the
    default) and the torch ones (QSIM_KERNELS=torch), each timed alternately with x.clone()."""
    from . import native
    from .formats import get_format
    from .quantizer import QuantSpec, fake_quantize

    torch.manual_seed(0)
    x = torch.randn(numel) * 3
    xb = x.view(-1, 1024)
    nbytes = x.numel() * x.element_size()
    kernels = {name: (lambda fmt=get_format(name): fmt.quantize(x)) for name in KERNEL_FORMATS}
    for name in ("int4", "e2m1"):
        spec = QuantSpec(format=name, granularity="block", block=64, scale_dtype="bf16")
        kernels[f"abfp64-{name}"] = lambda spec=spec: fake_quantize(xb, spec)
    for name in SCALED_KERNEL_FORMATS:  # element rounding plus the block scales
        kernels[name] = lambda spec=QuantSpec(format=name, granularity="token"): fake_quantize(xb, spec)
    out = {"numel": numel, "kernels": native.kernels_in_use()}
    saved = os.environ.get("QSIM_KERNELS")
    try:
        for mode in ("auto", "torch"):  # auto: the compiled kernels, or torch's where none built
            os.environ["QSIM_KERNELS"] = mode
            clone_s = _timeit(lambda: x.clone(), repeats)
            if mode == "auto":
                out["clone"] = {"seconds": clone_s, "GB_per_s": nbytes / clone_s / 1e9}
            for name, fn in kernels.items():
                s, clone_s = _timeit_beside(fn, lambda: x.clone(), repeats)
                if mode == "auto":
                    out[name] = {"seconds": s, "GB_per_s": nbytes / s / 1e9, "x_clone": s / clone_s}
                else:
                    out[name].update(torch_seconds=s, torch_x_clone=s / clone_s)
    finally:
        if saved is None:
            os.environ.pop("QSIM_KERNELS", None)
        else:
            os.environ["QSIM_KERNELS"] = saved
    qtorch_quant = _qtorch()
    for name, (e, m) in QTORCH_BITS.items():
        if qtorch_quant is not None:
            qs = _timeit(lambda: qtorch_quant(x, exp=e, man=m, rounding="nearest"), max(1, repeats // 2))
            out[name].update(qtorch_seconds=qs, speedup_vs_qtorch=qs / out[name]["seconds"])
    return out


def _qtorch():
    try:
        from qtorch.quant import float_quantize

        float_quantize(torch.ones(4), exp=4, man=3, rounding="nearest")
        return float_quantize
    except Exception as err:  # its C++ extension builds at first import
        print(f"qtorch unavailable: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return None


# ---------------------------------------------------------------- 6. MKL's reproducible mode

BLAS_IN_CHILD = """
import json, statistics, time, torch
from qsim.bench import _decode
from qsim.config import compose_config
from qsim.data import join_text, load_rows, tokenize
from qsim.models import load_smollm2
from qsim.run import build_plan
from qsim.surgery import quantize_model
base = load_smollm2()
ids = tokenize(base.tokenizer, join_text(load_rows("wikitext2", "test")))
window, prompt = ids[:512][None], ids[:64][None]
quantized = load_smollm2()
quantize_model(quantized.model, build_plan(compose_config(["format=w4a8", "method=abfp"])))
def forward(model):
    with torch.no_grad():
        t0 = time.perf_counter(); model(window); return time.perf_counter() - t0
out = {}
for name, model in (("fp32", base.model), ("w4a8_abfp", quantized.model)):
    forward(model)
    out[name + "_window_s"] = statistics.median(forward(model) for _ in range(3))
_decode(base.model, prompt, 4)
out["fp32_decode_32_s"] = statistics.median(_decode(base.model, prompt, 32) for _ in range(3))
print(json.dumps(out))
"""

BLAS_MODES = {"strict": "AUTO,STRICT", "off": "OFF"}  # qsim's default (qsim/__init__.py) and MKL's own


def blas_mode_cost(rounds: int = 3) -> dict:
    """What MKL's strict reproducible mode costs: one 512-token window (FP32 and the default W4A8
    ABFP) and 32 FP32 decode steps, in fresh processes alternating strict, off, strict, off, ...
    (MKL reads its mode once per process); each ratio is strict's median over off's."""
    runs = {mode: [] for mode in BLAS_MODES}
    for _ in range(rounds):
        for mode, value in BLAS_MODES.items():
            runs[mode].append(_child(BLAS_IN_CHILD, {"MKL_CBWR": value}))
    errors = [r["error"] for rs in runs.values() for r in rs if "error" in r]
    if errors:
        return {"error": errors[0]}
    keys = ("fp32_window_s", "w4a8_abfp_window_s", "fp32_decode_32_s")
    medians = {mode: {k: statistics.median(r[k] for r in rs) for k in keys} for mode, rs in runs.items()}
    return {"rounds": rounds, "modes": BLAS_MODES, "medians": medians,
            "ratio": {k: medians["strict"][k] / medians["off"][k] for k in keys}}


# ---------------------------------------------------------------- 3-5. separate processes

def _child(code: str, env: dict | None = None) -> dict:
    """Run python code in a fresh process; return its JSON on the last stdout line, wall time and peak RSS."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, cwd=REPO_ROOT)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}", "wall_seconds": wall}
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


# Peak RSS from VmHWM, this process's own high-water mark: on Linux ru_maxrss survives
# fork + exec, so a child would report its parent's (the bench's) peak.
RUN_IN_CHILD = """
import json, sys, tempfile
from qsim.config import compose_config
from qsim.run import run
overrides = {overrides!r}
res = run(compose_config(overrides + ["progress=false"]), tempfile.mkdtemp())
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({{"value": res["value"], "timings": res["timings"], "methods": res["methods"],
                  "peak_rss_mb": hwm_kb / 1024}}))
"""

LOAD_IN_CHILD = """
import json, time
t0 = time.perf_counter()
import transformers.models.llama.modeling_llama  # imports timed apart from the load
from transformers import AutoModelForCausalLM, AutoTokenizer
from qsim.models import load_smollm2
t1 = time.perf_counter()
lm = load_smollm2()
print(json.dumps({"load_seconds": time.perf_counter() - t1, "import_seconds": t1 - t0, "from_cache": lm.from_cache}))
"""


def run_child(overrides: list[str]) -> dict:
    return _child(RUN_IN_CHILD.format(overrides=overrides))


def calibration_costs(quick: bool) -> dict:
    from .methods import METHODS

    samples = 16 if quick else 128
    eval_only = ["task.max_windows=1"]
    plans = {
        "gptq": ["format=w4a16", "method=gptq", f"calib.n_samples={samples}", "calib.seq_len=512"],
        "smoothquant": ["format=w4a8", "method=smoothquant", "calib.n_samples=32", "calib.seq_len=512"],
        "mse": ["format=w4a8", "method=mse", "calib.n_samples=32", "calib.seq_len=512"],
    }
    out = {}
    for name, overrides in plans.items():
        if name not in METHODS:
            out[name] = {"error": "method not implemented yet"}
            continue
        res = run_child(overrides + eval_only)
        if "error" not in res:
            res = {"calibrate_seconds": res["timings"]["calibrate"], "peak_rss_mb": res["peak_rss_mb"],
                   "calib_samples": int(overrides[2].split("=")[1]), "wall_seconds": res["wall_seconds"]}
        out[name] = res
    return out


def load_times() -> dict:
    with tempfile.TemporaryDirectory() as cache:
        first = _child(LOAD_IN_CHILD, env={"QSIM_CACHE_DIR": cache})
        cached = _child(LOAD_IN_CHILD, env={"QSIM_CACHE_DIR": cache})
    return {"first": first, "cached": cached}


# Peak RSS is set by the weights and one window's activations, so two windows show it.
MEMORY_WINDOWS = 2


def memory(windows: int) -> dict:
    common = [f"task.max_windows={windows}"]
    fp32 = run_child(common)
    abfp = run_child(common + ["format=w4a8", "method=abfp", "abfp.attention=false"])
    ratio = abfp.get("peak_rss_mb", float("nan")) / fp32.get("peak_rss_mb", float("nan"))
    return {"fp32_peak_rss_mb": fp32.get("peak_rss_mb"), "w4a8_abfp_peak_rss_mb": abfp.get("peak_rss_mb"), "ratio": ratio}


# ---------------------------------------------------------------- report

TARGETS = {
    "W4A8 ABFP n=64": 1.15, "E2M1 ABFP n=64": 1.3, "W4-AE4M3 ABFP n=64": 1.3, "W4A4 ABFP n=64 +attention": 1.4,
    "W4A8 ABFP n=64 +attention (the default)": 1.2, "W4A8 ABFP n=64 +attention, bf16 accumulator per 128": 3.0,
}
KERNEL_TARGET = 2.5  # x clone, for the minifloat and MX kernels (issue 11)
KERNEL_TARGET_ROWS = ("e2m1", "e1m2", "e4m3", "mxfp4", "mxfp8_e4m3")
# name -> (the same config without the extra stage, target ratio of the two)
RELATIVE_TARGETS = {"W4A4 ABFP n=64 +attention +rotate": ("W4A4 ABFP n=64 +attention", 1.15)}


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "model_overhead" in report:
        mo = report["model_overhead"]
        t = Table(title=f"model overhead: SmolLM2, {mo['windows']} x {mo['seq_len']} tokens, "
                        f"ratio = median of {mo['samples_per_ratio']} per-window ratios")
        for col in ("config", "seconds", "tokens/s", "ratio to FP32", "range", "target", "ppl"):
            t.add_column(col)
        for name, row in mo["configs"].items():
            target = f"<= {TARGETS[name]}" if name in TARGETS else ""
            if name in RELATIVE_TARGETS:
                target = f"<= {RELATIVE_TARGETS[name][1]} x no rotation: {row['ratio_to_base']:.3f}"
            spread = f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}" if "ratio_min" in row else ""
            t.add_row(name, f"{row['seconds']:.2f}", f"{row['tokens_per_s']:.0f}", f"{row['ratio']:.3f}", spread,
                      target, f"{row['ppl']:.2f}")
        console.print(t)
    if "format_kernels" in report:
        fk = report["format_kernels"]
        t = Table(title=f"format kernels: {fk['numel']} fp32 elements")
        for col in ("kernel", "ms", "GB/s", "x clone", "target", "torch kernels: x clone", "qtorch ms", "speedup vs qtorch"):
            t.add_column(col)
        for name, row in fk.items():
            if not isinstance(row, dict):
                continue
            t.add_row(name, f"{row['seconds'] * 1e3:.2f}", f"{row['GB_per_s']:.2f}", f"{row.get('x_clone', 1.0):.1f}",
                      f"<= {KERNEL_TARGET}" if name in KERNEL_TARGET_ROWS else "",
                      f"{row['torch_x_clone']:.1f}" if "torch_x_clone" in row else "",
                      f"{row['qtorch_seconds'] * 1e3:.1f}" if "qtorch_seconds" in row else "",
                      f"{row['speedup_vs_qtorch']:.1f}" if "speedup_vs_qtorch" in row else "")
        console.print(t)
    if "decode" in report:
        d = report["decode"]
        console.print(f"[bold]decode[/bold] ({d['new_tokens']} new tokens after {d['prompt_tokens']}, KV cache): FP32 "
                      f"{d['fp32_tokens_per_s']:.1f} tokens/s, {d['config']} {d['tokens_per_s']:.1f} tokens/s, "
                      f"time ratio {d['ratio']:.3f} ({d['ratio_min']:.2f}-{d['ratio_max']:.2f}; target <= {d['target']})")
    for key in ("calibration", "load", "memory", "section_seconds"):
        if key in report:
            console.print(f"[bold]{key}[/bold]: {json.dumps(report[key], default=str)}")
    if "bench_seconds" in report:
        console.print(f"[bold]bench total[/bold]: {report['bench_seconds'] / 60:.1f} min")


SECTIONS = ("kernels", "model", "decode", "load", "memory", "calibration", "blas")  # in the order they run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qsim.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, help="passes over the windows (each window is a repeat)")
    parser.add_argument("--quick", action="store_true", help="fewer samples (GPTQ 16 x 512)")
    parser.add_argument("--only", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench")
    args = parser.parse_args(argv)
    os.environ.setdefault("QSIM_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions(), "cpu_count": os.cpu_count()}
    t0 = time.time()
    sections = {
        "kernels": ("format_kernels", format_kernels),
        "model": ("model_overhead", lambda: model_overhead(args.windows, args.repeats)),
        "decode": ("decode", decode_throughput),
        "load": ("load", load_times),
        "memory": ("memory", lambda: memory(MEMORY_WINDOWS)),
        "calibration": ("calibration", lambda: calibration_costs(args.quick)),
        "blas": ("blas_mode", blas_mode_cost),
    }
    report["section_seconds"] = {}
    for key, (field, measure) in sections.items():
        if key in args.only:
            started = time.time()
            report[field] = measure()
            report["section_seconds"][field] = round(time.time() - started, 1)
    report["bench_seconds"] = time.time() - t0
    path = args.out / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    write_json_atomic(path, report)
    print_report(report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
