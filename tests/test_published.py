"""The README's measured numbers are rendered from files kept in the repository
(results/published/, results/bench/), each made by its manifest entry, and reproduce."""
import json
import math
import subprocess

import pytest

from qsim.config import compose_config
from qsim.published import (
    BENCH_DIR, MANIFEST, PUBLISHED_DIR, README, Entry, block_names, load_manifest, load_published, newest_bench,
    measure, numerics_version, render, render_blocks,
)
from qsim.published import STALE_MARK
from qsim.results import REPO_ROOT, config_hash, stale_reason
from qsim.results import NO_ENVIRONMENT, OLDER_NUMERICS, OTHER_ENVIRONMENT


MUST_BE_FRESH = ("smollm2-w4a16-abfp64-8w", "smollm2-fp32", "smollm2-fp32-8w", "smollm2-w4a16-asym-block32-8w",
                 "smollm2-w4a8-abfp", "f2026-nvfp4", "f2026-mxfp4", "smollm2-w4a4-rotate-gptq-online",
                 "t10-smollm2-squad-w4a8-abfp")


def is_ancestor_of_head(commit: str) -> bool:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0


def test_readme_equals_its_rendering():
    text = README.read_text()
    assert sorted(block_names(text)) == sorted(render_blocks()), "each block once in the README"
    assert text == render(text, render_blocks()), "README.md differs from the published files: run `make readme`"


def test_render_replaces_only_block_contents():
    text = "a <!-- published:x -->old<!-- /published --> b\n<!-- published:y -->\nold\n<!-- /published -->\nc"
    out = render(text, {"x": "1.5", "y": "\n| t |\n"})
    assert out == "a <!-- published:x -->1.5<!-- /published --> b\n<!-- published:y -->\n| t |\n<!-- /published -->\nc"
    with pytest.raises(KeyError, match="'z' has no renderer"):
        render("<!-- published:z --><!-- /published -->", {"x": ""})


def test_each_published_file_comes_from_its_manifest_entry():
    manifest = load_manifest()
    kept = {p.name for p in PUBLISHED_DIR.iterdir()}
    linked = _linked_ids()
    assert kept == {MANIFEST.name} | {f"{i}.json" for i in manifest}, "a file without an entry, or an entry without a file"
    for entry in manifest.values():
        result = load_published(entry)
        assert result["published"]["id"] == entry.id and result["published"]["run"] == list(entry.run)
        # the config it recorded is the one these overrides make now (defaults included: a changed default shows)
        assert config_hash(result["config"]) == config_hash(_resolved(entry.run)), entry.id
        reason = stale_reason(result)
        if reason is not None:  # shown marked in the README (test_readme_equals_its_rendering) and
            # only for what a later session re-makes: an older numerics version or environment, never
            # a config, data or recipe that differs from what the entry says
            assert reason[0] in (OLDER_NUMERICS, NO_ENVIRONMENT, OTHER_ENVIRONMENT), f"{entry.id}: stale {reason}"
            if entry.id in linked:
                assert f"]({entry.path.relative_to(REPO_ROOT)}){STALE_MARK}" in README.read_text(), entry.id
            continue
        assert numerics_version(result) == numerics_version(), f"{entry.id}: re-run `make published`"
        commit = result["published"]["commit"]
        assert result["versions"]["git"].removesuffix("-dirty") == commit
        assert is_ancestor_of_head(commit), f"{entry.id}: made at {commit}, not in this history"


def _linked_ids() -> set[str]:
    """Entries whose value the README links to (some entries feed a block without a link)."""
    text = README.read_text()
    return {e.id for e in load_manifest().values() if f"]({e.path.relative_to(REPO_ROOT)})" in text}


def test_the_entries_the_tests_and_the_contract_rely_on_are_fresh():
    """The 8-window entry test_a_published_number_reproduces re-runs, the README's first table and the
    entries the reproducibility contract was measured on are made by this numerics version here."""
    manifest = load_manifest()
    for id_ in MUST_BE_FRESH:
        assert stale_reason(load_published(manifest[id_])) is None, f"{id_}: re-run `make published ARGS={id_}`"


def _resolved(overrides):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(list(overrides) + ["progress=false"]), resolve=True)


def test_the_bench_numbers_come_from_the_newest_committed_bench_json():
    path = newest_bench()
    assert path.parent == BENCH_DIR
    tracked = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "--error-unmatch", str(path)], capture_output=True)
    assert tracked.returncode == 0, f"{path.name} is not committed"
    commit = json.loads(path.read_text())["versions"]["git"].removesuffix("-dirty")
    assert is_ancestor_of_head(commit)
    assert f"`results/bench/{path.name}`" in README.read_text()


@pytest.mark.slow
def test_measure_runs_the_real_cli_and_checks_the_commit():
    entry = Entry("tiny", "tiny OPT", ("model=tiny-opt", "task.seq_len=64", "task.max_windows=2"))
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = measure(entry, head)
    assert result["published"] == {"id": "tiny", "run": list(entry.run), "command": entry.command, "commit": head}
    assert result["config"]["model"]["name"] == "tiny-opt" and result["config"]["progress"] is False
    assert result["eval"]["windows"] == 2 and math.isfinite(result["value"])
    with pytest.raises(SystemExit, match="the repository changed during the run"):
        measure(entry, "0" * 40)


@pytest.mark.slow
def test_a_published_number_reproduces(tmp_path):
    """The INT4 ABFP-64 weight entry (8 windows, ~15 s), re-run in this process: the same perplexity."""
    from qsim.run import run

    entry = load_manifest()["smollm2-w4a16-abfp64-8w"]
    published = load_published(entry)
    again = run(compose_config(list(entry.run) + ["progress=false"]), tmp_path)
    assert again["config_hash"] == published["config_hash"]
    assert again["identity"] == published["identity"], "made in another environment: re-run `make published`"
    assert again["value"] == pytest.approx(published["value"], rel=1e-5)
