"""The README's measured numbers, kept as data and rendered, never typed.

Perplexities and run costs come from `results/published/<id>.json`: the whole
result.json of `qsim run <overrides>` for each entry of
`results/published/manifest.yaml`, plus the commit that made it. Performance
numbers come from the newest `results/bench/*.json` (`make bench`).

    python -m qsim.published run [ids ...]   # make published: (re)measure entries
    python -m qsim.published render          # make readme: rewrite the README's blocks
    python -m qsim.published check           # the stale entries and why (exit 1 if any)

A block is the text between `<!-- published:NAME -->` and `<!-- /published -->`
in README.md; tests/test_published.py fails when the README differs from its
rendering, a file differs from its manifest entry or is stale: results.stale_reason,
the identity `qsim tables` and sweeps use (config, data, numerics version and
environment: a file made with other package versions, weights or BLAS mode is stale).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .results import REPO_ROOT, RESULT_FILE, write_json_atomic

PUBLISHED_DIR = REPO_ROOT / "results" / "published"
MANIFEST = PUBLISHED_DIR / "manifest.yaml"
BENCH_DIR = REPO_ROOT / "results" / "bench"
README = REPO_ROOT / "README.md"
# What the recorded commit must name exactly: a published number is made by committed code.
CODE_PATHS = ("qsim", "conf", "pyproject.toml")
BLOCK = re.compile(r"(<!-- published:([\w-]+) -->)(.*?)(<!-- /published -->)", re.DOTALL)


@dataclass(frozen=True)
class Entry:
    id: str
    label: str
    run: tuple[str, ...]  # `qsim run` overrides

    @property
    def command(self) -> str:
        return " ".join(("qsim run", *self.run))

    @property
    def path(self) -> Path:
        return PUBLISHED_DIR / f"{self.id}.json"


def load_manifest(path: Path = MANIFEST) -> dict[str, Entry]:
    raw = yaml.safe_load(Path(path).read_text())
    return {id_: Entry(id_, spec["label"], tuple(spec["run"])) for id_, spec in raw.items()}


def load_published(entry: Entry) -> dict:
    """The entry's result; a malformed file (results.result_problem) is an error naming it."""
    from .results import read_result

    result, why = read_result(entry.path)
    if result is None:
        raise ValueError(f"published entry {entry.id} ({entry.path.name}): malformed result file ({why})")
    return result


def numerics_version(result: dict | None = None) -> int:
    """The numerics version a result was made with (None: this code's, qsim.NUMERICS_VERSION)."""
    if result is None:
        from . import NUMERICS_VERSION

        return NUMERICS_VERSION
    return result["numerics_version"]


def stale_entries(manifest: dict[str, Entry] | None = None) -> list[tuple[Entry, tuple[str, str]]]:
    """Each entry whose file is missing or stale here (results.stale_reason, as sweeps and
    `qsim tables` judge a result), with (kind, detail)."""
    from .results import MALFORMED, read_result, stale_reason

    out = []
    for entry in (load_manifest() if manifest is None else manifest).values():
        result, why = read_result(entry.path) if entry.path.exists() else (None, None)
        reason = (stale_reason(result) if result is not None else (MALFORMED, why) if why
                  else ("missing", str(entry.path)))
        if reason is not None:
            out.append((entry, reason))
    return out


def cmd_check() -> None:
    stale = stale_entries()
    for entry, (kind, detail) in stale:
        print(f"{entry.id}: {kind} ({detail})")
    print(f"{len(stale)} of {len(load_manifest())} published entries stale"
          + ("; `make published` re-runs them" if stale else ""), file=sys.stderr)
    if stale:
        raise SystemExit(1)


# ---------------------------------------------------------------- run

def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def code_commit() -> str:
    """HEAD, if the code under CODE_PATHS has no uncommitted change (else the commit would not name what ran)."""
    changed = _git("status", "--porcelain", "--", *CODE_PATHS)
    if changed:
        raise SystemExit("qsim.published: error: commit the code first; uncommitted: "
                         + ", ".join(line[3:] for line in changed.splitlines()))
    return _git("rev-parse", "HEAD")


