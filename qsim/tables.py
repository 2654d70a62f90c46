"""`qsim tables`: the paper's tables and figures rebuilt from result.json files.

Reads results only, never runs a model (and never imports torch). Each paper
table keeps the paper's rows and columns, taken from the paper's own numbers
(results/paper/int_fp_qsim_tables.csv). A cell is matched by content, not by
the experiment that made it:

- row = model, checkpoint, task, seq_len, tokenization protocol, split and how
  much of it was evaluated. A paper row is the paper's fine-tuned checkpoint on
  the whole validation split with run_clm tokenization at the paper's seq_len
  (what conf/experiment/row/opt-*.yaml run). Any other evaluation (SmolLM2, a
  few windows, another protocol) gets its own row below the paper's, labelled
  with what differs, so a partial run is never compared to the paper's number.
- column = weight format, activation format, method steps, ABFP n.
- everything else that can change the number is the cell's definition too: a
  cell is what conf/experiment/row/ and col/ set on top of the schema's
  defaults and the model's preset (attention operands on or off, dtype,
  calibration, skip list, output/attention formats, each used stage's
  settings, seed, causal). A result that differs from it in any of these gets
  its own row, labelled with the differing values (`variant`).

Only fresh results count: a stale one (results.stale_reason: another numerics
version, changed data or defaults, another environment, no identity) never fills
a cell, and `qsim tables` says how many it ignored and why; a malformed file
(results.result_problem) is skipped and counted the same way. The CPU is recorded,
not part of the identity: a table whose results ran on more than one CPU says
which in a footnote.

A cell shows ours / paper (ours - paper). "missing" is a cell with no result
yet; "-" is a cell the paper has no number for. When several results match a
cell (re-runs), the newest (finished_at) is used and a footnote says which.
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .environment import cpu_label
from .results import ADDED_KEYS, NON_SEMANTIC, load_all_results, malformed_line, stale_reason

# results/paper/ and conf/, beside the code (symlinks in a checkout, package data in a wheel)
PAPER_CSV = Path(__file__).resolve().parent / "paper" / "int_fp_qsim_tables.csv"
CONF = Path(__file__).resolve().parent / "conf"
MODEL_CONF_DIR = CONF / "model"

TABLES = ("I", "II", "III", "IV", "V", "VI", "VII", "VIII", "X")
ARABIC = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6, "VII": 7, "VIII": 8, "IX": 9, "X": 10}
TITLES = {
    "I": "W4A4: static MSE calibration vs ABFP (n=64)",
    "II": "4-bit integer vs 4-bit floating point (E2M1, E1M2) weights and activations, ABFP (n=64)",
    "III": "W4A4 accuracy recovery on top of ABFP (n=64): QAT and SmoothQuant",
    "IV": "W4A8: static MSE calibration vs ABFP (n=64)",
    "V": "INT4 weights with E4M3 activations and ABFP (n=64) vs GPTQ (INT4 weights, FP16 activations)",
    "VI": "E4M3 vs INT8 activations (INT4 weights) with ABFP (n=64) and ABFP with SmoothQuant",
    "VII": "W4A8 accuracy recovery on top of ABFP (n=64): QAT and SmoothQuant; GPTQ (W4A16)",
    "VIII": "ABFP (n=64) vs RPTQ, W4A4 and W4A8",
    "X": "ABFP (n=64) on more models and tasks, W4A4 and W4A8",
}
PRETTY_MODELS = {
    "opt-125m": "OPT 125M", "opt-350m": "OPT 350M", "opt-1.3b": "OPT 1.3B", "opt-2.7b": "OPT 2.7B",
    "codegen-2b": "Codegen 2B", "codegen-6b": "Codegen 6B", "bert-base": "BERT-base", "bert-large": "BERT-large",
    "vit-l-16": "ViT-large-16", "vit-l-32": "ViT-large-32", "imagebind": "ImageBind",
    "maskformer-base": "Maskformer-base", "maskformer-large": "Maskformer-large", "graphormer": "Graphormer",
    "stable-diffusion-v1.4": "Stable Diffusion v1.4",
}
FORMAT_LABELS = {("fp32", "fp32"): "FP32", ("int4", "int4"): "W4A4", ("int4", "int8"): "W4A8",
                 ("e2m1", "e2m1"): "E2M1", ("e1m2", "e1m2"): "E1M2", ("int4", "e4m3"): "W4-AE4M3",
                 ("int4", "fp16"): "W4A16", ("int8", "int8"): "W8A8"}
METHOD_LABELS = {"none": "", "mse": "MSE", "abfp": "ABFP", "abfp-qat": "ABFP-QAT", "abfp-sq": "ABFP-SQ",
                 "gptq": "GPTQ", "rptq": "RPTQ"}
# How the paper evaluated its perplexity rows (conf/experiment/row/opt-*.yaml run exactly this).
PAPER_EVAL = {"checkpoint": "paper", "protocol": "paper", "split": "validation", "windows": None, "variant": ()}
# The paper's other metrics: the task qsim scores them with (its whole split, the hub checkpoint
# of Table XI). Rows of these tasks match on model, task and extent; seq_len and the
# tokenization protocol are not theirs (they are settings, a variant when they differ).
METRIC_TASKS = {"ppl": "wikitext2", "f1": "squad", "pass@1": "humaneval", "accuracy": "imagenet", "miou": "ade20k"}
TASK_SPLITS = {"squad": "validation", "humaneval": "test", "imagenet": "validation", "sst2": "validation",
               "stsb": "validation", "ade20k": "validation"}
TASK_METRICS = {"wikitext2": "ppl", "squad": "F1", "humaneval": "pass@1", "imagenet": "top-1", "sst2": "accuracy",
                "stsb": "Spearman", "ade20k": "mIoU"}
PERPLEXITY_TASKS = ("wikitext2",)
# Footnotes a table always carries.
TABLE_NOTES = {
    "VIII": "All columns quantize the same operands: every linear's weights and inputs and the attention "
            "matmul operands (RPTQ columns: quant.attention=true, dynamic per-token scales on the attention "
            "operands, since qsim's RPTQ clusters only linear inputs; ABFP columns: n=64 blocks).",
}
CAUSAL_NOTE = ("† non-causal (the result says `causal: false`): a quantization scale at position i may "
               "depend on later tokens, which a causal model cannot do when generating.")


@dataclass(frozen=True)
class Column:
    weight: str
    act: str
    method: str
    n: int | None

    @property
    def label(self) -> str:
        fmt = FORMAT_LABELS.get((self.weight, self.act), f"W-{self.weight} A-{self.act}")
        if (self.weight, self.act, self.method) == ("fp32", "fp32", "none"):
            return "FP32"
        method = METHOD_LABELS.get(self.method, self.method)
        n = f" n={self.n}" if self.n not in (None, 64) else ""
        return " ".join(x for x in (fmt, method) if x) + n


@dataclass(frozen=True)
class Row:
    model: str
    checkpoint: str
    seq_len: int | None
    protocol: str
    split: str
    windows: int | None  # how much was evaluated (windows, or samples for other tasks); None: the whole split
    task: str = "wikitext2"
    variant: tuple[str, ...] = ()  # "key=value" where the result differs from its cell's definition

    @property
    def is_paper_eval(self) -> bool:
        if self.task not in PERPLEXITY_TASKS:
            return (self.checkpoint, self.split, self.windows, self.variant) == ("base", TASK_SPLITS.get(self.task, "validation"), None, ())
        return all(getattr(self, k) == v for k, v in PAPER_EVAL.items())

    @property
    def label(self) -> str:
        paper_row = self.is_paper_eval and (self.task in PERPLEXITY_TASKS or self.model in PRETTY_MODELS)
        name = PRETTY_MODELS.get(self.model, self.model) if paper_row else self.model
        text = f"{name} ({self.seq_len})" if self.seq_len else name
        if paper_row:
            return text
        unit = "window" if self.task in PERPLEXITY_TASKS else "sample"
        extent = f"all {unit}s" if not self.windows else f"{self.windows} {unit}{'s' * (self.windows != 1)}"
        if self.task in PERPLEXITY_TASKS:
            notes = ([] if self.task == "wikitext2" else [self.task]) + [self.split, extent, f"{self.protocol} protocol"]
        else:
            notes = [f"{self.task} {TASK_METRICS.get(self.task, '')}".strip(), self.split, extent]
        if self.checkpoint != "paper" and self.model.startswith("opt-"):
            notes.append(f"{self.checkpoint} checkpoint")
        return f"{text} [{', '.join(notes + list(self.variant))}]"

    @property
    def causal(self) -> bool:
        return "causal=false" not in self.variant


def paper_row(model: str, seq_len: int | None, metric: str = "ppl") -> Row:
    """The paper's perplexities are WikiText-2 (its own evaluation); its other metrics are
    tasks (METRIC_TASKS) on their whole split with the hub checkpoint."""
    task = METRIC_TASKS.get(metric, metric)
    if task in PERPLEXITY_TASKS:
        return Row(model, PAPER_EVAL["checkpoint"], seq_len, PAPER_EVAL["protocol"], PAPER_EVAL["split"], None, task=task)
    return Row(model, "base", None, "-", TASK_SPLITS.get(task, "validation"), None, task=task)


@dataclass
class PaperCell:
    table: str
    row: Row
    column: Column
    metric: str
    value: float
    text: str


def load_paper(path: Path = PAPER_CSV) -> list[PaperCell]:
    cells = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            cells.append(PaperCell(
                table=rec["table"],
                row=paper_row(rec["model"], int(rec["seq_len"]) if rec["seq_len"] else None, rec["metric"]),
                column=Column(rec["weights"], rec["activations"], rec["method"], int(rec["n"]) if rec["n"] else None),
                metric=rec["metric"], value=float(rec["value"]), text=rec["value"]))
    return cells


# ------------------------------------------------------------ what defines a cell

ROW_KEYS = {"model.name", "model.checkpoint", "task.name", "task.protocol", "task.split", "task.seq_len", "task.max_windows",
            "task.max_samples"}
COLUMN_KEYS = {"format.weight", "format.act", "method.steps"}  # and abfp.n when abfp is a step
PRESET_NAMES = {"format.name", "method.name"}  # a preset is its values
STAGE_SECTIONS = ("abfp", "mse", "smoothquant", "gptq", "rptq", "qat")  # settings that matter only when the stage runs
_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _flat(values, prefix: str = "") -> dict:
    out = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _load_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _overrides(doc: dict) -> dict:
    """group -> option of a config's `- override /<group>: <option>` defaults."""
    out = {}
    for item in doc.get("defaults") or []:
        if isinstance(item, dict):
            for k, v in item.items():
                out[k.replace("override", "").strip().strip("/")] = v
    return out


