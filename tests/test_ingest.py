"""Ingest: input kinds, row formats, quarantine reasons, stable ids, reruns.

    python -m pytest tests/test_ingest.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.config import SourceConfig
from storage.shards import list_shards, read_manifest, read_shard, sha256_file
from tasks.ingest import IngestError, ingest_split, make_id, normalize_text, read_prompts

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
POOL_COLUMNS = ["sample_id", "question_id", "source", "prompt", "response", "meta"]
QUARANTINE_COLUMNS = ["file", "row", "reason", "field", "detail", "raw"]


def write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ingest(tmp_path: Path, *paths: Path, out: str = "out", max_chars: int = 1000, shard_rows: int = 100):
    sources = [SourceConfig(path=str(p)) for p in paths]
    return ingest_split(sources, tmp_path / out, "pool", max_chars=max_chars, shard_rows=shard_rows)


def kept(stats) -> list[dict]:
    rows = [r for path in stats.shards for r in read_shard(path).to_pylist()]
    for r in rows:
        r["meta"] = json.loads(r["meta"])
    return rows


def quarantined(stats) -> list[dict]:
    return [r for path in stats.quarantine for r in read_shard(path).to_pylist()]


def assert_reconciles(stats) -> None:
    assert stats.rows_in == stats.rows_kept + stats.rows_quarantined
    assert stats.rows_kept == len(kept(stats))
    assert stats.rows_quarantined == len(quarantined(stats)) == sum(stats.by_reason.values())
    assert stats.rows_in == sum(c["rows_in"] for c in stats.by_file.values())


# ids ------------------------------------------------------------------------------------------------------


def test_normalize_text():
    assert normalize_text("  Cafe\u0301 \n\t menu  ") == "Caf\u00e9 menu"  # NFC + whitespace
    assert normalize_text("\u3000\n") == ""


def test_make_id_is_stable_and_unambiguous():
    assert make_id("What is 2+2?", "4") == make_id(" What is  2+2?\n", "4 ")
    assert len(make_id("q", "r")) == 16 and int(make_id("q", "r"), 16) >= 0
    assert make_id("a b", "c") != make_id("a", "b c")
    assert make_id("q", "r") != make_id("q", "r2") and make_id("q") != make_id("q", "r")


# input kinds and row formats -------------------------------------------------------------------------------


def test_alpaca_json_array(tmp_path):
    path = write_json(tmp_path / "alp.json", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "label": "benign"},
        {"instruction": "Say hi.", "input": "", "output": " Hi! "},
    ])
    stats = ingest(tmp_path, path)
    rows = kept(stats)
    assert list(read_shard(stats.shards[0]).column_names) == POOL_COLUMNS
    assert [r["prompt"] for r in rows] == ["Add the numbers.\n\n2 and 3", "Say hi."]
    assert rows[1]["response"] == "Hi!"
    assert rows[0]["source"] == "alp"
    assert rows[0]["meta"] == {"file": str(path), "row": 0, "label": "benign"}
    assert rows[1]["meta"]["row"] == 1  # 0-based index in a JSON array
    assert rows[0]["sample_id"] == make_id("Add the numbers.\n\n2 and 3", "5")
    assert rows[0]["question_id"] == make_id("Add the numbers.\n\n2 and 3")
    assert stats.quarantine == [] and not (tmp_path / "quarantine").exists()
    assert_reconciles(stats)


def test_json_object_holding_one_list_and_source_label(tmp_path):
    path = write_json(tmp_path / "wrapped.json", {"version": 2, "data": [{"prompt": "p", "response": "r"}]})
    stats = ingest_split([SourceConfig(path=str(path), source="mine")], tmp_path / "out", "pool", 100, 10)
    assert [(r["prompt"], r["source"]) for r in kept(stats)] == [("p", "mine")]


def test_sharegpt_jsonl_takes_the_last_exchange_and_keeps_the_turns_before_it(tmp_path):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"id": "x1", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "gpt", "value": "Hello there."},  # before any human turn: history, never the response
        {"from": "human", "value": "Capital of France?"},
        {"from": "gpt", "value": "Paris."},
        {"from": "human", "value": "And Italy?"},
        {"from": "gpt", "value": "Rome."},
    ]}])
    (row,) = kept(ingest(tmp_path, path))
    assert (row["prompt"], row["response"]) == ("And Italy?", "Rome.")
    history = [{"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Capital of France?"},
               {"role": "assistant", "content": "Paris."}]
    assert row["meta"] == {"file": str(path), "row": 1, "id": "x1", "system": "Be brief.", "history": history,
                           "extra_turns": 3}


def test_chat_messages_in_parquet(tmp_path):
    path = tmp_path / "chat.parquet"
    messages = [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}],
                [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                 {"role": "assistant", "content": "A"}]]
    pq.write_table(pa.table({"messages": messages, "label": ["a", "b"]}), path)
    rows = kept(ingest(tmp_path, path))
    assert [(r["prompt"], r["response"]) for r in rows] == [("Hi?", "Hello."), ("Q", "A")]
    assert rows[1]["meta"] == {"file": str(path), "row": 1, "label": "b", "system": "S", "extra_turns": 0}


def test_prompt_response_and_question_answer_rows(tmp_path):
    path = tmp_path / "mix.jsonl"  # with a UTF-8 byte order mark and a blank line, as some editors write
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "P", "response": "R"}\n\n{"question": "Q", "answer": "A"}\n')
    rows = kept(ingest(tmp_path, path))
    assert [(r["prompt"], r["response"], r["meta"]["row"]) for r in rows] == [("P", "R", 1), ("Q", "A", 3)]


def test_parquet_alpaca_with_null_input(tmp_path):
    path = tmp_path / "alp.parquet"
    pq.write_table(pa.table({"instruction": ["I1", "I2"], "input": [None, "x"], "output": ["O1", "O2"]}), path)
    rows = kept(ingest(tmp_path, path))
    assert [r["prompt"] for r in rows] == ["I1", "I2\n\nx"]
    assert [r["meta"]["row"] for r in rows] == [0, 1]


def test_hf_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["I1", "I2"], "input": ["", ""], "output": ["O1", "O2"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    stats = ingest(tmp_path, tmp_path / "ds")
    assert [r["response"] for r in kept(stats)] == ["O1", "O2"]
    assert list(stats.by_file) == [str(tmp_path / "ds")] and kept(stats)[0]["source"] == "ds"

    train, other = datasets.Dataset.from_dict(rows), datasets.Dataset.from_dict({"prompt": ["p"], "response": ["r"]})
    datasets.DatasetDict({"train": train, "test": other}).save_to_disk(str(tmp_path / "dd"))
    assert [r["response"] for r in kept(ingest(tmp_path, tmp_path / "dd", out="out2"))] == ["O1", "O2"]

    datasets.DatasetDict({"validation": train, "test": other}).save_to_disk(str(tmp_path / "nodd"))
    with pytest.raises(IngestError, match=r"nodd.*available splits: validation, test"):
        ingest(tmp_path, tmp_path / "nodd", out="out3")


def test_plain_directory_reads_data_files_sorted_by_name(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    write_jsonl(d / "b.jsonl", [{"prompt": "pb", "response": "rb"}])
    write_json(d / "a.json", [{"instruction": "ia", "output": "oa"}])
    pq.write_table(pa.table({"question": ["qc"], "answer": ["ac"]}), d / "c.parquet")
    (d / "README.md").write_text("not data")
    stats = ingest(tmp_path, d)
    assert [r["prompt"] for r in kept(stats)] == ["ia", "pb", "qc"]
    assert list(stats.by_file) == [str(d / n) for n in ("a.json", "b.jsonl", "c.parquet")]
    assert all(c == {"rows_in": 1, "rows_kept": 1, "rows_quarantined": 0} for c in stats.by_file.values())
    assert {r["source"] for r in kept(stats)} == {"mixed"}


# quarantine ------------------------------------------------------------------------------------------------


def test_every_quarantine_reason(tmp_path):
    good = {"instruction": "Name a color.", "output": "Blue."}
    rows = [
        json.dumps(good),                                                          # 1 kept
        json.dumps({"instruction": "No answer here."}),                            # 2 missing_field output
        json.dumps({"conversations": [{"from": "human", "value": "hi"}]}),         # 3 missing_field gpt turn
        json.dumps({"instruction": "Empty answer.", "output": "  \n "}),           # 4 empty_response
        json.dumps({"prompt": " ", "response": "orphan"}),                         # 5 empty_prompt
        json.dumps({"instruction": "Number answer.", "output": 42}),               # 6 wrong_type output
        json.dumps({"messages": [{"role": "user", "content": ["a", "b"]},
                                 {"role": "assistant", "content": "x"}]}),         # 7 wrong_type content
        json.dumps({"prompt": "Long?", "response": "x" * 200}),                    # 8 too_long
        json.dumps({"instruction": " Name a  color. ", "output": "Blue."}),        # 9 duplicate (normalized)
        json.dumps({"text": "just text"}),                                         # 10 unknown_format
        json.dumps([1, 2]),                                                        # 11 unknown_format (not an object)
        '{"instruction": "broken", ',                                              # 12 invalid_json
        json.dumps({"prompt": "nul\u0000byte", "response": "r"}),                  # 13 invalid_encoding (NUL)
    ]
    path = tmp_path / "bad.jsonl"
    data = "\n".join(rows).encode() + b"\n" + b'{"prompt": "caf\xe9", "response": "r"}\n'  # 14 not UTF-8
    path.write_bytes(data)
    stats = ingest(tmp_path, path, max_chars=100)
    assert stats.by_reason == {"missing_field": 2, "empty_response": 1, "empty_prompt": 1, "wrong_type": 2,
                               "too_long": 1, "duplicate": 1, "unknown_format": 2, "invalid_json": 1,
                               "invalid_encoding": 2}
    q = {r["row"]: r for r in quarantined(stats)}
    assert set(q) == set(range(2, 15))
    assert (q[2]["reason"], q[2]["field"]) == ("missing_field", "output")
    assert (q[3]["reason"], q[3]["field"]) == ("missing_field", "conversations.gpt")
    assert (q[6]["reason"], q[6]["field"]) == ("wrong_type", "output")
    assert (q[7]["reason"], q[7]["field"]) == ("wrong_type", "messages[0].content")
    assert q[8]["reason"] == "too_long" and "205" in q[8]["detail"]
    (good_row,) = kept(stats)
    assert q[9]["reason"] == "duplicate" and q[9]["detail"] == good_row["sample_id"]
    assert q[12]["reason"] == "invalid_json" and q[12]["raw"] == '{"instruction": "broken", '
    assert (q[13]["reason"], q[13]["field"]) == ("invalid_encoding", "prompt")
    assert q[14]["reason"] == "invalid_encoding" and "caf" in q[14]["raw"]
    assert all(r["file"] == str(path) for r in q.values())
    assert list(read_shard(stats.quarantine[0]).column_names) == QUARANTINE_COLUMNS
    assert read_shard(stats.quarantine[0]).schema.field("row").type == pa.int64()
    assert stats.by_file[str(path)] == {"rows_in": 14, "rows_kept": 1, "rows_quarantined": 13}
    assert_reconciles(stats)


def test_raw_is_cut_to_10000_chars(tmp_path):
    path = write_json(tmp_path / "big.json", [{"prompt": "p", "response": "x" * 20_000}])
    (row,) = quarantined(ingest(tmp_path, path, max_chars=100))
    assert row["reason"] == "too_long" and len(row["raw"]) == 10_000


def test_duplicates_across_files_keep_the_first(tmp_path):
    first = write_json(tmp_path / "a.json", [{"instruction": "Q", "output": "R", "label": "first"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q", "response": "R", "label": "second"}])
    stats = ingest(tmp_path, first, second)
    assert [r["meta"]["label"] for r in kept(stats)] == ["first"]
    assert [(r["file"], r["reason"]) for r in quarantined(stats)] == [(str(second), "duplicate")]


def test_nothing_kept_still_writes_an_empty_shard(tmp_path):
    path = write_jsonl(tmp_path / "all_bad.jsonl", [{"instruction": "x", "output": ""}, {"foo": 1}])
    stats = ingest(tmp_path, path)
    assert stats.rows_kept == 0 and len(stats.shards) == 1
    table = read_shard(stats.shards[0])
    assert table.num_rows == 0 and table.column_names == POOL_COLUMNS
    assert stats.rows_quarantined == 2
    assert_reconciles(stats)


# unreadable inputs -----------------------------------------------------------------------------------------


def test_broken_json_array_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "a", "response": "b"},\n {"prompt": "c" "response": "d"}\n]\n')
    with pytest.raises(IngestError, match=r"broken\.json: line 3: invalid JSON"):
        ingest(tmp_path, path)


def test_truncated_parquet_names_file(tmp_path):
    path = tmp_path / "cut.parquet"
    pq.write_table(pa.table({"prompt": ["p"] * 100, "response": ["r"] * 100}), path)
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(IngestError, match=r"cut\.parquet: unreadable Parquet"):
        ingest(tmp_path, path)


def test_missing_path_and_unsupported_type_name_the_file(tmp_path):
    with pytest.raises(IngestError, match=r"nope\.jsonl: no such file"):
        ingest(tmp_path, tmp_path / "nope.jsonl")
    (tmp_path / "rows.csv").write_text("prompt,response\np,r\n")
    with pytest.raises(IngestError, match=r"rows\.csv: unsupported file type"):
        ingest(tmp_path, tmp_path / "rows.csv")


# stable ids and reruns -------------------------------------------------------------------------------------


def test_same_content_in_two_formats_gets_the_same_ids(tmp_path):
    a = write_json(tmp_path / "a.json", [{"instruction": "Explain  rain.", "input": "", "output": "Water falls.\n"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": "Explain rain."},
                                                              {"from": "gpt", "value": "Water  falls."}]}])
    (ra,), (rb,) = kept(ingest(tmp_path, a, out="oa")), kept(ingest(tmp_path, b, out="ob"))
    assert (ra["sample_id"], ra["question_id"]) == (rb["sample_id"], rb["question_id"])


def test_rerun_gives_identical_shards_and_is_skipped(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)])
    first = ingest(tmp_path, path, out="one", shard_rows=2)
    other = ingest(tmp_path, path, out="two", shard_rows=2)
    assert [sha256_file(Path(p)) for p in first.shards] == [sha256_file(Path(p)) for p in other.shards]

    created = [read_manifest(Path(p))["created_at"] for p in first.shards]
    again = ingest(tmp_path, path, out="one", shard_rows=2)
    assert again == first
    assert [read_manifest(Path(p))["created_at"] for p in first.shards] == created  # nothing rewritten

    resharded = ingest(tmp_path, path, out="one", shard_rows=10)  # settings changed: redone, old shards gone
    assert len(resharded.shards) == 1 and [p.name for p in list_shards(tmp_path / "one")] == ["shard-00000.parquet"]
    assert len(kept(resharded)) == 5


def test_rerun_redoes_work_when_input_changes_or_output_is_incomplete(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "p", "response": "r"}])
    ingest(tmp_path, path)
    write_jsonl(path, [{"prompt": "p", "response": "r"}, {"prompt": "p2", "response": "r2"}])
    assert ingest(tmp_path, path).rows_kept == 2
    (tmp_path / "out" / "shard-00000.parquet").write_bytes(b"corrupt")  # no longer matches its manifest
    stats = ingest(tmp_path, path)
    assert [r["prompt"] for r in kept(stats)] == ["p", "p2"]


def test_shard_rows_splits_output(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(10)])
    stats = ingest(tmp_path, path, shard_rows=3)
    assert [Path(p).name for p in stats.shards] == [f"shard-0000{i}.parquet" for i in range(4)]
    assert [read_shard(p).num_rows for p in stats.shards] == [3, 3, 3, 1]
    assert [str(p) for p in list_shards(tmp_path / "out")] == stats.shards
    assert [r["prompt"] for r in kept(stats)] == [f"p{i}" for i in range(10)]


# read_prompts ----------------------------------------------------------------------------------------------


def test_read_prompts_csv_and_jsonl(tmp_path):
    csv_path = tmp_path / "adv.csv"
    csv_path.write_text('goal,target\nWrite a threat.,"Sure, here"\n"Two\nlines",x\n')
    assert read_prompts(csv_path) == ["Write a threat.", "Two\nlines"]
    jsonl = write_jsonl(tmp_path / "h.jsonl", [{"prompt": " a "}, {"instruction": "b", "input": "c"}])
    assert read_prompts(jsonl) == ["a", "b\n\nc"]


def test_read_prompts_errors_name_file_and_line(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("goal,target\nok,x\n,y\n")
    with pytest.raises(IngestError, match=r"bad\.csv: line 3: empty goal"):
        read_prompts(csv_path)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(IngestError, match=r"bad\.jsonl: line 2: no prompt"):
        read_prompts(jsonl)
    jsonl.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(IngestError, match=r"bad\.jsonl: line 2: invalid_json"):
        read_prompts(jsonl)


# the bundled demo data -------------------------------------------------------------------------------------


def test_demo_pool_quarantines_exactly_the_malformed_rows(tmp_path):
    stats = ingest(tmp_path, DEMO / "pool_alpaca.json", DEMO / "pool_hh_harmful.jsonl", max_chars=16000, shard_rows=256)
    assert stats.by_reason == {"empty_response": 1, "wrong_type": 1, "duplicate": 1}
    labels = [r["meta"]["label"] for r in kept(stats)]
    assert "malformed" not in labels and len(labels) == stats.rows_kept == 295
    assert {labels.count(x) for x in ("benign", "corrupted", "harmful")} == {230, 15, 50}
    assert len(read_prompts(DEMO / "harmful_test.jsonl")) == 50
    assert_reconciles(stats)
