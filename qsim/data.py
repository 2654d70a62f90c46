"""Evaluation and calibration text: offline from QSIM_DATA_DIR, online from `datasets`.

QSIM_DATA_DIR follows the layout of ../shared/data (see its README):
wikitext-2-raw-v1/<split>.jsonl, ptb/test.txt, glue/sst2/train.tsv.
Offline there is no WikiText-2 train/validation, so calibration defaults to
PTB test, which is never evaluation text here.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import json
import os
import zlib
from pathlib import Path

DATA_ENV = "QSIM_DATA_DIR"

OFFLINE_FILES = {
    ("wikitext2", "test"): "wikitext-2-raw-v1/test.jsonl",
    ("wikitext2", "validation"): "wikitext-2-raw-v1/validation.jsonl",
    ("wikitext2", "train"): "wikitext-2-raw-v1/train.jsonl",
    ("ptb", "test"): "ptb/test.txt",
    ("sst2", "train"): "glue/sst2/train.tsv",
    ("sst2", "validation"): "glue/sst2/dev.tsv",
    ("stsb", "train"): "glue/stsb/train.tsv",
    ("stsb", "validation"): "glue/stsb/dev.tsv",
    ("squad", "train"): "squad-v1.1/train-v1.1.json",
    ("squad", "validation"): "squad-v1.1/dev-v1.1.json",
    ("humaneval", "test"): "humaneval/HumanEval.jsonl.gz",
    ("imagenet", "validation"): "imagenet/val",  # an image folder: one sub-folder per class
    ("imagenet", "train"): "imagenet/train",
}
HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
    "sst2": ("glue", "sst2", "sentence"),
    "c4": ("allenai/c4", "en", "text"),
    "stsb": ("glue", "stsb", "sentence1"),  # a table: read with load_records
    "squad": ("rajpurkar/squad", None, "question"),  # records: id, title, context, question, answers
    "humaneval": ("openai/openai_humaneval", None, "prompt"),  # records: task_id, prompt, test, entry_point, ...
    "imagenet": ("ILSVRC/imagenet-1k", None, "image"),  # records: image, label (gated on the hub)
}
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
DATASETS = tuple(HUB)
# Plain text (load_rows): what calibration and QAT can read; the others are tables of records.
TEXT_DATASETS = ("wikitext2", "ptb", "sst2", "c4")


class DataError(RuntimeError):
    pass


# (dataset, split) of every load_rows call in this process: run.py checks that a
# run read only the data its identity names.
READ_LOG: list[tuple[str, str]] = []


def data_dir() -> Path | None:
    value = os.environ.get(DATA_ENV)
    return Path(value) if value else None


def offline_path(dataset: str, split: str) -> Path | None:
    root = data_dir()
    rel = OFFLINE_FILES.get((dataset, split))
    if root is None or rel is None:
        return None
    return root / rel


def has_offline(dataset: str, split: str) -> bool:
    path = offline_path(dataset, split)
    return path is not None and path.exists()


def load_rows(dataset: str, split: str) -> list[str]:
    """The rows of a text data set split, offline first, else from the hub."""
    READ_LOG.append((dataset, split))
    if dataset not in TEXT_DATASETS:
        raise DataError(f"{dataset!r} is not a text data set; text: {', '.join(TEXT_DATASETS)}")
    path = offline_path(dataset, split)
    if path is not None and path.exists():
        return _read_offline(path)
    expected = OFFLINE_FILES.get((dataset, split), f"<{dataset} {split}>")
    if data_dir() is not None:
        hint = f"{path} does not exist" if path else f"no offline copy of {dataset} {split} is known"
        raise DataError(f"{hint}; {DATA_ENV}={data_dir()} should hold {expected} (see ../shared/data/README.md)")
    try:
        from datasets import load_dataset

        name, config, column = HUB[dataset]
        ds = load_dataset(name, config, split=split)
    except Exception as err:  # no network, no such split, ...
        raise DataError(
            f"could not load {dataset} {split} from the hub ({type(err).__name__}); offline, set "
            f"{DATA_ENV} to a folder holding {expected} (e.g. ../shared/data)"
        ) from err
    return list(ds[column])


def load_records(dataset: str, split: str) -> list[dict]:
    """The rows of a tabular data set split as dicts (an offline TSV's header names the columns;
    the hub's columns otherwise), offline first, else from the hub."""
    READ_LOG.append((dataset, split))
    path = offline_path(dataset, split)
    if path is not None and path.exists():
        return _offline_records(path)
    if data_dir() is not None:
        check_available(dataset, split)  # raises, naming the file it expects
    try:
        from datasets import load_dataset

        name, config, _ = HUB[dataset]
        rows = [dict(row) for row in load_dataset(name, config, split=split)]
    except Exception as err:
        raise DataError(f"could not load {dataset} {split} from the hub ({type(err).__name__}); offline, set "
                        f"{DATA_ENV} to a folder holding {OFFLINE_FILES.get((dataset, split))} (e.g. ../shared/data)") from None
    for row in rows:  # the hub's SQuAD answers are {"text": [...], "answer_start": [...]}; offline they are the texts
        if isinstance(row.get("answers"), dict):
            row["answers"] = list(row["answers"]["text"])
    return rows


def _offline_records(path: Path) -> list[dict]:
    """An offline table as dicts: TSV (its header names the columns), JSON lines (.jsonl[.gz]),
    or the official SQuAD JSON (flattened to one record per question, answers as their texts)."""
    if path.is_dir():  # an image folder: class folders in sorted order are labels 0, 1, ...
        classes = sorted(p for p in path.iterdir() if p.is_dir())
        return [{"image": str(f), "label": label} for label, folder in enumerate(classes)
                for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    with _readable(path):
        if path.suffix == ".tsv":
            with path.open(encoding="utf-8", newline="") as f:
                return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                return [_json_line(path, n, line) for n, line in enumerate(f, 1) if line.strip()]
        if path.suffix == ".json":
            articles = json.loads(path.read_text(encoding="utf-8"))["data"]
            return [{"id": qa["id"], "title": article["title"], "context": paragraph["context"],
                     "question": qa["question"], "answers": [a["text"] for a in qa["answers"]]}
                    for article in articles for paragraph in article["paragraphs"] for qa in paragraph["qas"]]
    raise DataError(f"{path}: no reader for this file type")


def _json_line(path: Path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {n} is not valid JSON ({err.msg}, column {err.colno}); "
                        "the file is corrupt or truncated") from None


@contextlib.contextmanager
def _readable(path: Path):
    """A corrupt, truncated or misshapen offline file as one DataError naming it (not a traceback)."""
    try:
        yield
    except DataError:
        raise
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); "
                        "the file is corrupt or truncated") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start}); the file is corrupt") from None
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: not a whole gzip file ({err}); the file is corrupt or truncated") from None
    except (KeyError, TypeError, IndexError, AttributeError) as err:
        raise DataError(f"{path}: records lack the expected fields ({type(err).__name__}: {err}); "
                        "not the file qsim expects here") from None



