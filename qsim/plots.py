"""Figures 3-5: perplexity vs ABFP vector length n, one panel per model row.

The paper publishes these only as plots, so there is no number to compare at
each n; where the paper's tables give the same setting at n=64 (Table II for
E1M2, III for W4A4, VII for W4A8), that point is drawn hollow as the paper's.
"""
from __future__ import annotations

import csv
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

from .tables import Column, display_path, write_text_atomic


@dataclass(frozen=True)
class Series:
    label: str
    weight: str
    act: str
    method: str
    paper_table: str  # the table holding the paper's n=64 value

    def matches(self, col: Column) -> bool:
        return (col.weight, col.act, col.method) == (self.weight, self.act, self.method)


@dataclass(frozen=True)
class Figure:
    number: int
    title: str
    series: tuple[Series, ...]

    @property
    def name(self) -> str:
        return f"figure{self.number}"


FIGURES = {
    3: Figure(3, "E1M2 weights and activations with ABFP, n = 64 and 128",
              (Series("E1M2 ABFP", "e1m2", "e1m2", "abfp", "II"),)),
    4: Figure(4, "W4A4 with ABFP and ABFP-QAT, n = 64 and 128",
              (Series("W4A4 ABFP", "int4", "int4", "abfp", "III"), Series("W4A4 ABFP-QAT", "int4", "int4", "abfp-qat", "III"))),
    5: Figure(5, "W4A8 with ABFP and ABFP-QAT, n = 64 and 128",
              (Series("W4A8 ABFP", "int4", "int8", "abfp", "VII"), Series("W4A8 ABFP-QAT", "int4", "int8", "abfp-qat", "VII"))),
}


def figure_points(figure: Figure, indexed: dict) -> dict:
    """row -> series label -> {n: newest matching result}."""
    out: dict = {}
    for (row, col), matches in indexed.items():
        for s in figure.series:
            if s.matches(col) and col.n is not None:
                out.setdefault(row, {}).setdefault(s.label, {})[col.n] = matches[0]
    return out


def paper_reference(series: Series, row, paper) -> float | None:
    for p in paper:
        if p.table == series.paper_table and p.row == row and series.matches(p.column) and p.column.n == 64:
            return p.value
    return None


def render_figure(figure: Figure, paper, indexed: dict, out_dir: Path, results_root: Path) -> tuple[str, str]:
    """Write <out>/figureN.png and .csv; return its Markdown section and a one-line report."""
    points = figure_points(figure, indexed)
    md = [f"## Figure {figure.number}: {figure.title}", ""]
    if not points:
        md.append("No results yet.")
        return "\n".join(md) + "\n", f"Figure {figure.number:<3} no results yet"
    rows = sorted(points, key=lambda r: (not r.is_paper_eval, r.model, r.seq_len or 0, r.windows or 0))
    ns = sorted({n for by_series in points.values() for per_n in by_series.values() for n in per_n})
    buf = io.StringIO()
    table = csv.writer(buf, lineterminator="\n")
    table.writerow(["figure", "row", "series", "n", "ours", "paper", "result"])
    md += [f"![Figure {figure.number}]({figure.name}.png)", "",
           "| Model (Seq len) | Series | " + " | ".join(f"n={n}" for n in ns) + " | paper n=64 |",
           "|---|---|" + "---:|" * (len(ns) + 1)]
    for row in rows:
        for s in figure.series:
            per_n = points[row].get(s.label, {})
            ref = paper_reference(s, row, paper)
            cells = [f"{per_n[n]['value']:.2f}" if n in per_n else "missing" for n in ns]
            md.append(f"| {row.label} | {s.label} | " + " | ".join(cells) + f" | {ref if ref is not None else '-'} |")
            for n in ns:
                r = per_n.get(n)
                table.writerow([figure.number, row.label, s.label, n, f"{r['value']:.6g}" if r else "",
                                ref if ref is not None and n == 64 else "", display_path(r["_path"], results_root) if r else ""])
    _plot(figure, rows, points, paper, out_dir / f"{figure.name}.png")
    write_text_atomic(out_dir / f"{figure.name}.csv", buf.getvalue())
    return "\n".join(md) + "\n", f"Figure {figure.number:<3} {len(rows)} model row{'s' * (len(rows) != 1)} -> {out_dir / figure.name}.png"


def _plot(figure: Figure, rows, points, paper, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(max(6.0, 4.2 * len(rows)), 4.0), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, row in zip(axes[0], rows):
        for i, s in enumerate(figure.series):
            per_n = points[row].get(s.label, {})
            color = colors[i % len(colors)]
            if per_n:
                ns = sorted(per_n)
                ax.plot(ns, [per_n[n]["value"] for n in ns], "o-", color=color, label=f"{s.label} (ours)")
            ref = paper_reference(s, row, paper)
            if ref is not None:
                ax.plot([64], [ref], "o", mfc="none", color=color, markersize=9, label=f"{s.label} (paper, Table {s.paper_table})")
        xs = sorted({n for per_n in points[row].values() for n in per_n} | {64, 128})
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(n) for n in xs])
        ax.set_xlabel("ABFP vector length n")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(textwrap.fill(row.label, 40), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(f"Figure {figure.number}: {figure.title}", 70), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
