"""One run: validate, load, quantize, calibrate, evaluate, write result.json."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import data
from . import native
from .accum import Accumulator
from .config import ConfigError, validate
from .environment import cpu_label
from .methods import METHODS, StageContext
from .models import ModelLoadError, family_of, load_model, model_config, preflight_tokenizer, skeleton_layer_names
from .presets import check_user_keys, hydra_user_keys, method_set
from .quantizer import QuantSpec
from .results import RESULT_FILE, identity_fields, versions, write_json_atomic
from .surgery import (LayerQuant, SurgeryError, SurgeryPlan, check_patterns, compact_names, freeze_quantized_weights,
                      model_leaks, plan_leaks, quantize_model)
from .tasks import TASK_CALIBRATION, TASKS, calibration_source, calibration_windows

log = logging.getLogger("qsim")
console = Console(stderr=True)


class Bar:
    """A rich progress bar for one phase; silent when progress is off."""

    def __init__(self, progress: Progress | None, description: str):
        self.progress, self.description, self.task = progress, description, None

    def start(self, total: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(self.description, total=total, info="")

    def advance(self, n: int = 1, info: str = "") -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, advance=n, info=info)


def progress_display(enabled: bool) -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, disable=not enabled, transient=False,
    )


def build_plan(cfg, steps=None) -> SurgeryPlan:
    """The quantizer plan from format + quant config, then each method's configure hook (of
    `steps`, by default the method's)."""
    q, f = cfg.quant, cfg.format

    def spec(fmt: str, qc, global_scale: str = "token") -> QuantSpec:
        return QuantSpec(format=fmt, granularity=qc.granularity, axis=qc.axis, block=qc.block,
                         scale_dtype=qc.scale_dtype, symmetric=qc.symmetric, rounding=q.rounding,
                         scale_rule=q.scale_rule, global_scale=global_scale)

    # E4M3 (NVFP4) global scales: per tensor for weights, per token for activations (causal)
    act = spec(f.act, q.act)
    attn_base = spec(f.attn or f.act, q.act)
    plan = SurgeryPlan(
        default=LayerQuant(weight=spec(f.weight, q.weight, "tensor"), act=act, output=spec(f.output, q.act)),
        attention=attn_base if q.attention else None,
        attention_base=attn_base,
        skip=tuple(q.skip),
        overrides={k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in (q.overrides or {}).items()},
        v_axis=q.v_axis,
        accum=Accumulator(q.accum, q.accum_chunk),
    )
    for step in cfg.method.steps if steps is None else steps:
        METHODS[step].configure(plan, cfg)
    return plan


# Stages that calibrate on any input the model takes (float passes through every quantizer),
# so also on an image task's pixel_values; the others need token windows or a language loss.
IMAGE_CALIBRATION = ("mse", "smoothquant")