@functools.lru_cache(maxsize=1)
def _presets() -> dict[str, dict[str, dict]]:
    """group -> option -> its flat settings (with the group prefix), for model, format, method."""
    out = {}
    for group in ("model", "format", "method", "task"):
        out[group] = {}
        for path in sorted((CONF / group).glob("*.yaml")):
            doc = _load_yaml(path)
            doc.pop("defaults", None)
            # a preset that also sets other sections (conf/method/fpt.yaml) is written from the root
            is_global = path.read_text().startswith("# @package _global_")
            out[group][path.stem] = _flat(doc, "" if is_global else group + ".")
    return out


def _method_name(steps: list[str]) -> str:
    """The method preset with these steps (what the paper's columns name), else the steps joined."""
    for name, flat in sorted(_presets()["method"].items()):
        if list(flat.get("method.steps", [])) == list(steps):
            return name
    return "+".join(steps) or "none"


@functools.lru_cache(maxsize=1)
def _experiment_parts() -> tuple[list[tuple[str, dict]], dict["Column", dict]]:
    """conf/experiment/row/*.yaml as (model, flat settings), and col/*.yaml by the column they make."""
    presets = _presets()
    rows = []
    for path in sorted((CONF / "experiment" / "row").glob("*.yaml")):
        doc = _load_yaml(path)
        picks = _overrides(doc)
        doc.pop("defaults", None)
        task = presets["task"].get(picks.get("task", "wikitext2"), {}).get("task.name")  # the row's task picks its row
        rows.append((picks.get("model"), {"task.name": task, **_flat(doc)}))
    cols = {}
    for path in sorted((CONF / "experiment" / "col").glob("*.yaml")):
        doc = _load_yaml(path)
        picks = _overrides(doc)
        doc.pop("defaults", None)
        fmt, method = presets["format"][picks["format"]], presets["method"][picks["method"]]
        settings = {**fmt, **method, **_flat(doc)}
        steps = list(settings.get("method.steps", []))
        n = settings.get("abfp.n", _schema_flat()["abfp.n"]) if "abfp" in steps else None
        cols[Column(fmt["format.weight"], fmt.get("format.act", "fp32"), _method_name(steps), n)] = settings
    return rows, cols


