"""Studies: experiments whose points are not paper cells.

A study is `conf/experiment/<study>.yaml`, a sweep over `experiment/<group>`: one file in
`conf/experiment/<group>/` per point. A result belongs to a point when its identity
(results.identity_fields: the whole resolved config, the data, the numerics version) is the
point's (its semantic config, config_hash, and freshness: results.stale_reason re-checks the
numerics version and the data), so a stale or differently-configured result never fills one. `qsim tables` renders
each study as Markdown, CSV and a figure (perplexity vs bits per element); the README renders
formats2026 from results/published/ the same way.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import yaml


CONF = Path(__file__).resolve().parent / "conf"
STUDIES = {"formats2026": "f2026"}  # study -> its group of points
SCALE_BITS = {"bf16": 16, "fp32": 32, "e8m0": 8, "e4m3": 8}


def spec_bits(spec) -> float:
    """Bits per element of a QuantSpec: the element's, plus a block scale's bits shared by the block (MX 4.25,
    NVFP4 4.5, ABFP with bf16 scales 4 + 16/n). A scale per channel, token or tensor is not counted."""
    from .formats import element_bits, get_format
    from .quantizer import SCALED_FORMATS

    if spec.is_identity:
        return 32.0
    if spec.format in SCALED_FORMATS:
        return SCALED_FORMATS[spec.format].bits_per_element
    return element_bits(get_format(spec.format)) + (SCALE_BITS[spec.scale_dtype] / spec.block if spec.granularity == "block" else 0.0)


@dataclass(frozen=True)
class Point:
    name: str
    group: str
    config_hash: str  # results.config_hash of its resolved config
    weight: str
    act: str
    method: str
    accum: str

    @property
    def command(self) -> str:
        return f"qsim run +experiment/{self.group}={self.name}"


def _describe_accum(cfg) -> str:
    q = cfg.quant
    return q.accum if q.accum_chunk is None else f"{q.accum}, chunks of {q.accum_chunk}"


def _compose(point: Point):
    from .config import compose_config

    return compose_config([f"+experiment/{point.group}={point.name}"])


@functools.lru_cache(maxsize=None)
def study_points(study: str) -> tuple[Point, ...]:
    """The study's points in its sweep's order, each composed as `qsim run` would (no torch)."""
    from omegaconf import OmegaConf

    from .config import compose_config
    from .results import config_hash

    group = STUDIES[study]
    doc = yaml.safe_load((CONF / "experiment" / f"{study}.yaml").read_text())
    points = []
    for name in str(doc["hydra"]["sweeper"]["params"][f"experiment/{group}"]).split(","):
        cfg = compose_config([f"+experiment/{group}={name.strip()}"])
        points.append(Point(name.strip(), group, config_hash(OmegaConf.to_container(cfg, resolve=True)),
                            cfg.format.weight, cfg.format.act, cfg.method.name, _describe_accum(cfg)))
    return tuple(points)


@functools.lru_cache(maxsize=None)
def point_bits(study: str) -> dict[str, tuple[float, float]]:
    """point -> bits per element of its (weights, activations), from the plan `qsim run` builds."""
    from .run import build_plan

    out = {}
    for p in study_points(study):
        plan = build_plan(_compose(p))
        out[p.name] = (spec_bits(plan.default.weight), spec_bits(plan.default.act))
    return out


def match(points: tuple[Point, ...], results: list[dict], fresh_only: bool = True) -> dict[str, dict]:
    """point name -> its newest fresh result with the point's config (fresh_only=False: the README's
    published files, where a stale one is shown marked as such)."""
    from .results import stale_reason

    by_hash: dict[str, dict] = {}
    for r in sorted(results, key=lambda r: r.get("finished_at", "")):
        if r.get("config_hash") and (not fresh_only or stale_reason(r) is None):
            by_hash[r["config_hash"]] = r
    return {p.name: by_hash[p.config_hash] for p in points if p.config_hash in by_hash}


def _bits(x: float) -> str:
    return f"{x:g}"


def markdown(study: str, found: dict[str, dict], link=None) -> str:
    """The study's table: one row per point, ours only; `link(point, result)` -> text for the value."""
    lines = ["| point | weights | activations | method | accumulator | bits/element W / A | windows | ppl |",
             "|---|---|---|---|---|---:|---:|---:|"]
    bits = point_bits(study)
    for p in study_points(study):
        r = found.get(p.name)
        value = "missing" if r is None else (link(p, r) if link else f"{r['value']:.2f}")
        windows = "" if r is None else str(r["eval"]["windows"])
        lines.append(f"| `{p.name}` | {p.weight} | {p.act} | {p.method} | {p.accum} "
                     f"| {_bits(bits[p.name][0])} / {_bits(bits[p.name][1])} | {windows} | {value} |")
    return "\n".join(lines)


def plot(study: str, found: dict[str, dict], path: Path) -> bool:
    """Perplexity vs bits per element for the points whose weights and activations share a format
    (FP32 as a line); False when no such point has a result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in study_points(study) if p.name in found]
    bits = {name: b[0] for name, b in point_bits(study).items()}
    same = [p for p in points if p.weight == p.act and p.weight != "fp32" and p.accum == "fp32"]
    if not same:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, marker in (("mx", "o"), ("nvfp4", "s"), ("abfp", "^")):
        members = [p for p in same if (p.method == "abfp") == (family == "abfp") and
                   (family == "abfp" or p.weight.startswith(family))]
        if members:
            ax.scatter([bits[p.name] for p in members], [found[p.name]["value"] for p in members], marker=marker,
                       label={"mx": "OCP MX", "nvfp4": "NVFP4", "abfp": "ABFP (bf16 scales)"}[family])
            for p in members:
                ax.annotate(p.name, (bits[p.name], found[p.name]["value"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    fp32 = next((found[p.name]["value"] for p in points if p.weight == "fp32" and p.act == "fp32"), None)
    if fp32 is not None:
        ax.axhline(fp32, color="gray", linestyle="--", label=f"FP32 ({fp32:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (weights = activations; block scales counted)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title(f"{study}: SmolLM2-135M, linear layers quantized")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def render_studies(results: list[dict], out_dir: Path) -> list[str]:
    """Write <study>.md, .csv and .png into out_dir; one line per study."""
    import csv
    import io

    lines = []
    for study in STUDIES:
        found = match(study_points(study), results)
        if not found:  # nothing to show (and no torch needed for the bits)
            lines.append(f"{study:<11}  0/{len(study_points(study))} points (make {study}-offline runs them)")
            continue
        png = out_dir / f"{study}.png"
        has_plot = plot(study, found, png)
        md = f"## {study}\n\n" + markdown(study, found) + ("\n\n![](" + png.name + ")\n" if has_plot else "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{study}.md").write_text(md)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["point", "weight", "act", "method", "accumulator", "bits_weight", "bits_act", "windows", "ppl",
                         "command"])
        for p in study_points(study):
            r = found.get(p.name)
            writer.writerow([p.name, p.weight, p.act, p.method, p.accum, *point_bits(study)[p.name],
                             r["eval"]["windows"] if r else "", json.dumps(r["value"]) if r else "", p.command])
        (out_dir / f"{study}.csv").write_text(buf.getvalue())
        lines.append(f"{study:<11} {len(found):>2}/{len(study_points(study))} points -> {out_dir / study}.md"
                     + (", .png" if has_plot else ""))
    return lines