def measure(entry: Entry, commit: str) -> dict:
    """Run the entry through the real CLI, offline, in a fresh process: its result.json plus the
    commit, which must be the one the run recorded (no commit while it ran)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QSIM_RESULTS_DIR": tmp, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        env.setdefault("QSIM_DATA_DIR", str(REPO_ROOT.parent / "shared" / "data"))
        subprocess.run([sys.executable, "-m", "qsim.cli", "run", *entry.run, "progress=false"],
                       cwd=REPO_ROOT, env=env, check=True)
        (path,) = Path(tmp).rglob(RESULT_FILE)
        result = json.loads(path.read_text())
    if result["versions"]["git"].removesuffix("-dirty") != commit:
        raise SystemExit(f"qsim.published: error: {entry.id} ran at {result['versions']['git']}, not {commit}: "
                         "the repository changed during the run; run it again")
    result["published"] = {"id": entry.id, "run": list(entry.run), "command": entry.command, "commit": commit}
    return result


def cmd_run(ids: list[str]) -> None:
    manifest = load_manifest()
    unknown = [i for i in ids if i not in manifest]
    if unknown:
        raise SystemExit(f"qsim.published: error: unknown id {', '.join(unknown)}; valid: {', '.join(manifest)}")
    todo = [manifest[i] for i in ids] if ids else list(manifest.values())
    t0 = time.time()
    for k, entry in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {entry.id}: {entry.command}", file=sys.stderr, flush=True)
        commit = code_commit()
        result = measure(entry, commit)
        if code_commit() != commit:  # also fails on code edited during the run
            raise SystemExit(f"qsim.published: error: the code changed while {entry.id} ran; run it again")
        write_json_atomic(entry.path, result)
        print(f"[{k}/{len(todo)}] {entry.id}: {result['metric']} {result['value']:.4f} -> {entry.path.relative_to(REPO_ROOT)}",
              file=sys.stderr, flush=True)
    print(f"published {len(todo)} entries in {(time.time() - t0) / 60:.1f} min; `make readme` renders them", file=sys.stderr)


# ---------------------------------------------------------------- render

STALE_MARK = "†"
_stale: dict[str, tuple[str, str]] = {}  # entry id -> (kind, detail), set by render_blocks


def _link(entry: Entry, text: str) -> str:
    """The value linked to its file; marked when the file is stale here (see stale_block)."""
    mark = STALE_MARK if entry.id in _stale else ""
    return f"[{text}]({entry.path.relative_to(REPO_ROOT)}){mark}"


def _stale_note(entries) -> str:
    """A table's footnote when some of its values are stale."""
    n = sum(e.id in _stale for e in entries)
    return (f" {STALE_MARK} {n} of these {len(entries)} values are stale (made by an older numerics version or in "
            "another environment; see Published numbers)." if n else "")


def stale_block(manifest: dict[str, Entry]) -> str:
    """What the mark means, and which entries carry it."""
    if not _stale:
        return f"All {len(manifest)} entries are fresh: made by this numerics version in this environment."
    kinds: dict[str, list[str]] = {}
    for id_, (kind, _) in _stale.items():
        kinds.setdefault(kind, []).append(id_)
    why = "; ".join(f"{len(ids)} {kind}" for kind, ids in sorted(kinds.items()))
    return (f"{STALE_MARK} marks {len(_stale)} of {len(manifest)} entries whose file is stale here ({why}): the "
            "number is what the code of its commit gave, in the environment its file records; it is not what "
            "this code gives, and no sweep or table uses it. `make published ARGS='<ids>'` re-makes them; "
            "`python -m qsim.published check` lists them with the reason.")


def _commits(results: list[dict]) -> str:
    return ", ".join(sorted({r["published"]["commit"][:7] for r in results}))