@functools.lru_cache(maxsize=1)
def _schema_flat() -> dict:
    from .results import schema_defaults

    return _flat(schema_defaults())


def cell_standard(config: dict, column: "Column") -> dict:
    """The flat config that defines the cell `config` lands in: the schema's defaults, the
    model's preset, the settings of its experiment row (conf/experiment/row/ for this model,
    the one with the same task settings if several) and of the column's col/*.yaml."""
    flat = _flat(config)
    standard = dict(_schema_flat())
    standard.update(next((p for p in _presets()["model"].values() if p.get("model.name") == flat.get("model.name")), {}))
    standard.update(next((p for p in _presets()["task"].values() if p.get("task.name") == flat.get("task.name")), {}))
    rows, cols = _experiment_parts()
    mine = [settings for model, settings in rows if model == flat.get("model.name")]
    same_task = [s for s in mine if all(flat.get(k) == v for k, v in s.items() if k.startswith("task."))]
    if same_task or mine:
        standard.update((same_task or mine)[0])
    standard.update(cols.get(column, {}))
    for k, v in standard.items():  # ${task.seq_len}: the result's own value
        m = _INTERPOLATION.match(v) if isinstance(v, str) else None
        if m:
            standard[k] = flat.get(m.group(1))
    return standard


def _relevant(key: str, flat: dict, steps: list[str], calibrated: bool) -> bool:
    section = key.split(".")[0]
    if section == "calib":
        return calibrated
    if section == "abfp" and "gptq" in steps and flat.get("gptq.granularity") == "block":
        return key != "abfp.n" or "abfp" not in steps  # GPTQ's ABFP blocks follow abfp.*
    if section in STAGE_SECTIONS:
        return section in steps and key != "abfp.n"  # abfp.n is the column's n
    return True


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def variant(config: dict, column: "Column", calibrated: bool, causal: bool = True) -> tuple[str, ...]:
    """"key=value" for every value of the resolved `config` that can change the number and differs
    from the definition of the cell it would fill (cell_standard); () when it is that cell."""
    flat = _flat(config)
    for path, default in ADDED_KEYS.items():  # a result made before a key existed ran at its default
        flat.setdefault(".".join(path), default)
    standard = cell_standard(config, column)
    steps = list(flat.get("method.steps") or [])
    skip = ROW_KEYS | COLUMN_KEYS | PRESET_NAMES | {".".join(k) for k in NON_SEMANTIC}
    if flat.get("task.name") not in PERPLEXITY_TASKS:  # not in a task row: a setting like any other
        skip = skip - {"task.seq_len"}
    for side in (flat, standard):  # attention operands in the activation format unless said otherwise
        if side.get("format.attn") in (None, flat.get("format.act")):
            side["format.attn"] = None
    out = [f"{k}={_show(flat.get(k))}" for k in sorted(flat.keys() | standard.keys())
           if k not in skip and _relevant(k, flat, steps, calibrated) and flat.get(k) != standard.get(k)]
    if not causal:
        out.append("causal=false")
    return tuple(out)


