"""Row formats from other projects: a per-source `format` mapping (axolotl's names), TRL's prompt-completion
(strings and turn lists), role/content turns under `conversations`; bad rows are quarantined naming the field.

    python -m pytest tests/test_row_formats.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.config import ConfigError, parse_config
from storage.shards import read_shard
from tasks.ingest import ingest_split


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ingest_with(tmp_path: Path, source: dict):
    """Ingest one source given as it would be in a config file, validated by the config loader."""
    cfg = parse_config({"run_id": "r", "data": {"pool": [source], "validation": source["path"]}}, tmp_path)
    return ingest_split(cfg.data.pool, tmp_path / "out", "pool", max_chars=1000, shard_rows=100)


def kept(stats) -> list[dict]:
    rows = [r for path in stats.shards for r in read_shard(path).to_pylist()]
    return [{**r, "meta": json.loads(r["meta"])} for r in rows]


def quarantined(stats) -> dict[int, dict]:
    return {r["row"]: r for path in stats.quarantine for r in read_shard(path).to_pylist()}


def turn(who: str, said: str, role_key: str = "from", text_key: str = "value") -> dict:
    return {role_key: who, text_key: said}


def test_scalebio_items_with_a_format_mapping(tmp_path):
    path = write_jsonl(tmp_path / "scalebio.jsonl", [
        {"id": "a", "items": [turn("human", "Name a fruit."), turn("gpt", "Apple.")]},
        {"id": "b", "items": [turn("system", "Be brief."), turn("human", "Sky colour?"), turn("gpt", "Blue."),
                              turn("human", "And at night?"), turn("gpt", "Black.")]},   # multi-turn: no crash
        {"id": "c", "items": [turn("human", "Only a question.")]},                       # 3: no assistant turn
        {"id": "d", "items": [turn("human", "Q"), {"from": "gpt", "value": 7}]},         # 4: wrong type
        {"id": "e", "turns": []},                                                        # 5: no items at all
    ])
    source = {"path": str(path), "source": "scalebio",
              "format": {"type": "chat", "field_messages": "items", "role": "from", "content": "value",
                         "roles": {"user": ["human"], "assistant": ["gpt"]}}}
    stats = ingest_with(tmp_path, source)
    rows = kept(stats)
    assert [(r["prompt"], r["response"], r["source"]) for r in rows] == [
        ("Name a fruit.", "Apple.", "scalebio"), ("And at night?", "Black.", "scalebio")]  # the last exchange
    assert rows[1]["meta"]["system"] == "Be brief." and rows[1]["meta"]["extra_turns"] == 2
    assert rows[1]["meta"]["history"] == [{"role": "user", "content": "Sky colour?"},
                                          {"role": "assistant", "content": "Blue."}]
    q = quarantined(stats)
    assert {row: (r["reason"], r["field"]) for row, r in q.items()} == {
        3: ("missing_field", "items.assistant"), 4: ("wrong_type", "items[1].value"), 5: ("missing_field", "items")}
    assert all(r["file"] == str(path) for r in q.values())
    # without the mapping the same file is unusable: every row is unknown_format
    assert ingest_with(tmp_path, {"path": str(path)}).by_reason == {"unknown_format": 5}


def test_roles_named_otherwise_are_mapped(tmp_path):
    path = write_jsonl(tmp_path / "oasst.jsonl", [
        {"dialog": [{"speaker": "Prompter", "text": "Hi?"}, {"speaker": "bot", "text": "Hello."}]}])
    source = {"path": str(path), "format": {"type": "chat", "field_messages": "dialog", "role": "speaker",
                                            "content": "text", "roles": {"user": ["prompter"], "assistant": ["bot"]}}}
    (row,) = kept(ingest_with(tmp_path, source))
    assert (row["prompt"], row["response"]) == ("Hi?", "Hello.")


def test_trl_prompt_completion_strings_and_turn_lists_are_detected(tmp_path):
    path = write_jsonl(tmp_path / "trl.jsonl", [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [{"role": "system", "content": "Terse."}, {"role": "user", "content": "3+3?"}],
         "completion": [{"role": "assistant", "content": "6"}]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "Bye"}], "completion": [{"role": "assistant", "content": "Ciao"}]},
        {"prompt": "a string", "completion": [{"role": "assistant", "content": "a list"}]},   # 4: mixed forms
        {"prompt": [{"role": "user", "content": "Q"}], "completion": []},                     # 5: no answer
        {"prompt": "Q", "completion": 5},                                                     # 6: wrong type
    ])
    stats = ingest_with(tmp_path, {"path": str(path)})
    rows = kept(stats)
    assert [(r["prompt"], r["response"]) for r in rows] == [("2+2?", "4"), ("3+3?", "6"), ("Bye", "Ciao")]
    assert rows[1]["meta"]["system"] == "Terse." and rows[2]["meta"]["extra_turns"] == 2
    assert rows[2]["meta"]["history"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]
    q = quarantined(stats)
    assert {row: (r["reason"], r["field"]) for row, r in q.items()} == {
        4: ("wrong_type", "prompt"), 5: ("missing_field", "completion.assistant"), 6: ("wrong_type", "completion")}


def test_trl_conversational_prompt_completion_in_parquet(tmp_path):
    path = tmp_path / "trl.parquet"
    pq.write_table(pa.table({
        "prompt": [[{"role": "user", "content": "Capital of France?"}]],
        "completion": [[{"role": "assistant", "content": "Paris."}]]}), path)
    (row,) = kept(ingest_with(tmp_path, {"path": str(path), "format": {"type": "prompt_completion"}}))
    assert (row["prompt"], row["response"]) == ("Capital of France?", "Paris.")


def test_role_content_turns_under_conversations(tmp_path):
    path = write_jsonl(tmp_path / "rc.jsonl", [
        {"conversations": [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]},
        {"conversations": [{"role": "user", "content": "Only me."}]},
        {"messages": [turn("human", "Hi?"), turn("gpt", "Hello.")]},       # and ShareGPT turns under messages
    ])
    stats = ingest_with(tmp_path, {"path": str(path)})
    assert [(r["prompt"], r["response"]) for r in kept(stats)] == [("Why?", "Because."), ("Hi?", "Hello.")]
    assert quarantined(stats)[2]["field"] == "conversations.assistant"


def test_mapped_alpaca_and_prompt_completion_fields(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"task": "Add.", "context": "1 and 2", "answer": "3"},
                                                     {"task": "No answer."}])
    source = {"path": str(alpaca), "format": {"type": "alpaca", "field_instruction": "task",
                                              "field_input": "context", "field_output": "answer"}}
    stats = ingest_with(tmp_path, source)
    assert [(r["prompt"], r["response"]) for r in kept(stats)] == [("Add.\n\n1 and 2", "3")]
    assert (quarantined(stats)[2]["reason"], quarantined(stats)[2]["field"]) == ("missing_field", "answer")
    columns = write_jsonl(tmp_path / "pc.jsonl", [{"q": "Why?", "a": "So."}])
    source = {"path": str(columns), "format": {"type": "prompt_completion", "field_prompt": "q", "field_completion": "a"}}
    assert [(r["prompt"], r["response"]) for r in kept(ingest_with(tmp_path, source))] == [("Why?", "So.")]


def test_a_changed_format_reingests(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"items": [turn("human", "Q"), turn("gpt", "A")]}])
    assert ingest_with(tmp_path, {"path": str(path)}).by_reason == {"unknown_format": 1}
    mapped = {"path": str(path), "format": {"type": "chat", "field_messages": "items", "role": "from", "content": "value"}}
    assert ingest_with(tmp_path, mapped).rows_kept == 1


@pytest.mark.parametrize("fmt, message", [
    ({"field_messages": "items"}, "data.pool[0].format.type: required field is missing"),
    ({"type": "sharegpt"}, "data.pool[0].format.type: must be one of chat, alpaca, prompt_completion"),
    ({"type": "chat", "field_mesages": "items"}, "data.pool[0].format.field_mesages: unknown field; did you mean "
                                                 "'field_messages'?"),
    ({"type": "chat", "roles": {"bot": ["gpt"]}}, "data.pool[0].format.roles: keys must be user, assistant, system"),
    ({"type": "chat", "roles": {"user": "human"}}, "data.pool[0].format.roles.user: expected a list"),
])
def test_format_errors_name_the_field(fmt, message):
    with pytest.raises(ConfigError) as info:
        parse_config({"run_id": "r", "data": {"pool": [{"path": "p.jsonl", "format": fmt}], "validation": "v"}})
    assert message in str(info.value)