def ppl_table(manifest: dict[str, Entry], ids: list[str], title: str) -> str:
    """A perplexity table, one row per entry, each value linked to its file, with its command."""
    entries = [manifest[i] for i in ids]
    results = [load_published(e) for e in entries]
    lines = [f"| {title} | windows | ppl | command |", "|---|---:|---:|---|"]
    for e, r in zip(entries, results):
        value = _link(e, f"{r['value']:.2f}")
        lines.append(f"| {e.label} | {r['eval']['windows']} | {value} | `{e.command}` |")
    lines += ["", f"Measured at commit {_commits(results)} (numerics version {', '.join(sorted({str(numerics_version(r)) for r in results}))})."
              + _stale_note(entries)]
    return "\n" + "\n".join(lines) + "\n"


def metric_table(manifest: dict[str, Entry], ids: list[str], title: str) -> str:
    """A table of a per-sample task (samples scored, the task's metric), each value linked to its file."""
    entries = [manifest[i] for i in ids]
    results = [load_published(e) for e in entries]
    metric = results[0]["metric"]
    lines = [f"| {title} | samples | {metric} | command |", "|---|---:|---:|---|"]
    for e, r in zip(entries, results):
        lines.append(f"| {e.label} | {r['eval']['samples']} | {_link(e, format(r['value'], '.4f'))} | `{e.command}` |")
    lines += ["", f"Measured at commit {_commits(results)} (numerics version {', '.join(sorted({str(numerics_version(r)) for r in results}))})."
              + _stale_note(entries)]
    return "\n" + "\n".join(lines) + "\n"


def formats2026_block(manifest: dict[str, Entry]) -> str:
    """The formats2026 study from its published points (matched on identity, as `qsim tables` does)."""
    from .studies import markdown, match, study_points

    by_path = {}
    for e in manifest.values():
        if e.path.exists():
            by_path[e.id] = load_published(e)
    found = match(study_points("formats2026"), list(by_path.values()), fresh_only=False)
    entry_of = {id(r): manifest[i] for i, r in by_path.items()}
    table = markdown("formats2026", found, link=lambda p, r: _link(entry_of[id(r)], f"{r['value']:.2f}"))
    commits = _commits(list(found.values())) if found else "-"
    return f"\n{table}\n\nEach row: `qsim run +experiment/f2026=<point>`; measured at commit {commits}.\n"


# Table X offline: (row label, [FP32, W4A4 ABFP-64, W4A8 ABFP-64] entry ids)
TABLE10_ROWS = [
    ("SmolLM2-135M, WikiText-2 test ppl (paper protocol)", ["t10-smollm2-fp32", "t10-smollm2-w4a4-abfp", "t10-smollm2-w4a8-abfp"]),
    ("SmolLM2-135M, SQuAD v1.1 dev F1 (generative)", ["t10-smollm2-squad-fp32", "t10-smollm2-squad-w4a4-abfp",
                                                        "t10-smollm2-squad-w4a8-abfp"]),
    ("SmolLM2-135M, SST-2 dev accuracy (zero-shot)", ["t10-smollm2-sst2-fp32", "t10-smollm2-sst2-w4a4-abfp",
                                                        "t10-smollm2-sst2-w4a8-abfp"]),
    ("all-MiniLM-L6-v2, STS-B dev Spearman", ["minilm-stsb-fp32", "t10-minilm-stsb-w4a4-abfp", "minilm-stsb-w4a8-abfp"]),
]