def _column(config: dict) -> Column:
    f, steps = config["format"], list(config["method"]["steps"])
    return Column(f["weight"], f["act"], _method_name(steps), config["abfp"]["n"] if "abfp" in steps else None)


def _row(config: dict, split: str, windows: int | None, column: Column, calibrated: bool, causal: bool) -> Row:
    m, t = config["model"], config["task"]
    if t["name"] in PERPLEXITY_TASKS:
        return Row(m["name"], m["checkpoint"], t["seq_len"], t["protocol"], split, windows, t["name"],
                   variant(config, column, calibrated, causal))
    return Row(m["name"], m["checkpoint"], None, "-", split, windows, t["name"], variant(config, column, calibrated, causal))


def planned_cell(config: dict, calibrated: bool) -> tuple[Row, Column]:
    """The cell a run of the resolved `config` will fill, if it evaluates as configured
    (every window up to task.max_windows, the configured split)."""
    col = _column(config)
    t = config["task"]
    extent = t["max_windows"] if t["name"] in PERPLEXITY_TASKS else t.get("max_samples")
    return _row(config, t["split"], extent, col, calibrated, True), col


def result_cell(result: dict) -> tuple[Row, Column] | None:
    """The cell a (fresh) result fills: its config, the split it evaluated and how much of it."""
    ev = result.get("eval") or {}
    try:
        config = result["config"]
        col = _column(config)
        unit = "windows" if "windows" in ev else "samples"
        full = ev[unit] >= ev[f"{unit}_available"]
        split = ev.get("split") or config["task"]["split"]
        row = _row(config, split, None if full else int(ev[unit]), col, "calib" in (result.get("data") or {}),
                   result.get("causal", True) is not False)
        return row, col
    except (KeyError, TypeError):
        return None


