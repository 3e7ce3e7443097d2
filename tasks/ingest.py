"""Ingest: read pool/validation/test sources into Parquet shards with stable ids; quarantine bad rows.

    stats = ingest_split([SourceConfig(path="data/demo/pool_alpaca.json")], Path("out/pool"), "pool",
                         max_chars=16000, shard_rows=256)   # SourceConfig from flows.config, or any `Source`

Output of one split, in `out_dir` (e.g. runs/demo/pool), and its quarantine beside it (runs/demo/quarantine/pool),
so that the split's directory holds its rows and nothing else `datasets.load_dataset` would read as data:
    shard-00000.parquet ...        sample_id, question_id, source, prompt, response, meta (JSON string)
    .SUCCESS.json                  stats + a hash of the inputs, written last: an identical rerun is skipped
    ../quarantine/<split>/shard-00000.parquet   file, row, reason, field, detail, raw (only if something was rejected)

Every input row ends up in exactly one of the two (rows_in == rows_kept + rows_quarantined). A file that
cannot be read as a whole (broken JSON array, truncated Parquet, missing path, no rows at all) stops ingest
with an IngestError naming the file, and for JSON the line; so does a validation split with no usable row,
since everything downstream is measured against it. Files in a source directory that are not data (.csv,
.txt, README.md) are listed in `ignored_files`, never silently dropped.
"""
from __future__ import annotations

import hashlib
import json
import os
import typing
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from storage.shards import shard_is_complete, shard_name, write_shard
from tasks.formats import IngestError, ignored_files, iter_csv, iter_rows, source_files
from tasks.row_formats import RowError, RowFormat, alpaca_prompt, text, to_pair

PROMPT_KEYS = ("prompt", "goal", "instruction", "question")  # read_prompts takes the first one present
SUCCESS = ".SUCCESS.json"  # hidden, like the shard manifests (storage/shards.py)
RAW_CHARS = 10_000  # the quarantine keeps this much of each rejected row

POOL_SCHEMA = pa.schema([(name, pa.string()) for name in
                         ("sample_id", "question_id", "source", "prompt", "response", "meta")])
QUARANTINE_SCHEMA = pa.schema([("file", pa.string()), ("row", pa.int64()), ("reason", pa.string()),
                               ("field", pa.string()), ("detail", pa.string()), ("raw", pa.string())])


class Source(typing.Protocol):
    """One input of a split, as ingest reads it. A run passes flows.config.SourceConfig, which has these fields
    and validates them; tasks never import flows, so the shape is stated here."""
    path: str  # a JSON, JSONL or Parquet file, or a directory (HF `save_to_disk` or files)
    source: str  # label of its rows in coverage tables; "" = the file name without extension
    format: RowFormat | None  # which keys hold the turns or fields; None: detected per row


@dataclass
class IngestStats:
    split: str
    rows_in: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)  # quarantine reason -> count
    by_file: dict[str, dict] = field(default_factory=dict)  # file -> {"rows_in", "rows_kept", "rows_quarantined"}
    shards: list[str] = field(default_factory=list)  # kept rows
    quarantine: list[str] = field(default_factory=list)  # rejected rows; empty when nothing was rejected
    ignored_files: list[str] = field(default_factory=list)  # non-data files in source directories, not read


def normalize_text(s: str) -> str:
    """NFC, stripped, every run of whitespace collapsed to one space: what ids are computed on."""
    return " ".join(unicodedata.normalize("NFC", s).split())