def table10_block(manifest: dict[str, Entry]) -> str:
    """Table X's offline variant: each task row x FP32 / W4A4 / W4A8 ABFP-64, value and wall time."""
    lines = ["| model, task, metric | extent | FP32 | W4A4 ABFP-64 | W4A8 ABFP-64 |", "|---|---|---:|---:|---:|"]
    everything = []
    for label, ids in TABLE10_ROWS:
        results = [load_published(manifest[i]) for i in ids]
        everything += results
        ev = results[0]["eval"]
        extent = (f"{ev['windows']} x {results[0]['seq_len']} tokens" if "windows" in ev
                  else f"{ev['samples']} of {ev['samples_available']}")
        digits = 2 if results[0]["metric"] in ("ppl", "f1") else 4
        cells = [f"{_link(manifest[i], format(r['value'], f'.{digits}f'))} ({r['timings']['total']:.0f} s)"
                 for i, r in zip(ids, results)]
        lines.append(f"| {label} | {extent} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: the value, linked to its result, and the run's wall time on 2 cores (an upper bound: "
              "some runs shared the machine with other work). Commands: "
              "`qsim run +experiment=table10-offline experiment/row=<row> experiment/col=<col>` (the manifest "
              "names each; `make table10-offline` runs them all as a sweep); MiniLM's FP32 and W4A8 cells are "
              f"the `minilm-stsb` entries above. Measured at commit {_commits(everything)}."]
    return "\n" + "\n".join(lines) + "\n"


def published_cost(manifest: dict[str, Entry]) -> str:
    results = [load_published(e) for e in manifest.values()]
    minutes = sum(r["timings"]["total"] for r in results) / 60
    return f"{len(results)} entries; their runs took {minutes:.0f} minutes together at the last refresh"


def newest_bench(bench_dir: Path = BENCH_DIR) -> Path:
    return max(Path(bench_dir).glob("*.json"))  # names are <date>_<time>.json


def bench_block(path: Path) -> str:
    from .bench import MODEL_CONFIGS, RELATIVE_TARGETS, TARGETS

    b = json.loads(path.read_text())
    v, mo, fk, load, mem, cal = (b[k] for k in ("versions", "model_overhead", "format_kernels", "load", "memory", "calibration"))
    lines = [
        f"Measured {b['started'][:10]} at commit {v['git'][:7]}{' (dirty)' if v['git'].endswith('-dirty') else ''} "
        f"on {b['cpu_count']} CPU cores (torch {v['torch']}, {mo['threads']} threads), "
        f"`{path.relative_to(REPO_ROOT)}`; the whole bench took {b['bench_seconds'] / 60:.1f} minutes.",
        "",
        f"| model overhead, SmolLM2, {mo['windows']} x {mo['seq_len']} tokens | ratio to FP32 (median) "
        "| per-window range | ratio of summed times | target |",
        "|---|---:|---:|---:|---:|",
    ]
    order = list(MODEL_CONFIGS)  # the bench's order (the JSON's keys are sorted)
    for name in sorted(mo["configs"], key=lambda n: order.index(n) if n in order else len(order)):
        if name == "FP32":
            continue
        row = mo["configs"][name]
        target = f"<= {TARGETS[name]}" if name in TARGETS else ""
        if name in RELATIVE_TARGETS and "ratio_to_base" in row:
            target = f"<= {RELATIVE_TARGETS[name][1]}x without rotation: {row['ratio_to_base']:.2f}x"
        lines.append(f"| {name} | {row['ratio']:.2f} | {row['ratio_min']:.2f}-{row['ratio_max']:.2f} "
                     f"| {row['ratio_of_totals']:.2f} | {target} |")

    def kernels(names):
        native = " / ".join(f"{fk[n]['x_clone']:.1f}" for n in names)
        if not all("torch_x_clone" in fk[n] for n in names):  # bench files before native.c
            return native
        return f"{native} (torch kernels: {' / '.join(format(fk[n]['torch_x_clone'], '.1f') for n in names)})"

    qtorch = [n for n in ("e1m2", "e4m3", "e2m1") if "speedup_vs_qtorch" in fk[n]]
    lines += [
        "",
        "| cost | measured |",
        "|---|---:|",
        f"| fake-quantize {fk['numel'] / 2**20:g}M fp32 elements, in `x.clone()` times "
        f"({'compiled kernels, qsim/native.c' if fk.get('kernels') == 'native' else 'torch kernels'}): "
        f"INT4 / INT8 | {kernels(['int4', 'int8'])} |",
        f"| the same, E1M2 / E4M3 / E2M1 (target <= 2.5) | {kernels(['e1m2', 'e4m3', 'e2m1'])} |",
        f"| the same, ABFP-64 INT4 / ABFP-64 E2M1 | {kernels(['abfp64-int4', 'abfp64-e2m1'])} |",
        *([f"| the same, MXFP4 / MXFP8 E4M3 (target <= 2.5) / NVFP4, scales included "
           f"| {kernels(['mxfp4', 'mxfp8_e4m3', 'nvfp4'])} |"]
          if "nvfp4" in fk else []),
        f"| speed-up over qtorch `float_quantize`, {' / '.join(n.upper() for n in qtorch)} "
        f"| {' / '.join(format(fk[n]['speedup_vs_qtorch'], '.1f') + 'x' for n in qtorch)} |",
        f"| SmolLM2 load: first (dequantizes the GGUF) / cached, plus Python imports "
        f"| {load['first']['load_seconds']:.1f} s / {load['cached']['load_seconds']:.1f} s, "
        f"+{load['cached']['import_seconds']:.1f} s |",
        f"| peak RSS of an evaluation: FP32 / W4A8 ABFP n=64 | {mem['fp32_peak_rss_mb']:.0f} / "
        f"{mem['w4a8_abfp_peak_rss_mb']:.0f} MB ({mem['ratio']:.2f}x) |",
    ]
    if "decode" in b:
        d = b["decode"]
        lines.append(f"| decode {d['new_tokens']} tokens (KV cache): FP32 / {d['config']} tokens/s, time ratio (target "
                     f"<= {d['target']}) | {d['fp32_tokens_per_s']:.1f} / {d['tokens_per_s']:.1f}, {d['ratio']:.2f}x |")
    if "blas_mode" in b and "ratio" in b["blas_mode"]:
        r = b["blas_mode"]["ratio"]
        lines.append(f"| MKL's strict mode (qsim's default) over MKL's own, fresh processes alternating: one 512-token "
                     f"window FP32 / W4A8 ABFP, 32 FP32 decode steps | {r['fp32_window_s']:.2f}x / "
                     f"{r['w4a8_abfp_window_s']:.2f}x / {r['fp32_decode_32_s']:.2f}x |")
    for name, label in (("gptq", "GPTQ"), ("smoothquant", "SmoothQuant"), ("mse", "MSE")):
        c = cal[name]
        lines.append(f"| {label} calibration on {c['calib_samples']} x 512 tokens (own process): time / peak RSS "
                     f"| {c['calibrate_seconds']:.0f} s / {c['peak_rss_mb']:.0f} MB |")
    return "\n" + "\n".join(lines) + "\n"