def _finished(result: dict) -> datetime:
    try:
        return datetime.strptime(result.get("finished_at", ""), "%Y-%m-%dT%H:%M:%S%z")
    except ValueError:
        return datetime.min.replace(tzinfo=datetime.now().astimezone().tzinfo)


def index_results(results: list[dict]) -> dict[tuple[Row, Column], list[dict]]:
    """(row, column) -> matching results, newest first."""
    out: dict[tuple[Row, Column], list[dict]] = {}
    for r in results:
        cell = result_cell(r)
        if cell is None or r.get("value") is None:
            continue
        out.setdefault(cell, []).append(r)
    for matches in out.values():
        matches.sort(key=lambda r: (_finished(r), r.get("_path", "")), reverse=True)
    return out


def runnable_models() -> set[str]:
    return {p.stem for p in MODEL_CONF_DIR.glob("*.yaml")}


@dataclass
class Cell:
    row: Row
    column: Column
    paper: PaperCell | None
    matches: list[dict] = field(default_factory=list)
    runnable: bool = True

    @property
    def ours(self) -> float | None:
        return self.matches[0]["value"] if self.matches else None

    @property
    def delta(self) -> float | None:
        return None if self.ours is None or self.paper is None else self.ours - self.paper.value

    @property
    def status(self) -> str:
        if self.matches:
            return "ok"
        return "missing" if self.runnable else "not in qsim"


@dataclass
class Table:
    id: str
    title: str
    rows: list[Row]
    columns: list[Column]
    cells: dict[tuple[Row, Column], Cell]
    metric: str

    @property
    def name(self) -> str:
        return f"table{ARABIC[self.id]}"

    def paper_cells_filled(self) -> tuple[int, int]:
        with_paper = [c for c in self.cells.values() if c.paper is not None]
        return sum(c.ours is not None for c in with_paper), len(with_paper)

    def extra_rows(self) -> list[Row]:
        return [r for r in self.rows if not any(self.cells[(r, c)].paper for c in self.columns)]


def build_table(table_id: str, paper: list[PaperCell], indexed: dict) -> Table:
    mine = [p for p in paper if p.table == table_id]
    rows = list(dict.fromkeys(p.row for p in mine))
    columns = list(dict.fromkeys(p.column for p in mine))
    by_cell = {(p.row, p.column): p for p in mine}
    extra = sorted({row for (row, col) in indexed if col in columns and row not in rows},
                   key=lambda r: (r.model, r.seq_len or 0, r.checkpoint, r.task, r.protocol, r.split, r.windows or 0, r.variant))
    runnable = runnable_models()
    cells = {}
    for row in rows + extra:
        for col in columns:
            cells[(row, col)] = Cell(row, col, by_cell.get((row, col)), indexed.get((row, col), []),
                                     runnable=row.model in runnable)
    metrics = sorted({p.metric for p in mine})
    return Table(table_id, TITLES.get(table_id, ""), rows + extra, columns, cells, "/".join(metrics))


# ------------------------------------------------------------ rendering

