"""Input files: read a file row by row (turning a row into a pair is tasks/row_formats.py).

Files: `.json` (an array of rows, or an object holding one list of rows), `.jsonl`, `.parquet`, a Hugging
Face `save_to_disk` directory, or a plain directory of such files; `.csv` only for prompt lists.

A file that holds no rows at all is an error (there is nothing to quarantine, and it is almost always the wrong
path), and so is a Hugging Face dataset whose metadata names files outside its own directory.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from storage.shards import MANIFEST_SUFFIX
from tasks.row_formats import RowError

DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
BATCH_ROWS = 1024  # rows per Arrow batch when reading Parquet / HF datasets


class IngestError(ValueError):
    """A whole input cannot be read; the message starts with the file (and line, where known)."""


def _is_hf_dir(path: Path) -> bool:
    return (path / "state.json").exists() or (path / "dataset_dict.json").exists()


def _is_bookkeeping(p: Path) -> bool:
    # Shard manifests are JSON too, "." files are temporaries, manifests and markers (.SUCCESS.json; "_" in
    # earlier versions).
    return p.name.startswith((".", "_")) or p.name.endswith(MANIFEST_SUFFIX)


def ignored_files(path: Path) -> list[Path]:
    """The files of a plain data directory that ingest does not read (README.md, .csv, .txt, ...)."""
    listing = sorted(path.iterdir()) if path.is_dir() and not _is_hf_dir(path) else []
    return [p for p in listing if p.is_file() and p.suffix not in DATA_SUFFIXES and not _is_bookkeeping(p)]


def source_files(path: Path) -> list[Path]:
    """What one source path reads as: the file, a Hugging Face dataset directory, or a folder's data files."""
    if not path.exists():
        raise IngestError(f"{path}: no such file or directory")
    if path.is_dir():
        if _is_hf_dir(path):
            return [path]
        files = [p for p in sorted(path.iterdir()) if p.is_file() and p.suffix in DATA_SUFFIXES
                 and not _is_bookkeeping(p)]
        if not files:
            raise IngestError(f"{path}: directory holds no .json, .jsonl or .parquet files")
        return files
    if path.suffix not in DATA_SUFFIXES:
        raise IngestError(f"{path}: unsupported file type; expected .json, .jsonl, .parquet or a directory")
    return [path]


def iter_rows(path: Path) -> Iterator[tuple[int, object, str | None]]:
    """(row number, parsed row or RowError, the row's original text if it has one) for each row."""
    reader = _iter_hf if path.is_dir() else {".jsonl": _iter_jsonl, ".json": _iter_json,
                                              ".parquet": _iter_parquet}[path.suffix]
    return _refuse_empty(path, reader(path))


def _refuse_empty(path: Path, rows):
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        raise IngestError(f"{path}: holds no rows (an empty file?); remove it from the config or fix the path")


def _iter_jsonl(path: Path):
    # Binary, line by line: memory stays flat, and one bad line is quarantined instead of stopping ingest.
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line_no == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue  # blank lines are not rows
            try:
                s = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                yield line_no, RowError("invalid_encoding", "", f"not UTF-8: {e}"), line.decode("utf-8", "replace")
                continue
            try:
                value = json.loads(s)
            except json.JSONDecodeError as e:
                value = RowError("invalid_json", "", str(e))
            except RecursionError:  # [[[[...: the parser recurses once per level
                value = RowError("invalid_json", "", "nested too deeply to parse")
            yield line_no, value, s


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise IngestError(f"{path}: line {line}: not valid UTF-8 ({e.reason})") from None


def _iter_json(path: Path):
    text = _decode(path)
    if not text.strip():
        raise IngestError(f"{path}: empty file; expected a JSON array of rows")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise IngestError(f"{path}: line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise IngestError(f"{path}: JSON nested too deeply to parse") from None
    if isinstance(doc, dict):  # {"data": [...]}: an object holding one list of rows
        lists = [v for v in doc.values() if isinstance(v, list)]
        doc = lists[0] if len(lists) == 1 else doc
    if not isinstance(doc, list):
        raise IngestError(f"{path}: line 1: expected a JSON array of rows or an object holding one list of rows")
    for index, row in enumerate(doc):
        yield index, row, None


def _iter_arrow_rows(batches):
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield index, row, None
            index += 1


def _iter_parquet(path: Path):
    try:
        yield from _iter_arrow_rows(pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS))
    except (pa.ArrowException, OSError) as e:
        raise IngestError(f"{path}: unreadable Parquet file: {e}") from None


def _check_hf_names(path: Path) -> None:
    """Refuse split and data file names in a dataset's metadata that lead outside its directory:
    `datasets` opens whatever `state.json` or `dataset_dict.json` names, `../..` included."""
    directory = path.resolve()
    try:
        listing = path / "dataset_dict.json"
        splits = json.loads(listing.read_text())["splits"] if listing.exists() else ["."]
        names = [(listing, split) for split in splits if split != "."]
        for split in splits:
            state = path / split / "state.json"
            if state.exists() and state.resolve().is_relative_to(directory):
                files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
                names += [(state, name if split == "." else f"{split}/{name}") for name in files]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IngestError(f"{path}: unreadable Hugging Face dataset metadata: {e}") from None
    for where, name in names:
        if not isinstance(name, str) or not (path / name).resolve().is_relative_to(directory):
            raise IngestError(f"{where}: names {name!r}, outside the dataset directory {path}; refusing to read it")


def _iter_hf(path: Path):
    import datasets  # heavy; only needed for Hugging Face dataset directories

    _check_hf_names(path)
    try:
        ds = datasets.load_from_disk(str(path))
    except (OSError, ValueError, pa.ArrowException) as e:
        raise IngestError(f"{path}: unreadable Hugging Face dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise IngestError(f"{path}: no 'train' split in this DatasetDict; available splits: {', '.join(ds)}")
        ds = ds["train"]
    yield from _iter_arrow_rows(ds.with_format("arrow").iter(batch_size=BATCH_ROWS))


def iter_csv(path: Path):
    reader = csv.DictReader(io.StringIO(_decode(path), newline=""))
    try:
        for row in reader:
            yield reader.line_num, row, None
    except csv.Error as e:
        raise IngestError(f"{path}: line {reader.line_num}: invalid CSV: {e}") from None
