"""`task=lm_eval`: lm-evaluation-harness on the simulated model, in memory.

lm-eval's HFLM takes the quantized model object itself (no save and reload, so every
quantizer, rotation and attention hook stays in place). `task.tasks` names lm-eval tasks:
its registry's (they read the hub: online only), YAML task files in `task.include_path`,
or the ones qsim ships offline over QSIM_DATA_DIR:

- qsim_sst2: GLUE SST-2 dev as multiple choice (lm-eval's own sst2 prompt), metric acc.

Every metric lm-eval returns is recorded (eval.lm_eval.<task>.<metric>); the run's value is
the first task's first metric (acc when it has one), named in eval.value_metric.
"""
from __future__ import annotations

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
                                      torch_random_seed=0, fewshot_random_seed=0)
    metrics = {task: {k: v for k, v in values.items() if k != "alias"} for task, values in out["results"].items()}
    first = metrics[cfg.task.tasks[0]]
    name = "acc,none" if "acc,none" in first else next(k for k, v in first.items() if isinstance(v, (int, float)))
    samples = {task: int(n["effective"]) for task, n in out.get("n-samples", {}).items()}
    return {"value": float(first[name]), "value_metric": f"{cfg.task.tasks[0]}/{name}", "lm_eval": metrics,
            "samples": sum(samples.values()), "samples_available": sum(int(n["original"]) for n in out.get("n-samples", {}).values()),
            "samples_per_task": samples, "split": "lm-eval", "tokens_evaluated": None,
            "lm_eval_version": lm_eval.__version__}


TASKS["lm_eval"] = Task("lm_eval", "lm_eval", _check, _evaluate, reads=_reads, higher_is_better=True,
                        families=("causal-lm", "code-lm"))