FRACTION_TASKS = ("sst2", "stsb", "lm_eval")  # values in [0, 1]: shown to 4 digits


def _num(x: float, task: str = "wikitext2") -> str:
    return f"{x:.4f}" if task in FRACTION_TASKS else f"{x:.2f}"


def cell_text(cell: Cell, footnote: int | None) -> str:
    if cell.ours is not None:
        ours = _num(cell.ours, cell.row.task) + ("" if cell.row.causal else " \u2020") + (f" [{footnote}]" if footnote else "")
    else:
        ours = "missing" if cell.runnable else "n/a"
    if cell.paper is None:
        return f"{ours} / -"
    delta = f" ({cell.delta:+.2f})" if cell.delta is not None else ""
    return f"{ours} / {cell.paper.text}{delta}"


def display_path(path: str, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return path


def render_markdown(table: Table, results_root: Path) -> str:
    out = [f"## Table {table.id}: {table.title}", ""]
    out.append("Each cell: **ours / paper (ours - paper)**. `missing`: no result yet; `-`: the paper has no number; "
               "`n/a`: qsim has no such model. Paper rows: the paper's fine-tuned checkpoint, whole validation split, "
               "run_clm tokenization; other evaluations, and results that differ from a cell's definition in "
               "any setting, get their own row, labelled [split, extent, protocol, differing settings].")
    out.append("")
    header = ["Model (Seq len)"] + [c.label for c in table.columns]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join(["---"] + ["---:"] * len(table.columns)) + "|")
    notes = []
    for row in table.rows:
        texts = []
        for col in table.columns:
            cell = table.cells[(row, col)]
            note = None
            if len(cell.matches) > 1:
                notes.append(cell)
                note = len(notes)
            texts.append(cell_text(cell, note))
        out.append("| " + " | ".join([row.label] + texts) + " |")
    if notes:
        out.append("")
        for i, cell in enumerate(notes, 1):
            newest = cell.matches[0]
            out.append(f"[{i}] {cell.row.label}, {cell.column.label}: {len(cell.matches)} results match; the newest is used "
                       f"({newest.get('finished_at')}, {display_path(newest.get('_path', '?'), results_root)}); "
                       f"others: {', '.join(_num(m['value'], cell.row.task) for m in cell.matches[1:])}.")
    if any(not row.causal and table.cells[(row, col)].ours is not None for row in table.rows for col in table.columns):
        out += ["", CAUSAL_NOTE]
    cpus = cpu_note(table)
    if cpus:
        out += ["", cpus]
    if table.id in TABLE_NOTES:
        out += ["", TABLE_NOTES[table.id]]
    filled, total = table.paper_cells_filled()
    out.append("")
    out.append(f"Metric: {table.metric}. Paper cells with a result of ours: {filled}/{total}.")
    return "\n".join(out) + "\n"


def cpu_note(table: Table) -> str | None:
    """A footnote naming the CPUs when the results shown in the table ran on more than one
    (the CPU is recorded in result.json, not part of the identity)."""
    shown = Counter(cpu_label(c.matches[0].get("environment")) for c in table.cells.values() if c.matches)
    if len(shown) < 2:
        return None
    names = "; ".join(f"{label}: {n} result{'s' * (n != 1)}" for label, n in sorted(shown.items()))
    return (f"CPUs: the results in this table ran on {len(shown)} CPUs ({names}). The CPU is recorded, not part "
            "of a result's identity: across CPUs numbers agree to a measured band, not to the bit (README: "
            "Sweeps, resume and tables).")


CSV_FIELDS = ["table", "row", "column", "model", "checkpoint", "task", "seq_len", "protocol", "split", "windows", "variant",
              "weights", "activations", "method", "n", "metric", "ours", "paper", "delta", "status",
              "results_matched", "result", "finished_at", "cpu"]


