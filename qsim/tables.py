"""`qsim tables`: the paper's tables and figures rebuilt from result.json files.

Reads results only, never runs a model (and never imports torch). Each paper
table keeps the paper's rows and columns, taken from the paper's own numbers
(results/paper/int_fp_qsim_tables.csv). A cell is matched by content, not by
the experiment that made it:

- row = model, checkpoint, seq_len, tokenization protocol, split and how much
  of it was evaluated. A paper row is the paper's fine-tuned checkpoint on the
  whole validation split with run_clm tokenization at the paper's seq_len
  (what conf/experiment/row/opt-*.yaml run). Any other evaluation (SmolLM2, a
  few windows, another protocol) gets its own row below the paper's, labelled
  with what differs, so a partial run is never compared to the paper's number.
- column = weight format, activation format, method, ABFP n.

A cell shows ours / paper (ours - paper). "missing" is a cell with no result
yet; "-" is a cell the paper has no number for. When several results match a
cell (re-runs), the newest (finished_at) is used and a footnote says which.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .results import load_results

# results/paper/ and conf/, beside the code (symlinks in a checkout, package data in a wheel)
PAPER_CSV = Path(__file__).resolve().parent / "paper" / "int_fp_qsim_tables.csv"
MODEL_CONF_DIR = Path(__file__).resolve().parent / "conf" / "model"

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
# How the paper evaluated its rows (conf/experiment/row/opt-*.yaml run exactly this).
PAPER_EVAL = {"checkpoint": "paper", "protocol": "paper", "split": "validation", "windows": None}


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
    windows: int | None  # None: the whole split

    @property
    def is_paper_eval(self) -> bool:
        return all(getattr(self, k) == v for k, v in PAPER_EVAL.items())

    @property
    def label(self) -> str:
        name = PRETTY_MODELS.get(self.model, self.model) if self.is_paper_eval else self.model
        text = f"{name} ({self.seq_len})" if self.seq_len else name
        if self.is_paper_eval:
            return text
        extent = "all windows" if not self.windows else f"{self.windows} window{'s' * (self.windows != 1)}"
        notes = [self.split, extent, f"{self.protocol} protocol"]
        if self.checkpoint != "paper" and self.model.startswith("opt-"):
            notes.append(f"{self.checkpoint} checkpoint")
        return f"{text} [{', '.join(notes)}]"


def paper_row(model: str, seq_len: int | None) -> Row:
    return Row(model, PAPER_EVAL["checkpoint"], seq_len, PAPER_EVAL["protocol"], PAPER_EVAL["split"], None)


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
                row=paper_row(rec["model"], int(rec["seq_len"]) if rec["seq_len"] else None),
                column=Column(rec["weights"], rec["activations"], rec["method"], int(rec["n"]) if rec["n"] else None),
                metric=rec["metric"], value=float(rec["value"]), text=rec["value"]))
    return cells


def result_row(result: dict) -> Row | None:
    ev = result.get("eval") or {}
    try:
        full = ev["windows"] >= ev["windows_available"]
        split = ev.get("split") or result["config"]["task"]["split"]
        return Row(result["model"], result.get("checkpoint", "base"), result["seq_len"], result.get("protocol", "gptq"),
                   split, None if full else int(ev["windows"]))
    except (KeyError, TypeError):
        return None


def result_column(result: dict) -> Column | None:
    try:
        f = result["formats"]
        return Column(f["weight"], f["act"], result["method"], result.get("n"))
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
        row, col = result_row(r), result_column(r)
        if row is None or col is None or r.get("value") is None:
            continue
        out.setdefault((row, col), []).append(r)
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
                   key=lambda r: (r.model, r.seq_len or 0, r.checkpoint, r.protocol, r.split, r.windows or 0))
    runnable = runnable_models()
    cells = {}
    for row in rows + extra:
        for col in columns:
            cells[(row, col)] = Cell(row, col, by_cell.get((row, col)), indexed.get((row, col), []),
                                     runnable=row.model in runnable)
    metrics = sorted({p.metric for p in mine})
    return Table(table_id, TITLES.get(table_id, ""), rows + extra, columns, cells, "/".join(metrics))


# ------------------------------------------------------------ rendering

def _num(x: float) -> str:
    return f"{x:.2f}"


def cell_text(cell: Cell, footnote: int | None) -> str:
    if cell.ours is not None:
        ours = _num(cell.ours) + (f" [{footnote}]" if footnote else "")
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
               "run_clm tokenization; other evaluations get their own row, labelled [split, extent, protocol].")
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
                       f"others: {', '.join(_num(m['value']) for m in cell.matches[1:])}.")
    filled, total = table.paper_cells_filled()
    out.append("")
    out.append(f"Metric: {table.metric}. Paper cells with a result of ours: {filled}/{total}.")
    return "\n".join(out) + "\n"


CSV_FIELDS = ["table", "row", "column", "model", "checkpoint", "seq_len", "protocol", "split", "windows",
              "weights", "activations", "method", "n", "metric", "ours", "paper", "delta", "status",
              "results_matched", "result", "finished_at"]


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
                "checkpoint": row.checkpoint, "seq_len": row.seq_len, "protocol": row.protocol, "split": row.split,
                "windows": row.windows if row.windows else "all", "weights": col.weight, "activations": col.act,
                "method": col.method, "n": col.n if col.n is not None else "",
                "metric": cell.paper.metric if cell.paper else newest.get("metric", ""),
                "ours": cell.ours if cell.ours is not None else "",
                "paper": cell.paper.text if cell.paper else "",
                "delta": f"{cell.delta:.6g}" if cell.delta is not None else "",
                "status": cell.status, "results_matched": len(cell.matches),
                "result": display_path(newest["_path"], results_root) if newest else "",
                "finished_at": newest.get("finished_at", ""),
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

    results = load_results(results_root)
    if not results:
        return None
    paper = load_paper()
    indexed = index_results(results)
    lines, index = [], [f"# INT-FP-QSim tables, rebuilt by `qsim tables` from {len(results)} results", ""]
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
    write_text_atomic(out_dir / "index.md", "\n".join(index))
    lines.append(f"all tables and figures -> {out_dir / 'index.md'}")
    return lines


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