def preflight(cfg, reads: str = "task", explicit=None) -> SurgeryPlan:
    """Every check that needs no weights: names, ranges, data on disk, override patterns, and no
    method stage changing a key the user set (`explicit`: presets.user_keys of the command line).
    reads: the windows the command feeds besides the calibration's (see check_positions)."""
    validate(cfg)
    calibrates = [s for s in cfg.method.steps if METHODS[s].needs_calibration]
    if calibrates and family_of(cfg.model) == "image-classifier":
        others = [s for s in calibrates if s not in IMAGE_CALIBRATION]
        if others:
            raise ConfigError(f"method step {others[0]!r} calibrates on token windows; an image classifier calibrates "
                              f"with {' or '.join(IMAGE_CALIBRATION)} (calib.dataset=task), or use rtn, abfp, none")
        if cfg.calib.dataset != TASK_CALIBRATION:
            raise ConfigError(f"an image classifier calibrates on images: set calib.dataset=task "
                              f"(task {cfg.task.name}'s own), not calib.dataset={cfg.calib.dataset}")
    TASKS[cfg.task.name].check(cfg)
    if calibrates:
        try:
            data.check_available(*calibration_source(cfg))
        except data.DataError as err:
            raise ConfigError(f"method {cfg.method.name!r} needs calibration data: {err}") from None
    try:
        plan = build_plan(cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_user_keys(cfg, explicit)
    check_causal(plan_leaks(plan), cfg, ConfigError)
    try:
        preflight_tokenizer(cfg.model)
    except ModelLoadError as err:
        raise ConfigError(str(err)) from None
    config = model_config(cfg.model)
    if config is not None:
        check_positions(cfg, getattr(config, "max_position_embeddings", None), reads)
        if plan.overrides:
            try:
                check_patterns(skeleton_layer_names(config, family_of(cfg.model)), plan)
            except SurgeryError as err:
                raise ConfigError(str(err)) from None
    return plan


def check_positions(cfg, max_positions: int | None, reads: str = "task", model_name: str | None = None) -> None:
    """Every window the command feeds the model fits its position table (a longer one would
    index past it, or silently extrapolate). reads: "task" (qsim run: the task's windows, and the
    calibration's if a method calibrates), "sensitivity" (its windows instead of the task's), or
    "calib" (calibration windows only)."""
    if max_positions is None:
        return
    lengths = {"task": {"task.seq_len": cfg.task.seq_len}, "calib": {},
               "sensitivity": {"sensitivity.seq_len": cfg.sensitivity.seq_len}}[reads]
    steps = [METHODS[s] for s in cfg.method.steps]
    if reads == "calib" or any(m.needs_calibration for m in steps):
        lengths["calib.seq_len"] = cfg.calib.seq_len
    if "qat" in cfg.method.steps:
        lengths["qat.seq_len"] = cfg.qat.seq_len
    for key, length in lengths.items():
        if length > max_positions:
            raise ConfigError(f"{key}={length} is longer than model {model_name or cfg.model.name!r} has positions "
                              f"({max_positions}); set {key}<={max_positions}")


def data_read(cfg) -> dict:
    """role -> identities of the data the run will read (eval, calibration windows, a
    stage's own text), from the files as they are now; no model needed."""
    steps = [METHODS[s] for s in cfg.method.steps]
    pairs = {"eval": TASKS[cfg.task.name].reads(cfg)}
    if any(m.needs_calibration for m in steps):
        pairs["calib"] = [calibration_source(cfg)]
    for m in steps:
        if m.reads(cfg):
            pairs[m.name] = m.reads(cfg)
    return {role: [data.data_identity(d, s) for d, s in found] for role, found in pairs.items()}


def run_identity(cfg) -> dict:
    """The identity fields result.json will carry (results.identity_fields, with the
    environment, environment.describe), before any load: what a sweep compares with finished
    results to skip a job."""
    return identity_fields(OmegaConf.to_container(cfg, resolve=True), data_read(cfg))


def calibrate(model, tokenizer, cfg, progress: Progress | None = None, calib: torch.Tensor | None = None) -> dict:
    """Each method stage in order on the quantized model, with calibration windows if one needs
    them (`calib`, or cfg.calib's read with the tokenizer, from the task with calib.dataset=task);
    returns each stage's facts."""
    method_facts = {}
    steps = [METHODS[s] for s in cfg.method.steps]
    if calib is None and any(m.needs_calibration for m in steps):
        calib = calibration_windows(tokenizer, cfg)
    for m in steps:
        t0 = time.time()
        facts = m.apply(StageContext(model, calib, cfg, Bar(progress, f"calibrate {m.name}"), tokenizer)) or {}
        facts["seconds"] = round(time.time() - t0, 3)
        method_facts[m.name] = facts
    return method_facts


def check_causal(leaks: list[str], cfg, error: type[Exception]) -> None:
    """Stop on a non-causal quantization unless the user opted in with quant.causal=false."""
    if leaks and cfg.quant.causal:
        more = f" (and {len(leaks) - 1} more)" if len(leaks) > 1 else ""
        raise error(f"non-causal quantization: {leaks[0]}{more}, so a position's scale would see later tokens "
                    "or other samples; set quant.causal=false to run it anyway (result.json then says causal: false)")


def run(cfg, out_dir: Path, explicit=None) -> dict:
    """Run one configuration end to end and write out_dir/result.json. explicit: the keys the
    user set (presets.user_keys); by default those of the running Hydra job's command line."""
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    t_start = time.time()
    explicit = hydra_user_keys() if explicit is None else explicit
    plan = preflight(cfg, explicit=explicit)
    chosen = method_set(cfg)  # the keys the user left to the method, as it set them
    torch.manual_seed(cfg.seed)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ident = run_identity(cfg)
    read_from = len(data.READ_LOG)

    @contextlib.contextmanager
    def phase(name: str):
        t0 = time.time()
        log.info("%s ...", name)
        yield
        timings[name] = round(time.time() - t0, 3)
        log.info("%s done in %.1f s", name, timings[name])

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars cover loading
    with progress_display(cfg.progress) as progress:
        with phase("load"):
            task = progress.add_task(f"load {cfg.model.name}", total=None, info="")
            lm = load_model(cfg.model, progress=lambda msg: progress.update(task, info=msg))
            progress.update(task, total=1, completed=1, info="cached" if lm.from_cache else "")
        with phase("quantize"):
            report = quantize_model(lm.model, plan)
        with phase("calibrate"):
            method_facts = calibrate(lm.model, lm.tokenizer, cfg, progress)
        leaks = model_leaks(lm.model)  # the quantizers as the methods left them
        check_causal(leaks, cfg, SurgeryError)
        frozen = freeze_quantized_weights(lm.model)  # eval only: no float copies kept
        with phase("evaluate"):
            out = TASKS[cfg.task.name].evaluate(lm, cfg, Bar(progress, f"evaluate {cfg.task.name}"))
        attn_calls = sum(getattr(m, "qsim_attn").calls for _, m in lm.model.named_modules() if hasattr(m, "qsim_attn"))
        if report.attention_sites and attn_calls == 0:
            raise SurgeryError("attention sites were instrumented but never called: the model bypassed the qsim attention function")
    declared = {(e["dataset"], e["split"]) for entries in ident["data"].values() for e in entries}
    undeclared = set(data.READ_LOG[read_from:]) - declared
    if undeclared:  # the identity would not cover this data: a task or stage must declare it (reads)
        raise RuntimeError(f"the run read data its identity does not name: {sorted(undeclared)}")

    task = TASKS[cfg.task.name]
    result = {
        "task": cfg.task.name,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "value": out["value"],
        "model": cfg.model.name,
        "model_source": lm.source,
        "model_family": lm.family,
        "checkpoint": cfg.model.checkpoint,
        "formats": {"weight": cfg.format.weight, "act": cfg.format.act, "attn": cfg.format.attn or cfg.format.act,
                    "output": cfg.format.output, "preset": cfg.format.name},
        "method": cfg.method.name,
        "steps": list(cfg.method.steps),
        "n": cfg.abfp.n if "abfp" in cfg.method.steps else None,
        "seq_len": cfg.task.seq_len,
        "protocol": cfg.task.protocol,
        "eval": out,
        "causal": not leaks,
        "causal_leaks": leaks,
        "tokens_evaluated": out.get("tokens_evaluated"),
        "quantized": {
            "layers": len(report.layers),
            "skipped": report.skipped,
            "float_modules": {reason: {"count": len(names), "names": compact_names(names)}
                              for reason, names in report.float_modules.items()},
            "skip_patterns": list(plan.skip),
            "attention_sites": len(report.attention_sites),
            "weights_frozen": frozen,
            "attention_calls": attn_calls,
            "overrides": report.overrides,
            "weight": _spec_dict(plan.default.weight),
            "act": _spec_dict(plan.default.act),
            "attention": _spec_dict(plan.attention) if report.attention_sites else None,
            "attention_v_axis": plan.v_axis if report.attention_sites else None,
            "accumulator": {**plan.accum.describe(), "matmuls": report.accum_matmuls},
        },
        "methods": method_facts,
        "method_set": chosen,
        "timings": {**timings, "total": round(time.time() - t_start, 3)},
        "versions": versions(),
        "kernels": native.kernels_in_use(),  # native.c or torch: the same numbers (qsim/native.py)
        "config": resolved,
        **ident,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(out_dir / RESULT_FILE, result)
    print_summary(result, out_dir)
    return result


def _spec_dict(spec: QuantSpec | None):
    if spec is None:
        return None
    out = {k: getattr(spec, k) for k in ("format", "element", "granularity", "axis", "block", "scale_dtype", "scale_format", "mode", "symmetric", "rounding")}
    out["scale_rule"] = spec.scale_rule if spec.scale_dtype == "e8m0" else None
    out["global_scale"] = ("static" if spec.mode == "static" else spec.global_scale) if spec.scale_dtype == "e4m3" else None
    return out


def environment_line(env: dict) -> str:
    """The environment in one line: what is in the identity, then threads and CPU (recorded)."""
    ident = env["identity"]
    packages = ", ".join(f"{k} {v}" for k, v in ident["packages"].items())
    weights = ident["weights"]
    what = (f"weights sha256 {weights['sha256'][:12]}" if "sha256" in weights
            else f"weights {weights.get('id')}@{weights['revision']}" if "revision" in weights else "generated weights")
    return f"{packages}, {what}, BLAS {ident['blas']}; {env['threads']} threads, {cpu_label(env)}"


def print_summary(result: dict, out_dir: Path) -> None:
    table = Table(title=f"qsim result ({result['identity']})", show_header=False)
    f = result["formats"]
    q = result["quantized"]
    rows = [
        ("model", f"{result['model']} ({result['model_source']})"),
        ("formats", f"W {f['weight']} / A {f['act']}" + (f" / attn {f['attn']}" if q["attention_sites"] else "")),
        ("method", f"{result['method']} {result['steps']}" + (f" n={result['n']}" if result["n"] else "")),
        ("quantized", f"{q['layers']} layers, {q['attention_sites']} attention sites, skipped {len(q['skipped'])}"),
        ("left float", "; ".join(f"{reason}: {f['count']}" for reason, f in q["float_modules"].items()) or "nothing"),
        ("task", f"{result['task']} ({result['protocol']}, seq_len {result['seq_len']}, "
                 f"{result['eval']['windows']}/{result['eval']['windows_available']} windows, {result['tokens_evaluated']} tokens)"
                 if "windows" in result["eval"] else
                 f"{result['task']} ({result['eval']['split']}, {result['eval']['samples']}/{result['eval']['samples_available']} "
                 f"samples, {result['tokens_evaluated']} tokens)"),
        (result["metric"], f"[bold]{result['value']:.4f}"),
        ("environment", environment_line(result["environment"])),
        ("time", ", ".join(f"{k} {v:.1f}s" for k, v in result["timings"].items())),
        ("result", str(out_dir / RESULT_FILE)),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