def render_csv(table: Table, results_root: Path) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in table.rows:
        for col in table.columns:
            cell = table.cells[(row, col)]
            newest = cell.matches[0] if cell.matches else {}
            writer.writerow({
                "table": table.id, "row": row.label, "column": col.label, "model": row.model,
                "checkpoint": row.checkpoint, "task": row.task, "seq_len": row.seq_len, "protocol": row.protocol,
                "split": row.split, "windows": row.windows if row.windows else "all", "variant": "; ".join(row.variant),
                "weights": col.weight, "activations": col.act,
                "method": col.method, "n": col.n if col.n is not None else "",
                "metric": cell.paper.metric if cell.paper else newest.get("metric", ""),
                "ours": cell.ours if cell.ours is not None else "",
                "paper": cell.paper.text if cell.paper else "",
                "delta": f"{cell.delta:.6g}" if cell.delta is not None else "",
                "status": cell.status, "results_matched": len(cell.matches),
                "result": display_path(newest["_path"], results_root) if newest else "",
                "finished_at": newest.get("finished_at", ""),
                "cpu": cpu_label(newest.get("environment")) if newest else "",
            })
    return buf.getvalue()


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file in the same folder, then rename: a reader never sees half a table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------ command

NO_RESULTS = ("qsim tables: no results yet in {root}: nothing to render. Run an experiment first, e.g.\n"
              "  make table2-offline      (or: qsim run -m +experiment=table2-offline && qsim tables)")


def build_all(results_root: Path, out_dir: Path) -> list[str] | None:
    """Render every table and figure; returns one line per output, or None if there are no results."""
    from .plots import FIGURES, render_figure

    skipped: list = []
    loaded = load_all_results(results_root, skipped)
    malformed = f"qsim tables: {malformed_line(skipped, results_root)}" if skipped else None
    if not loaded:
        return None if malformed is None else [malformed, NO_RESULTS.format(root=results_root)]
    results, stale = [], Counter()
    for r in loaded:
        reason = stale_reason(r)
        if reason is None:
            results.append(r)
        else:
            stale[reason[0]] += 1
    paper = load_paper()
    indexed = index_results(results)
    lines, index = [], [f"# INT-FP-QSim tables, rebuilt by `qsim tables` from {len(results)} results", ""]
    if malformed:
        lines.append(malformed)
        index += [malformed.replace("qsim tables: ", "", 1), ""]
    if stale:
        line = stale_line(stale)
        lines.append(line)
        index += [line.replace("qsim tables: ", "", 1) + " (re-run their sweeps to replace them)", ""]
    for table_id in TABLES:
        table = build_table(table_id, paper, indexed)
        md = render_markdown(table, results_root)
        write_text_atomic(out_dir / f"{table.name}.md", md)
        write_text_atomic(out_dir / f"{table.name}.csv", render_csv(table, results_root))
        index += [md, ""]
        filled, total = table.paper_cells_filled()
        extra = len(table.extra_rows())
        lines.append(f"Table {table.id:<5} {filled:>2}/{total} paper cells ours"
                     + (f", {extra} extra row{'s' * (extra != 1)}" if extra else "") + f" -> {out_dir / table.name}.md")
    for number, figure in FIGURES.items():
        md, line = render_figure(figure, paper, indexed, out_dir, results_root)
        index += [md, ""]
        lines.append(line)
    from .studies import render_studies

    for line in render_studies(results, out_dir):
        lines.append(line)
        study_md = out_dir / (line.split()[0] + ".md")
        if study_md.exists():
            index += [study_md.read_text(), ""]
    write_text_atomic(out_dir / "index.md", "\n".join(index))
    lines.append(f"all tables and figures -> {out_dir / 'index.md'}")
    return lines


def stale_line(stale: Counter) -> str:
    total = sum(stale.values())
    why = ", ".join(f"{n} {kind}" for kind, n in stale.most_common())
    return f"qsim tables: ignored {total} stale result{'s' * (total != 1)} ({why})"


def cmd_tables(args: list[str]) -> None:
    from .sweep import results_root

    parser = argparse.ArgumentParser(prog="qsim tables", description="Rebuild the paper's tables from result.json files.")
    parser.add_argument("--results", type=Path, default=None, help="results root (default: $QSIM_RESULTS_DIR or results/)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <results>/tables)")
    opts = parser.parse_args(args)
    root = opts.results or results_root()
    out = opts.out or root / "tables"
    lines = build_all(root, out)
    if lines is None:
        print(NO_RESULTS.format(root=root))
        return
    print("\n".join(lines))


if __name__ == "__main__":
    cmd_tables(sys.argv[1:])