def make_id(*parts: str) -> str:
    # "\x1f" is whitespace to str.split(), so normalized parts never contain it: the join is unambiguous.
    joined = "\x1f".join(normalize_text(p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]


def ingest_split(sources: list[Source], out_dir: Path, split: str, max_chars: int, shard_rows: int,
                 producer: str = "") -> IngestStats:
    """Read every source of one split into `out_dir` (layout in the module docstring).

    Args:
        sources: files or directories, read in order; `source` labels rows (default: the file name's stem).
        out_dir: output directory; previous output there is reused if the inputs are unchanged, else replaced.
        split: name recorded in the stats ("pool", "validation", "test").
        max_chars: rows with len(prompt) + len(response) above this are quarantined as too_long.
        shard_rows: rows per output shard.
        producer: recorded in each shard's manifest (e.g. the task run id).
    """
    out_dir = Path(out_dir)
    inputs = [(src, path) for src in sources for path in source_files(Path(src.path))]
    digest = _inputs_digest(sources, split, max_chars, shard_rows)
    done = _load_success(out_dir, digest)
    if done is not None:
        return done
    _clear_outputs(out_dir)
    kept = _ShardWriter(out_dir, POOL_SCHEMA, shard_rows, producer)
    rejected = _ShardWriter(quarantine_dir(out_dir), QUARANTINE_SCHEMA, shard_rows, producer)
    stats = IngestStats(split, ignored_files=[str(p) for src in sources for p in ignored_files(Path(src.path))])
    seen: set[str] = set()  # sample ids kept so far in this split, across files
    for src, path in inputs:
        counts = stats.by_file.setdefault(str(path), {"rows_in": 0, "rows_kept": 0, "rows_quarantined": 0})
        for row_no, value, raw in iter_rows(path):
            counts["rows_in"] += 1
            try:
                kept.add(_admit(value, src, str(path), row_no, max_chars, seen))
                counts["rows_kept"] += 1
            except RowError as e:
                rejected.add({"file": str(path), "row": row_no, "reason": e.reason, "field": e.field,
                              "detail": e.detail, "raw": (raw if raw is not None else _dumps(value))[:RAW_CHARS]})
                counts["rows_quarantined"] += 1
                stats.by_reason[e.reason] = stats.by_reason.get(e.reason, 0) + 1
    # An empty split still gets one (empty) shard, so readers downstream always find the schema.
    stats.shards = kept.close(write_empty=True)
    stats.quarantine = rejected.close(write_empty=False)
    for key in ("rows_in", "rows_kept", "rows_quarantined"):
        setattr(stats, key, sum(c[key] for c in stats.by_file.values()))
    assert stats.rows_in == stats.rows_kept + stats.rows_quarantined, stats
    if split == "validation" and stats.rows_kept == 0:
        raise IngestError(f"validation: no usable rows in {', '.join(stats.by_file)}: {stats.rows_in} read, all "
                          f"quarantined {stats.by_reason} (see {quarantine_dir(out_dir)})")
    _write_success(out_dir, digest, stats)
    return stats


def quarantine_dir(out_dir: Path) -> Path:
    return out_dir.parent / "quarantine" / out_dir.name


def read_prompts(path: Path) -> list[str]:
    """Prompts alone (no responses), for the refusal-rate evaluation.

    Reads JSON, JSONL, CSV or Parquet rows with a `prompt`, `goal`, `instruction` (+ optional `input`) or
    `question` column; a row without one, or with an empty or non-string one, raises IngestError.
    """
    path = Path(path)
    rows = iter_csv(path) if path.suffix == ".csv" else (r for f in source_files(path) for r in iter_rows(f))
    prompts = []
    for row_no, value, _ in rows:
        where = f"{path}: {'line' if path.suffix in ('.jsonl', '.csv') else 'row'} {row_no}"
        if isinstance(value, RowError):
            raise IngestError(f"{where}: {value.reason}: {value.detail}")
        key = next((k for k in PROMPT_KEYS if isinstance(value, dict) and value.get(k) is not None), None)
        if key is None:
            raise IngestError(f"{where}: no prompt; expected one of the columns {', '.join(PROMPT_KEYS)}")
        try:
            prompt = text(value[key], key)
            if key == "instruction" and value.get("input") is not None:
                prompt = alpaca_prompt(prompt, text(value["input"], "input"))
        except RowError as e:
            raise IngestError(f"{where}: {e.field}: {e.detail}") from None
        if not prompt.strip():
            raise IngestError(f"{where}: empty {key}")
        prompts.append(prompt.strip())
    return prompts


def _admit(value, src: Source, file: str, row_no: int, max_chars: int, seen: set[str]) -> dict:
    """One output row for `value`, or RowError with the quarantine reason."""
    if isinstance(value, RowError):  # the reader could not parse or decode this row
        raise value
    pair = to_pair(value, src.format)
    prompt, response = pair.prompt.strip(), pair.response.strip()
    # Ids are given before any check below, so a rejected duplicate carries the id of the row that was kept.
    # a conversation's ids cover the turns before the prompt (system, history): the same last question after
    # another dialogue is another question; a single exchange keeps the ids it always had
    before = [turn["content"] for turn in pair.meta.get("history", [])]
    before = ([pair.meta["system"]] if "system" in pair.meta else []) + before
    sample_id, question_id = make_id(*before, prompt, response), make_id(*before, prompt)
    if not prompt:
        raise RowError("empty_prompt", pair.prompt_field, f"sample_id={sample_id}")
    if not response:
        raise RowError("empty_response", pair.response_field, f"sample_id={sample_id}")
    if len(prompt) + len(response) > max_chars:
        raise RowError("too_long", f"{pair.prompt_field}+{pair.response_field}",
                       f"{len(prompt) + len(response)} characters > max_chars={max_chars}")
    extra = {key: len(_dumps(val)) for key, val in pair.meta.items()}  # kept in `meta`, so bounded too
    if sum(extra.values()) > max_chars:
        largest = max(extra, key=extra.get)
        raise RowError("too_long", largest, f"fields besides the pair hold {sum(extra.values())} characters > "
                                            f"max_chars={max_chars}")
    if sample_id in seen:
        raise RowError("duplicate", "", sample_id)
    seen.add(sample_id)
    meta = {"file": file, "row": row_no}
    for key, val in pair.meta.items():
        meta[f"original_{key}" if key in meta else key] = val  # a row's own "file"/"row" must not be lost
    return {"sample_id": sample_id, "question_id": question_id, "source": _label(src), "prompt": prompt,
            "response": response, "meta": _dumps(meta)}


def _dumps(value) -> str:
    # Lone surrogates cannot be written as UTF-8; escape them rather than fail on one bad row.
    s = json.dumps(value, ensure_ascii=False, default=str)
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def _label(src: Source) -> str:
    return src.source or Path(src.path).name.split(".")[0]  # same default as flows.config.resolve_paths


class _ShardWriter:
    """Buffers rows and writes a shard every `shard_rows` rows, so memory stays flat on large inputs."""

    def __init__(self, directory: Path, schema: pa.Schema, shard_rows: int, producer: str):
        self.directory, self.schema, self.shard_rows, self.producer = directory, schema, shard_rows, producer
        self.rows: list[dict] = []
        self.paths: list[str] = []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= self.shard_rows:
            self._flush()

    def close(self, write_empty: bool) -> list[str]:
        if self.rows or (write_empty and not self.paths):
            self._flush()
        return self.paths

    def _flush(self) -> None:
        path = self.directory / shard_name(len(self.paths))
        write_shard(pa.Table.from_pylist(self.rows, schema=self.schema), path, self.producer)
        self.paths.append(str(path))
        self.rows = []


def _inputs_digest(sources: list[Source], split: str, max_chars: int, shard_rows: int) -> str:
    """Hash of everything the output depends on: paths, sizes and mtimes of the inputs, and the settings."""
    h = hashlib.sha256(json.dumps([split, max_chars, shard_rows]).encode())
    for src in sources:
        if src.format is not None:  # sources read as detected hash as they did before formats existed
            h.update(json.dumps(asdict(src.format), sort_keys=True).encode())
        path = Path(src.path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for p in files:
            st = p.stat()
            h.update(json.dumps([_label(src), str(p), st.st_size, st.st_mtime_ns]).encode())
    return h.hexdigest()


def _load_success(out_dir: Path, digest: str) -> IngestStats | None:
    """The stored stats if `out_dir` holds complete output for these exact inputs, else None."""
    try:
        done = json.loads((out_dir / SUCCESS).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if done.get("inputs") != digest:
        return None
    stats = IngestStats(**done["stats"])
    return stats if all(shard_is_complete(Path(p)) for p in stats.shards + stats.quarantine) else None


def _clear_outputs(out_dir: Path) -> None:
    # The marker goes first: a run killed while rewriting must never look complete.
    (out_dir / SUCCESS).unlink(missing_ok=True)
    (out_dir / "_SUCCESS.json").unlink(missing_ok=True)  # the marker's visible name in earlier versions
    # out_dir / "quarantine": where earlier versions kept the quarantine, inside the split
    for directory in (out_dir, quarantine_dir(out_dir), out_dir / "quarantine"):
        for p in [*directory.glob("shard-*.parquet*"), *directory.glob(".shard-*.parquet.manifest.json")]:
            p.unlink()  # shards and their manifests
    if (out_dir / "quarantine").is_dir() and not any((out_dir / "quarantine").iterdir()):
        (out_dir / "quarantine").rmdir()


def _write_success(out_dir: Path, digest: str, stats: IngestStats) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{SUCCESS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"inputs": digest, "stats": asdict(stats)}, indent=1))
    os.replace(tmp, out_dir / SUCCESS)
