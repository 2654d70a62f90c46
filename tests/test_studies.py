"""Studies (qsim/studies.py): formats2026's points, their bits, and its rendering from real results."""
import csv

import pandas as pd
import pytest

from qsim.config import compose_config
from qsim.published import load_manifest, load_published, stale_entries
from omegaconf import OmegaConf

from qsim.results import config_hash
from qsim.studies import markdown, match, point_bits, render_studies, study_points

BITS = {"fp32": 32, "mxfp8_e4m3": 8.25, "mxint8": 8.25, "mxfp6_e3m2": 6.25, "mxfp4": 4.25, "nvfp4": 4.5,
        "abfp-int4-n16": 5.0, "abfp-int4-n32": 4.5, "abfp-e2m1-n64": 4.25}


def test_formats2026_points_are_its_sweep_with_bits_per_element():
    points, bits = {p.name: p for p in study_points("formats2026")}, point_bits("formats2026")
    assert len(points) == 19
    for name, b in BITS.items():
        assert bits[name] == (b, b)
    acc = points["w4a8-abfp-acc-bf16-c128"]
    assert (acc.weight, acc.act, acc.accum, bits[acc.name]) == ("int4", "int8", "bf16, chunks of 128", (4.25, 8.25))
    assert points["nvfp4-static"].method == "mse" and points["nvfp4"].method == "none"
    # a point is its resolved config, however it is typed
    same = OmegaConf.to_container(compose_config(["format=mxfp4", "method=none"]), resolve=True)
    assert points["mxfp4"].config_hash == config_hash(same)
    assert len({p.config_hash for p in points.values()}) == 19


@pytest.fixture(scope="module")
def published_points():
    """The published formats2026 results, each as if made here and now: these tests check matching
    and rendering, and until `make published` re-makes every entry some files are stale (their own
    freshness is test_published's business; the README marks them)."""
    from qsim import NUMERICS_VERSION
    from qsim.environment import identity_now
    from qsim.results import identity

    results = []
    for e in load_manifest().values():
        if e.id.startswith("f2026-"):
            r = load_published(e)
            env = {**r.get("environment", {}), "identity": identity_now(r["config"])}
            results.append({**r, "numerics_version": NUMERICS_VERSION, "environment": env,
                            "identity": identity(r["config"], r["data"], NUMERICS_VERSION, env["identity"])})
    return results


def test_published_formats2026_results_fill_every_point(published_points):
    found = match(study_points("formats2026"), published_points)
    assert sorted(found) == sorted(p.name for p in study_points("formats2026"))
    assert "missing" not in markdown("formats2026", found)
    # a result under another identity fills nothing
    other = [{**r, "config_hash": "0" * 16} for r in published_points]
    assert match(study_points("formats2026"), other) == {}


def test_tables_render_the_study_as_markdown_csv_and_figure(published_points, tmp_path):
    [line] = render_studies(published_points, tmp_path)
    assert line.startswith("formats2026 19/19 points") and line.endswith(".png")
    rows = list(csv.DictReader(open(tmp_path / "formats2026.csv")))
    assert [r["point"] for r in rows] == [p.name for p in study_points("formats2026")]
    fp32 = next(r for r in rows if r["point"] == "fp32")
    assert float(fp32["ppl"]) == pytest.approx(next(r["value"] for r in published_points
                                                    if r["published"]["id"] == "f2026-fp32"), rel=1e-4)
    assert (tmp_path / "formats2026.png").stat().st_size > 20_000
    assert "| `mxfp4` | mxfp4 | mxfp4 | none | fp32 | 4.25 / 4.25 | 40 |" in (tmp_path / "formats2026.md").read_text()


def test_results_load_gives_one_row_per_published_run_with_flat_knobs():
    from qsim.results import REPO_ROOT, load

    frame = load(REPO_ROOT / "results" / "published")
    manifest = load_manifest()
    done = [e for e in manifest.values() if e.path.exists()]
    assert len(frame) == len(done)
    fp32 = frame[frame["path"].str.endswith("/smollm2-fp32.json")].iloc[0]
    assert fp32["value"] == load_published(manifest["smollm2-fp32"])["value"] and pd.isna(fp32["stale"])
    assert frame["stale"].notna().sum() == len(stale_entries(manifest))  # the column says which are stale
    assert fp32["config.task.seq_len"] == 512 and fp32["config.format.weight"] == "fp32"
    mx = frame[frame["config.format.weight"] == "mxfp4"]
    assert list(mx["weight"]) == ["mxfp4"] and list(mx["windows"]) == [40]
