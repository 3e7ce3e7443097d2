"""Malformed inputs (tests/bad_inputs/, listed in its README): each one gives a clear error naming the file and
line (or the config field), or quarantine entries naming file, row, field and reason; rows in = rows kept +
rows quarantined, per file and in total.

    .venv/bin/pytest tests/test_bad_inputs.py -q
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from flows.config import SourceConfig
from storage.shards import read_shard
from tasks.ingest import RAW_CHARS, SUCCESS, IngestError, ingest_split, quarantine_dir

CORPUS = Path(__file__).resolve().parent / "bad_inputs"
MB = 1 << 20

# file -> (rows kept, [(row, reason, field) of every quarantined row])
QUARANTINED = {
    "truncated_line.jsonl": (2, [(3, "invalid_json", "")]),
    "wrong_types.jsonl": (1, [(2, "wrong_type", "output"), (3, "wrong_type", "instruction"),
                              (4, "wrong_type", "messages"), (5, "wrong_type", "conversations[0]"),
                              (6, "missing_field", "response"), (7, "wrong_type", "question")]),
    "nul_bytes.jsonl": (1, [(2, "invalid_encoding", "prompt"), (3, "invalid_json", ""),
                            (4, "invalid_encoding", "input")]),
    "invalid_utf8.jsonl": (1, [(2, "invalid_encoding", ""), (3, "invalid_encoding", "response"),
                               (4, "invalid_encoding", "")]),
    "duplicate_ids.jsonl": (2, [(2, "duplicate", ""), (3, "duplicate", ""), (4, "duplicate", "")]),
    "json_array_line.jsonl": (1, [(1, "unknown_format", "")]),
    "unknown_fields.jsonl": (2, [(2, "unknown_format", ""), (4, "unknown_format", "")]),
    "nan_values.jsonl": (1, [(1, "wrong_type", "response"), (2, "wrong_type", "prompt"), (3, "wrong_type", "prompt")]),
    "deeply_nested.jsonl": (1, [(2, "invalid_json", "")]),
    "mixed_dir": (4, [(4, "unknown_format", "")]),
}
# inputs that cannot be read as a whole -> what the error says
REFUSED = {
    "truncated_array.json": r"truncated_array\.json: line 3: invalid JSON: Unterminated string",
    "invalid_utf8.json": r"invalid_utf8\.json: line 3: not valid UTF-8",
    "empty.jsonl": r"empty\.jsonl: holds no rows",
    "empty.json": r"empty\.json: empty file",
    "blank_lines.jsonl": r"blank_lines\.jsonl: holds no rows",
    "empty_array.json": r"empty_array\.json: holds no rows",
    "not_rows.json": r"not_rows\.json: line 1: expected a JSON array of rows",
    "hf_traversal": r"hf_traversal/state\.json: names '\.\./\.\./outside/.*', outside the dataset directory",
}
# configs/ -> the message `curate run` prints (exit code 2)
CONFIGS = {
    "typo_field.yaml": "select.methd: unknown field; did you mean 'method'?",
    "unknown_section.yaml": "scoring: unknown field; did you mean 'score'?",
    "missing_validation.yaml": "data.validation: required field is missing",
    "validation_not_found.yaml": "data.validation[0].path: no such file or directory",
    "run_id_traversal.yaml": "run_id: must be letters, digits, '-', '_' or '.'",
    "python_tag.yaml": "not valid YAML",
    "wrong_type.yaml": "iterations: expected int, got str 'two'",
    "code_in_values.yaml": "select.metric: '__import__('os').system('touch pwned')' is not computed",
}
GENERATED = ("huge_row.jsonl", "wrong_types.parquet", "truncated.parquet", "hf_dict_traversal/")


def ingest(tmp_path: Path, *paths: Path, split: str = "pool"):
    return ingest_split([SourceConfig(path=str(p)) for p in paths], tmp_path / "out", split, max_chars=16000,
                        shard_rows=100)


def quarantined(stats) -> list[dict]:
    return [row for path in stats.quarantine for row in read_shard(path).to_pylist()]


def assert_reconciles(stats) -> None:
    assert stats.rows_in == stats.rows_kept + stats.rows_quarantined
    assert stats.rows_kept == sum(read_shard(p).num_rows for p in stats.shards)
    assert stats.rows_quarantined == len(quarantined(stats)) == sum(stats.by_reason.values())
    for counts in stats.by_file.values():
        assert counts["rows_in"] == counts["rows_kept"] + counts["rows_quarantined"]


def with_parquet(tmp_path: Path) -> Path:
    """mixed_dir plus a Parquet file (binary, so made here rather than committed)."""
    directory = shutil.copytree(CORPUS / "mixed_dir", tmp_path / "mixed_dir")
    pq.write_table(pa.table({"prompt": ["Parquet row."], "response": ["From c.parquet."]}), directory / "c.parquet")
    return directory


def test_every_corpus_file_has_an_expected_outcome_and_a_readme_line():
    readme = (CORPUS / "README.md").read_text()
    on_disk = {p.name for p in CORPUS.iterdir() if p.name not in ("README.md", "configs")}
    assert on_disk == set(QUARANTINED) | set(REFUSED)
    assert {p.name for p in (CORPUS / "configs").iterdir()} == set(CONFIGS)
    for name in [*on_disk, *CONFIGS, *GENERATED]:
        assert f"`{name}" in readme, f"{name} is not described in tests/bad_inputs/README.md"
    assert len(on_disk) + len(CONFIGS) + len(GENERATED) >= 15


@pytest.mark.parametrize("name", sorted(QUARANTINED))
def test_bad_rows_are_quarantined_naming_file_row_and_field(name, tmp_path):
    path = with_parquet(tmp_path) if name == "mixed_dir" else CORPUS / name
    stats = ingest(tmp_path, path)
    kept, expected = QUARANTINED[name]
    if name == "mixed_dir":
        kept += 1  # the Parquet row
        path = path / "b.jsonl"  # the unknown row's file
    assert stats.rows_kept == kept
    rows = quarantined(stats)
    assert [(r["row"], r["reason"], r["field"]) for r in rows] == expected
    assert all(r["file"] == str(path) and r["detail"] and r["raw"] for r in rows)
    assert_reconciles(stats)


def test_duplicates_point_at_the_kept_row_and_own_ids_stay_in_meta(tmp_path):
    stats = ingest(tmp_path, CORPUS / "duplicate_ids.jsonl")
    kept = read_shard(stats.shards[0]).to_pylist()
    assert {r["detail"] for r in quarantined(stats)} == {kept[0]["sample_id"]}
    assert [json.loads(r["meta"])["id"] for r in kept] == ["a1", "a1"]  # same own id, different pairs: both kept
    meta = [json.loads(r["meta"]) for r in read_shard(ingest(tmp_path / "u", CORPUS / "unknown_fields.jsonl")
                                                      .shards[0]).to_pylist()]
    assert meta[0]["label"] == "benign" and meta[1]["original_file"] == "../../etc/passwd"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unreadable_inputs_stop_ingest_naming_the_file(name, tmp_path):
    with pytest.raises(IngestError, match=REFUSED[name]):
        ingest(tmp_path, CORPUS / name)
    assert not (tmp_path / "out" / SUCCESS).exists()  # nothing half-ingested looks complete


def test_a_10_mb_row_is_quarantined_with_a_bounded_copy(tmp_path):
    path = tmp_path / "huge_row.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"instruction": "Repeat x.", "output": "x" * (10 * MB)}) + "\n")
        f.write(json.dumps({"instruction": "Short.", "output": "Fine.", "notes": "y" * (10 * MB)}) + "\n")
        f.write(json.dumps({"instruction": "Normal row.", "output": "Kept."}) + "\n")
    assert path.stat().st_size > 20 * MB
    stats = ingest(tmp_path, path)
    rows = quarantined(stats)
    assert [(r["row"], r["reason"], r["field"]) for r in rows] == [(1, "too_long", "instruction+output"),
                                                                   (2, "too_long", "notes")]
    assert all(len(r["raw"]) == RAW_CHARS for r in rows) and "10485769 characters" in rows[0]["detail"]
    assert stats.rows_kept == 1 and sum(Path(p).stat().st_size for p in stats.shards + stats.quarantine) < MB
    assert_reconciles(stats)


def test_parquet_with_wrong_types_or_cut_short(tmp_path):
    typed = tmp_path / "wrong_types.parquet"
    pq.write_table(pa.table({"instruction": ["a", "b"], "output": [1, 2]}), typed)
    stats = ingest(tmp_path, typed)
    assert [(r["row"], r["reason"], r["field"]) for r in quarantined(stats)] == [(0, "wrong_type", "output"),
                                                                                 (1, "wrong_type", "output")]
    cut = tmp_path / "truncated.parquet"
    cut.write_bytes(typed.read_bytes()[:-30])
    with pytest.raises(IngestError, match=r"truncated\.parquet: unreadable Parquet file"):
        ingest(tmp_path / "again", cut)


def test_mixed_formats_in_one_directory_read_every_data_file_and_list_the_rest(tmp_path):
    directory = with_parquet(tmp_path)
    stats = ingest(tmp_path, directory)
    assert list(stats.by_file) == [str(directory / n) for n in ("a.json", "b.jsonl", "c.parquet")]
    assert stats.ignored_files == [str(directory / "notes.txt"), str(directory / "rows.csv")]
    prompts = read_shard(stats.shards[0])["prompt"].to_pylist()
    assert prompts == ["Alpaca row.", "ShareGPT row.", "Chat row.", "Question row.", "Parquet row."]


def test_dataset_dict_naming_a_split_outside_is_refused(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"prompt": ["secret"], "response": ["x"]}).save_to_disk(str(tmp_path / "outside"))
    (tmp_path / "hf_dict_traversal").mkdir()
    (tmp_path / "hf_dict_traversal" / "dataset_dict.json").write_text(json.dumps({"splits": ["../outside"]}))
    with pytest.raises(IngestError, match=r"dataset_dict\.json: names '\.\./outside', outside the dataset"):
        ingest(tmp_path, tmp_path / "hf_dict_traversal")


def test_the_whole_corpus_in_one_split_reconciles_per_file(tmp_path):
    paths = [with_parquet(tmp_path) if n == "mixed_dir" else CORPUS / n for n in sorted(QUARANTINED)]
    stats = ingest(tmp_path, *paths)
    assert stats.rows_kept == sum(kept for kept, _ in QUARANTINED.values()) + 1
    assert stats.rows_quarantined == sum(len(rows) for _, rows in QUARANTINED.values())
    assert len(stats.by_file) == len(QUARANTINED) + 2  # mixed_dir holds three data files
    assert_reconciles(stats)


def test_a_validation_split_without_one_usable_row_is_an_error(tmp_path):
    bad = tmp_path / "nan_values_bad.jsonl"
    bad.write_text("".join(line + "\n" for line in (CORPUS / "nan_values.jsonl").read_text().splitlines()[:3]))
    with pytest.raises(IngestError, match=r"validation: no usable rows in .*nan_values_bad\.jsonl: 3 read, all "
                                          r"quarantined \{'wrong_type': 3\}"):
        ingest(tmp_path, bad, split="validation")
    assert read_shard(quarantine_dir(tmp_path / "out") / "shard-00000.parquet").num_rows == 3  # still inspectable


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bad_configs_exit_2_naming_the_field_before_anything_runs(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `touch pwned` would land here, and so would a default root
    assert main(["run", str(CORPUS / "configs" / name), "--root", str(tmp_path / "root")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("config error: ") and CONFIGS[name] in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "root").exists()


def test_a_run_id_override_that_climbs_out_is_refused(tmp_path, capsys):
    config = CORPUS / "configs" / "validation_not_found.yaml"
    assert main(["run", str(config), "--run-id", "../../x", "--root", str(tmp_path / "root")]) == 2
    assert "run_id: must be letters, digits" in capsys.readouterr().err
