"""The `qsim` command: `qsim run ...` (the Hydra app), `qsim formats`.

Bad input (unknown name, out-of-range value, unknown key, missing data) is
caught before any model loads and reported on one line, with exit code 2.
"""
from __future__ import annotations

import itertools
import logging
import sys
from pathlib import Path

USAGE = """usage: qsim <command> [args]

commands:
  run [-m] [key=value ...]   quantize, calibrate and evaluate (Hydra overrides; -m sweeps)
  formats                    list the registered number formats
  export-overrides RESULT.json
                             print a run's per-layer formats (mofq) as a quant.overrides file:
                             `> conf/overrides/my.yaml`, then `qsim run +overrides=my ...`
  sensitivity [key=value ...]
                             per layer: the loss change of quantizing only it, and of
                             quantizing all but it (CSV, PNG, top layers)
  tables [--results DIR] [--out DIR]
                             rebuild the paper's tables and figures from the results
                             (Markdown, CSV, PNG in results/tables/); never runs a model
"""

EXIT_BAD_INPUT = 2


def fail(message: str) -> "NoReturn":  # noqa: F821
    print(f"qsim: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "formats":
        return cmd_formats()
    if command == "export-overrides":
        return cmd_export_overrides(rest)
    if command == "sensitivity":
        from .sensitivity import cmd_sensitivity

        return cmd_sensitivity(rest)
    if command == "tables":
        from .tables import cmd_tables

        return cmd_tables(rest)
    fail(f"unknown command {command!r}; valid: run, formats, export-overrides, sensitivity, tables")


# ---------------------------------------------------------------- formats

def cmd_formats() -> None:
    from rich.console import Console
    from rich.table import Table

    from .formats import format_table

    table = Table(title="qsim number formats (bare e<k>m<m> and int<b> names are accepted too)")
    for col in ("name", "kind", "bits", "max", "min subnormal", "values", "special"):
        table.add_column(col, justify="right" if col in ("bits", "max", "min subnormal", "values") else "left")
    for r in format_table():
        table.add_row(r["name"], r["kind"], str(r["bits"]), f"{r['max']:.6g}", f"{r['min_subnormal']:.6g}",
                      str(r["values"]), r["special"])
    Console().print(table)
    from .quantizer import SCALED_FORMATS

    scaled = Table(title="scaled formats (their own block scaling along the reduction axis)")
    for col in ("name", "element", "block", "scale", "bits per element"):
        scaled.add_column(col, justify="right" if col in ("block", "bits per element") else "left")
    for name, f in SCALED_FORMATS.items():
        scale = "E8M0" if f.scale_dtype == "e8m0" else "E4M3 x fp32 per tensor/token"
        scaled.add_row(name, f.element, str(f.block), scale, f"{f.bits_per_element:g}")
    Console().print(scaled)


# ---------------------------------------------------------------- export-overrides

def overrides_yaml(result: dict) -> str:
    """The per-layer formats a run chose (its mofq stage) as a Hydra config for quant.overrides:
    one exact layer name per entry, so a later run puts the same format on each layer."""
    from omegaconf import OmegaConf

    chosen = result.get("methods", {}).get("mofq", {}).get("layers")
    if not chosen:
        raise ValueError("the result has no per-layer formats (methods.mofq.layers): it was not a mofq run")
    overrides = {name: {role: c["format"] for role, c in roles.items()} for name, roles in chosen.items()}
    header = (f"# @package quant.overrides\n# per-layer formats chosen by mofq in result {result.get('identity')} "
              f"({result.get('model')}, W {result['formats']['weight']} / A {result['formats']['act']}, "
              f"steps {result.get('steps')}); load with `qsim run +overrides=<this file's name> ...`\n")
    return header + OmegaConf.to_yaml(OmegaConf.create(overrides))


def cmd_export_overrides(args: list[str]) -> None:
    import json

    if len(args) != 1:
        fail("usage: qsim export-overrides RESULT.json > conf/overrides/NAME.yaml")
    path = Path(args[0])
    if path.is_dir():
        path = path / "result.json"
    try:
        result = json.loads(path.read_text())
        text = overrides_yaml(result)
    except (OSError, ValueError) as err:
        fail(f"{path}: {err}")
    sys.stdout.write(text)


# ---------------------------------------------------------------- run

def _split_args(args: list[str]):
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    multirun = "-m" in flags or "--multirun" in flags
    return overrides, multirun


def _job_variants(overrides: list[str]) -> list[list[str]]:
    """Override lists that cover every sweep value once (not the full product)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed, sweeps = [], []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            prefix = "+" if o.is_add() else ("++" if o.is_force_add() else "")
            sweeps.append([f"{prefix}{o.key_or_group}={v}" for v in o.sweep_string_iterator()])
        else:
            fixed.append(o.input_line)
    if not sweeps:
        return [fixed]
    firsts = [s[0] for s in sweeps]
    variants = []
    for i, values in enumerate(sweeps):
        for v in values:
            variants.append(fixed + firsts[:i] + [v] + firsts[i + 1:])
    return variants


def explain_compose_error(err: Exception, overrides: list[str]) -> str:
    from hydra.errors import MissingConfigException

    from .config import CONF_DIR, group_choices

    text = str(err)
    if isinstance(err, MissingConfigException) or "Could not find" in text:
        for o in overrides:
            key, _, value = o.lstrip("+~").partition("=")
            if "." not in key and "/" not in key and (CONF_DIR / key).is_dir():
                if value not in group_choices(key):
                    return f"unknown {key} {value!r}; valid: {', '.join(group_choices(key))}"
    cause = err.__cause__ or err
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    first = lines[0] if lines else type(err).__name__
    if "not in struct" in text or "Key '" in first and "not in" in first:
        key = next((ln.split("full_key:")[1].strip() for ln in lines if "full_key:" in ln), None)
        if key and key.startswith("quant.overrides"):
            return "quant.overrides takes new patterns with a '+': '+quant.overrides={*.fc2:{act:int8}}'"
        return f"unknown config key {key or first!r} ({first})"
    full_key = next((ln.split("full_key:")[1].strip() for ln in lines if "full_key:" in ln), None)
    return f"{full_key}: {first}" if full_key else first


def check_output_dir(key: str, value: str) -> None:
    """Hydra makes the run's folder only after preflight (an OSError traceback there): probe now
    by making and removing a folder where it would go, in its nearest existing ancestor."""
    import shutil
    import tempfile

    target = Path(value).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        fail(f"{key}={value}: {existing} is not a folder")
    try:
        shutil.rmtree(tempfile.mkdtemp(dir=existing, prefix=".qsim-probe-"))
    except OSError as err:
        fail(f"{key}={value}: cannot create a folder in {existing} ({err.strerror or err})")


def preflight_overrides(overrides: list[str], multirun: bool = False) -> int:
    """Compose and check every job's config before Hydra starts; returns the job count checked."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from . import data
    from .config import CONF_DIR, ConfigError, register_configs
    from .presets import user_keys
    from .run import preflight

    register_configs()
    try:
        variants = _job_variants(overrides)
    except Exception as err:  # override grammar
        fail(f"bad override: {str(err).splitlines()[0]}")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qsim"):
        for variant in variants:
            try:
                cfg = compose(config_name="config", overrides=variant)
            except Exception as err:
                fail(explain_compose_error(err, variant))
            try:
                preflight(cfg, explicit=user_keys(variant))
            except (ConfigError, data.DataError) as err:
                fail(str(err))
        # the output folder: the variants drop hydra.* overrides, so compose them with the first
        hydra_keys = [o for o in overrides if o.lstrip("+~").startswith("hydra")]
        try:
            hydra_cfg = compose(config_name="config", overrides=hydra_keys + variants[0], return_hydra_config=True).hydra
            out = hydra_cfg.sweep.dir if multirun else hydra_cfg.run.dir
        except Exception:  # e.g. a sweep over a hydra.* key: Hydra reports its own overrides
            out = None
        if out is not None:
            check_output_dir("hydra.sweep.dir" if multirun else "hydra.run.dir", str(out))
    GlobalHydra.instance().clear()
    return len(variants)


def cmd_run(args: list[str]) -> None:
    overrides, multirun = _split_args(args)
    if not any(a in ("--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help") for a in args):
        from .sweep import merged_overrides

        # a multirun checks every cell of an experiment's grid, not only the first
        to_check = overrides
        if multirun:
            try:
                to_check = merged_overrides(overrides)
            except Exception:  # a bad name: the per-job check below says which, on one line
                pass
        preflight_overrides(to_check, multirun)
    sys.argv = ["qsim"] + args
    hydra_app()


def hydra_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from .config import CONF_DIR, register_configs

    register_configs()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
    def _job(cfg: DictConfig) -> float | None:
        from . import data
        from .config import ConfigError
        from .methods import MethodError
        from .models import ModelLoadError
        from .run import run
        from .surgery import SurgeryError
        from .sweep import is_multirun, run_sweep_job

        if is_multirun():  # resume, fail-soft, status per job (qsim/sweep.py)
            return run_sweep_job(cfg)
        out_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            return run(cfg, out_dir)["value"]
        except (ConfigError, data.DataError, MethodError, ModelLoadError, SurgeryError) as err:
            logging.getLogger("qsim").error("%s", err)
            fail(str(err))

    _job()


if __name__ == "__main__":
    main()