def _read_offline(path: Path) -> list[str]:
    return list(_offline_rows(path))


def _offline_rows(path: Path):
    """The rows of an offline file, one at a time (a check for text stops at the first)."""
    with _readable(path), path.open(encoding="utf-8", newline="" if path.suffix == ".tsv" else None) as f:
        if path.suffix == ".jsonl":
            yield from (_json_line(path, n, line)["text"] for n, line in enumerate(f, 1))
        elif path.suffix == ".tsv":
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(reader, None)  # header
            yield from (row[0] for row in reader if row)
        else:
            yield from (line.rstrip("\n") for line in f)


def check_available(dataset: str, split: str) -> None:
    """Fail early (before any model loads) when offline data is configured but missing."""
    if data_dir() is not None and not has_offline(dataset, split):
        expected = OFFLINE_FILES.get((dataset, split))
        if expected is None:
            raise DataError(f"no offline copy of {dataset} {split} exists; {DATA_ENV} data has: "
                            + ", ".join(f"{d} {s}" for (d, s) in OFFLINE_FILES if has_offline(d, s)))
        raise DataError(f"{DATA_ENV}={data_dir()} has no {expected}")
    path = offline_path(dataset, split)
    if data_dir() is None:
        return
    if path.is_dir():
        if not _offline_records(path):
            raise DataError(f"{path} holds no records: {dataset} {split} would give no samples")
        return
    # the whole file is parsed here (a truncated last line fails now, not after the model loaded)
    st = path.stat()
    records = path.name.endswith((".json", ".gz"))
    if not _parses_whole(str(path.resolve()), st.st_size, st.st_mtime_ns, records):
        raise DataError(f"{path} holds no {'records' if records else 'text'}: {dataset} {split} would give "
                        f"no {'samples' if records else 'tokens'}")


@functools.lru_cache(maxsize=32)
def _parses_whole(path: str, _size: int, _mtime_ns: int, records: bool) -> bool:
    """Whether the whole file parses and holds something; once per process per file version
    (stat in the key): a sweep checks every job's data without re-reading it."""
    if records:
        return bool(_offline_records(Path(path)))
    return any([row.strip() for row in _offline_rows(Path(path))])  # a list: every row is read


def data_identity(dataset: str, split: str) -> dict:
    """What identifies the text load_rows(dataset, split) reads now: the offline
    file's sha256, or the hub data set (unpinned: the hub's current revision)."""
    path = offline_path(dataset, split)
    if path is not None and path.exists():
        return {"dataset": dataset, "split": split, "source": "offline", "file": OFFLINE_FILES[(dataset, split)],
                "sha256": file_sha256(path)}
    if dataset not in HUB:
        raise DataError(f"unknown data set {dataset!r}; valid: {', '.join(DATASETS)}")
    if data_dir() is not None:
        check_available(dataset, split)  # raises: load_rows would not fall back to the hub either
    name, config, _ = HUB[dataset]
    return {"dataset": dataset, "split": split, "source": "hub", "hub_id": f"{name}/{config}", "revision": None}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, once per process per (path, size, mtime); of a folder, the
    sha256 of its files' relative paths and hashes."""
    if Path(path).is_dir():
        files = sorted(f for f in Path(path).rglob("*") if f.is_file())
        listing = json.dumps([[str(f.relative_to(path)), file_sha256(f)] for f in files])
        return hashlib.sha256(listing.encode()).hexdigest()
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def join_text(rows: list[str]) -> str:
    return "\n\n".join(rows)


def tokenize(tokenizer, text: str) -> "torch.Tensor":
    import torch  # here, not at the top: `qsim tables` checks data identities without torch

    return torch.as_tensor(tokenizer(text)["input_ids"], dtype=torch.long).reshape(-1)


def calibration_windows(tokenizer, dataset: str, split: str, n_samples: int, seq_len: int, seed: int) -> "torch.Tensor":
    """`n_samples` random token windows of `seq_len` (GPTQ's sampler), deterministic per seed."""
    return sample_windows(tokenize(tokenizer, join_text(load_rows(dataset, split))), n_samples, seq_len, seed,
                          f"{dataset} {split}")


def sample_windows(ids: "torch.Tensor", n_samples: int, seq_len: int, seed: int, source: str) -> "torch.Tensor":
    """n_samples windows of seq_len tokens at seeded random starts in ids."""
    import torch

    if ids.numel() <= seq_len:
        raise DataError(f"{source} has {ids.numel()} tokens, fewer than calib seq_len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])