ABFP_ROWS = ["smollm2-w4a8-abfp", "smollm2-w4a8-abfp128", "smollm2-w4-ae4m3-abfp", "smollm2-w4a8-abfp-sq",
             "smollm2-e2m1-abfp", "smollm2-w4a4-abfp", "smollm2-e1m2-abfp", "smollm2-w4a4-abfp-sq",
             "smollm2-w4a4-abfp-qat"]
ROTATION_ROWS = ["smollm2-w4a16-rtn", "smollm2-w4a16-gptq", "smollm2-w4a16-gptq-lorc",
                 "smollm2-w4a8-rtn", "smollm2-w4a8-rotate-gptq-online",
                 "smollm2-w4a4-rtn", "smollm2-w4a4-rotate-gptq-online", "smollm2-w4a4-abfp", "smollm2-w4a4-rotate-abfp", "smollm2-w4a4-rotate-abfp-online",
                 "smollm2-a4-abfp", "smollm2-a4-rotate-abfp-online", "smollm2-w4-abfp", "smollm2-w4-rotate-abfp-online",
                 "smollm2-e2m1-abfp", "smollm2-e2m1-rotate-abfp", "smollm2-e2m1-rotate-abfp-online"]


FORMAT_CHOICE_ROWS = ["smollm2-fp4-minmax", "smollm2-fp4-mse-e2m1", "smollm2-fp4-mse-e1m2", "smollm2-fp4-mse-e3m0",
                      "smollm2-fp4-fpt-baseline", "smollm2-fp4-fpt",
                      "smollm2-w4a4-abfp", "smollm2-e2m1-abfp", "smollm2-w4a4-abfp-mofq", "smollm2-w4a4-abfp-mofq-attn-e2m1"]


