"""`task=lm_eval`: lm-evaluation-harness on the simulated model, in memory.

lm-eval's HFLM takes the quantized model object itself (no save and reload, so every
quantizer, rotation and attention hook stays in place). `task.tasks` names lm-eval tasks:
its registry's (they read the hub: online only), YAML task files in `task.include_path`,
or the ones qsim ships offline over QSIM_DATA_DIR:

- qsim_sst2: GLUE SST-2 dev as multiple choice (lm-eval's own sst2 prompt), metric acc.

Every metric lm-eval returns is recorded (eval.lm_eval.<task>.<metric>); the run's value is
the first task's first metric (acc when it has one), named in eval.value_metric.

Task files are code: a YAML's `!function` imports Python, `class:` builds a Python task and
the Jinja prompt templates render unsandboxed, all with the user's rights. So a task name that
is a path loads only from inside an explicit task.include_path (the folder the user vouches
for), and lm-eval's confirm_run_unsafe_code (tasks that execute model output) stays off unless
task.confirm_run_unsafe_code=true, which result.json records. Names are resolved before the
model loads; indexing YAMLs there runs no code (lm-eval parses them with a safe loader).
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import tempfile
from pathlib import Path

import yaml

from .. import data
from . import TASKS, Task

# qsim's offline lm-eval tasks: name -> ((dataset, split) it reads, its lm-eval task config)
OFFLINE_TASKS = {
    "qsim_sst2": (("sst2", "validation"), {
        "task": "qsim_sst2",
        "dataset_path": "csv",
        "dataset_kwargs": {"delimiter": "\t", "quoting": 3},  # the file is a TSV with no quoting
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "doc_to_text": "{{text}}\nQuestion: Is this sentence positive or negative?\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": ["negative", "positive"],
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }),
}


def path_like(name: str) -> bool:
    """A task name lm-eval would read as a YAML file path rather than look up."""
    return "/" in name or name.startswith("~") or name.endswith((".yaml", ".yml"))


def _check_path(name: str, include_path: str | None) -> None:
    from lm_eval.tasks._index import TaskIndex

    if include_path is None:
        raise data.DataError(f"task.tasks: {name!r} is a path; lm-eval task files are code, so a path loads only "
                             "from inside an explicit task.include_path (a folder you trust)")
    path, root = Path(name).expanduser().resolve(), Path(include_path).expanduser().resolve()
    if not path.is_relative_to(root):
        raise data.DataError(f"task.tasks: {name} is outside task.include_path={include_path}")
    try:
        entry = TaskIndex.entry_from_path(path)  # parses only (functions unresolved): no code runs
    except Exception as err:  # yaml errors, include cycles, ...
        raise data.DataError(f"task.tasks: {name} is not a readable lm-eval task YAML "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    if entry is None:
        raise data.DataError(f"task.tasks: {name} is not a file naming an lm-eval task or group (task: / group:)")


@functools.lru_cache(maxsize=4)
def _include_names(include_path: str) -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=include_path, include_defaults=False).all_tasks)


@functools.lru_cache(maxsize=1)
def registry_names() -> frozenset[str]:
    """Every task, group and tag name of the installed lm-eval's own registry. Indexing it parses
    ~15k YAMLs (7 s on 2 cores), so the names are cached on disk per lm-eval install."""
    import lm_eval
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    from ..environment import cache_dir

    tasks_dir = Path(lm_eval.tasks.__file__).parent
    key = {"lm_eval": lm_eval.__version__, "dir": str(tasks_dir), "mtime_ns": tasks_dir.stat().st_mtime_ns}
    cache = cache_dir() / "lm-eval-task-names.json"
    try:
        saved = json.loads(cache.read_text())
        if saved["key"] == key:
            return frozenset(saved["names"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    names = frozenset(TaskManager().all_tasks)
    try:  # a cache that cannot be written only costs time
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "names": sorted(names)}))
        os.replace(tmp, cache)
    except OSError:
        pass
    return names


def _check(cfg) -> None:
    if not cfg.task.tasks:
        raise data.DataError("task=lm_eval needs task.tasks=[...] (e.g. task.tasks=[qsim_sst2])")
    for name in cfg.task.tasks:
        if name in OFFLINE_TASKS:
            data.check_available(*OFFLINE_TASKS[name][0])
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise data.DataError("task=lm_eval needs lm-evaluation-harness: pip install lm_eval (make install does)") from None
    include = cfg.task.include_path
    for name in cfg.task.tasks:
        if path_like(name):
            _check_path(name, include)
    # names: qsim's offline tasks, then include_path's, then lm-eval's registry (slowest, cached)
    unknown = [n for n in cfg.task.tasks if n not in OFFLINE_TASKS and not path_like(n)]
    if unknown and include is not None:
        unknown = [n for n in unknown if n not in _include_names(str(Path(include).expanduser().resolve()))]
    if unknown:
        registry = registry_names()
        unknown = [n for n in unknown if n not in registry]
    if unknown:
        near = difflib.get_close_matches(unknown[0], [*OFFLINE_TASKS, *registry], n=3)
        import lm_eval

        where = ", ".join([f"qsim's offline tasks ({', '.join(OFFLINE_TASKS)})", f"lm-eval {lm_eval.__version__}'s registry"]
                          + (["task.include_path's YAMLs"] if include is not None else []))
        raise data.DataError(f"unknown lm-eval task {unknown[0]!r} (not in {where})"
                             + (f"; close: {', '.join(near)}" if near else ""))


def _reads(cfg) -> list[tuple[str, str]]:
    return [OFFLINE_TASKS[name][0] for name in cfg.task.tasks if name in OFFLINE_TASKS]


def _write_offline_tasks(folder: Path, names: list[str]) -> None:
    for name in names:
        (dataset, split), spec = OFFLINE_TASKS[name]
        spec = {**spec, "dataset_kwargs": {**spec["dataset_kwargs"],
                                           "data_files": {"validation": str(data.offline_path(dataset, split))}}}
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _evaluate(lm, cfg, progress=None) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for dataset, split in _reads(cfg):
        data.READ_LOG.append((dataset, split))  # lm-eval reads the file itself
    with tempfile.TemporaryDirectory(prefix="qsim-lm-eval-") as folder:
        _write_offline_tasks(Path(folder), [n for n in cfg.task.tasks if n in OFFLINE_TASKS])
        include = [folder] + ([cfg.task.include_path] if cfg.task.include_path else [])
        model = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=cfg.task.batch_size,
                     max_length=cfg.task.seq_len)
        out = lm_eval.simple_evaluate(model=model, tasks=list(cfg.task.tasks), limit=cfg.task.max_samples,
                                      task_manager=TaskManager(include_path=include), num_fewshot=None,
                                      log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0,
                                      confirm_run_unsafe_code=bool(cfg.task.confirm_run_unsafe_code))
    metrics = {task: {k: v for k, v in values.items() if k != "alias"} for task, values in out["results"].items()}
    first = metrics[cfg.task.tasks[0]]
    name = "acc,none" if "acc,none" in first else next(k for k, v in first.items() if isinstance(v, (int, float)))
    samples = {task: int(n["effective"]) for task, n in out.get("n-samples", {}).items()}
    return {"value": float(first[name]), "value_metric": f"{cfg.task.tasks[0]}/{name}", "lm_eval": metrics,
            "samples": sum(samples.values()), "samples_available": sum(int(n["original"]) for n in out.get("n-samples", {}).values()),
            "samples_per_task": samples, "split": "lm-eval", "tokens_evaluated": None,
            "lm_eval_version": lm_eval.__version__, "confirm_run_unsafe_code": bool(cfg.task.confirm_run_unsafe_code)}


TASKS["lm_eval"] = Task("lm_eval", "lm_eval", _check, _evaluate, reads=_reads, higher_is_better=True,
                        families=("causal-lm", "code-lm"))
