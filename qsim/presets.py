"""What a method preset may choose, and what it may not: the keys the user wrote.

A method stage's `configure` hook rewrites the quantizer plan (rtn: per-channel weights, abfp:
n-blocks, gptq: asymmetric INT weights, mse: static per-tensor activations and quantized
attention, ...). A `quant.*` key the user did not set is the method's to choose, and result.json
records what it chose (`method_set`); a key the user set on the command line (or as a setting
of the Python API) that a stage would change is a one-line ConfigError naming the key and the
method, before any model loads. The preset's own yaml (conf/method/*.yaml) is not the user's:
a command-line value of a key it sets wins over it (Hydra applies overrides last).

Which keys a stage changes is not listed by hand: the plan is built without the method's
stages, then stage by stage, and every field that moved is mapped back to its config key.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from .config import ConfigError

# plan operand -> (its spec's config section, the format key)
OPERANDS = {"weight": ("quant.weight", "format.weight"), "act": ("quant.act", "format.act"),
            "output": ("quant.act", "format.output"), "attention": ("quant.act", "format.attn")}
SPEC_KEYS = ("granularity", "axis", "block", "scale_dtype", "symmetric")  # quant.<weight|act>.<field>
GLOBAL_KEYS = {"rounding": "quant.rounding", "scale_rule": "quant.scale_rule"}

# The method's own key that sets what a quant.* key would (said in the error).
OWN_KEYS = {
    ("abfp", "quant.weight.block"): "abfp.n", ("abfp", "quant.act.block"): "abfp.n",
    ("abfp", "quant.weight.scale_dtype"): "abfp.scale_dtype", ("abfp", "quant.act.scale_dtype"): "abfp.scale_dtype",
    ("abfp", "quant.act.axis"): "abfp.act_axis", ("abfp", "quant.attention"): "abfp.attention",
    ("gptq", "quant.weight.granularity"): "gptq.granularity or gptq.group_size",
    ("gptq", "quant.weight.block"): "gptq.group_size (or abfp.n with gptq.granularity=block)",
    ("gptq", "quant.weight.scale_dtype"): "abfp.scale_dtype (with gptq.granularity=block)",
    ("gptq", "quant.weight.symmetric"): "gptq.symmetric",
    ("fpt", "quant.weight.granularity"): "fpt.weight_granularity", ("fpt", "quant.attention"): "fpt.attention",
    ("mse", "quant.attention"): "mse.attention",
}


def user_keys(overrides) -> frozenset[str]:
    """The config keys a list of Hydra overrides sets (`a.b=1` -> a.b; `a={b:1}` -> a.b); group
    choices (`method=rtn`, `+experiment=...`) and deletions set no key of their own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import CONF_DIR

    out = set()
    for o in OverridesParser.create().parse_overrides([str(x) for x in overrides]):
        key = o.key_or_group
        if o.is_delete() or key.startswith("hydra") or (CONF_DIR / key).is_dir() or "/" in key:
            continue
        value = None if o.is_sweep_override() else o.value()
        if isinstance(value, dict):  # quant.weight={granularity:block}: the keys inside
            out.update(f"{key}.{k}" for k, _ in _flat(value))
        else:
            out.add(key)
    return frozenset(out)


def _flat(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def hydra_user_keys() -> frozenset[str] | None:
    """The keys the running Hydra job's command line set (a single run or a multirun job);
    None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return user_keys(HydraConfig.get().overrides.task)


def _fields(operand: str, spec) -> dict:
    """config key -> this spec's value for it; {} for no spec. An fp32 operand counts too: the
    result would still name a setting that did not run."""
    if spec is None:
        return {}
    section, fmt_key = OPERANDS[operand]
    out = {f"{section}.{f}": getattr(spec, f) for f in SPEC_KEYS}
    out.update({key: getattr(spec, f) for f, key in GLOBAL_KEYS.items()})
    out[fmt_key] = spec.format
    return out


def _snapshot(plan) -> dict:
    """(operand, key) -> value, and whether attention is quantized."""
    out = {("attention", "quant.attention"): plan.attention is not None}
    for operand in OPERANDS:
        spec = plan.attention if operand == "attention" else getattr(plan.default, operand)
        out.update({(operand, k): v for k, v in _fields(operand, spec).items()})
    return out


def _configured(cfg, key: str):
    if key == "format.attn":
        return cfg.format.attn or cfg.format.act
    return OmegaConf.select(cfg, key)


def method_set(cfg) -> list[dict]:
    """Every config value the method's stages changed in the plan: {key, operand, value (what
    runs), config (what the config says), by (the last stage that set it)}, in plan order."""
    from .methods import METHODS
    from .run import build_plan

    plan = build_plan(cfg, steps=())
    before = _snapshot(plan)
    by: dict = {}
    for step in cfg.method.steps:
        METHODS[step].configure(plan, cfg)
        now = _snapshot(plan)
        by.update({k: step for k, v in now.items() if k not in before or before[k] != v})
        before = now
    out = []
    for (operand, key), step in by.items():
        configured = _configured(cfg, key)
        if before[(operand, key)] != configured:
            out.append({"key": key, "operand": operand, "value": before[(operand, key)], "config": configured, "by": step})
    return out


def check_user_keys(cfg, explicit) -> list[dict]:
    """method_set(cfg), after refusing (ConfigError) a key in `explicit` that a stage changes."""
    chosen = method_set(cfg)
    for c in chosen:
        if c["key"] in (explicit or ()):
            own = OWN_KEYS.get((c["by"], c["key"]))
            raise ConfigError(
                f"{c['key']}={_show(c['config'])} is set, but method {cfg.method.name!r} (its {c['by']} stage) sets it to "
                f"{_show(c['value'])}" + (f" ({c['operand']})" if c["operand"] not in c["key"] else "") + ": drop the key"
                + (f", or set {own}" if own else ", or use a method that keeps it"))
    return chosen


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