def format_choice_block(manifest: dict[str, Entry]) -> str:
    """The fpt / mofq rows, then the per-layer format counts each search chose."""
    text = ppl_table(manifest, FORMAT_CHOICE_ROWS, "per-layer formats on SmolLM2, WikiText-2 test, seq_len 512")
    lines = ["", "| searched entry | input formats chosen (layers) | weight formats chosen (layers) |", "|---|---|---|"]
    for id_ in FORMAT_CHOICE_ROWS:
        methods = load_published(manifest[id_]).get("methods", {})
        counts = methods.get("fpt", {}).get("formats") or methods.get("mofq", {}).get("chosen")
        if counts:
            cell = {role: ", ".join(f"{fmt} {n}" for fmt, n in sorted(counts.get(role, {}).items())) for role in ("act", "weight")}
            lines.append(f"| {manifest[id_].label} | {cell['act']} | {cell['weight']} |")
    return text + "\n".join(lines) + "\n"


def render_blocks(manifest: dict[str, Entry] | None = None, bench: Path | None = None) -> dict[str, str]:
    """Every block's text, from the files."""
    manifest = load_manifest() if manifest is None else manifest
    _stale.clear()
    _stale.update({e.id: reason for e, reason in stale_entries(manifest)})
    return {
        "published-stale": stale_block(manifest),
        "smollm2": ppl_table(manifest, ["smollm2-fp32", "smollm2-fp32-8w", "smollm2-w4a16-abfp64-8w",
                                        "smollm2-w4a16-asym-block32-8w"],
                             "SmolLM2-135M, WikiText-2 test, seq_len 512"),
        "smollm2-abfp": ppl_table(manifest, ABFP_ROWS, "ABFP on SmolLM2 (causal attention scales), WikiText-2 test, seq_len 512"),
        "rotation": ppl_table(manifest, ROTATION_ROWS, "rotation and LoRC on SmolLM2, WikiText-2 test, seq_len 512"),
        "formats2026": formats2026_block(manifest),
        "minilm-stsb": metric_table(manifest, ["minilm-stsb-fp32", "minilm-stsb-w4a8-abfp"],
                                    "all-MiniLM-L6-v2, GLUE STS-B dev"),
        "table10-offline": table10_block(manifest),
        "task-calibration": metric_table(manifest, ["t10-smollm2-sst2-fp32", "sst2-w4a8-mse-ptb", "sst2-w4a8-mse-task"],
                                         "SmolLM2-135M, SST-2 dev zero-shot"),
        "per-layer-formats": format_choice_block(manifest),
        "published-cost": published_cost(manifest),
        "bench": bench_block(newest_bench() if bench is None else bench),
    }


def render(text: str, blocks: dict[str, str]) -> str:
    """text with each block's content replaced by its rendering; an unknown block name is an error."""
    def fill(m: re.Match) -> str:
        name = m.group(2)
        if name not in blocks:
            raise KeyError(f"README block {name!r} has no renderer; known: {', '.join(blocks)}")
        return m.group(1) + blocks[name] + m.group(4)

    return BLOCK.sub(fill, text)


def block_names(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def cmd_render() -> None:
    text = README.read_text()
    new = render(text, render_blocks())
    if new != text:
        README.write_text(new)
    print(f"README.md: {len(block_names(text))} blocks rendered, {'changed' if new != text else 'unchanged'}", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qsim.published", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="re-measure manifest entries (all without ids)")
    run_p.add_argument("ids", nargs="*")
    sub.add_parser("render", help="rewrite the README's published blocks from the files")
    sub.add_parser("check", help="list the stale entries and why (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.command == "run":
        cmd_run(args.ids)
    elif args.command == "check":
        cmd_check()
    else:
        cmd_render()


if __name__ == "__main__":
    main()
