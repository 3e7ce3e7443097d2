"""Multi-turn rows: the whole conversation is kept (system, earlier exchanges), rendered before the prompt, and
`train.train_on: all` puts the loss on every assistant turn (the other losses: tests/test_conversation_losses.py).
`pytest tests/test_conversation.py`"""
from __future__ import annotations

import json

from flows.config import SourceConfig
from storage.shards import list_shards, read_shard
from tasks.ingest import ingest_split, make_id
from tasks.models import load_tokenizer
from tasks.tokens import collate, encode_pairs
from tasks.train import build_train_set, write_shard

DIALOGUE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
            {"role": "assistant", "content": "Rome."}]


def ingest_rows(tmp_path, rows):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest_split([SourceConfig(path=str(path), source="chat")], tmp_path / "pool", "pool", 10000, 10)
    return list_shards(tmp_path / "pool")


def test_a_conversation_is_scored_at_its_last_turn_with_everything_before_it_kept(tmp_path):
    shards = ingest_rows(tmp_path, [{"messages": DIALOGUE}, {"messages": DIALOGUE[3:]}])
    long, short = read_shard(shards[0]).to_pylist()
    assert (long["prompt"], long["response"]) == ("And Italy?", "Rome.")
    meta = json.loads(long["meta"])
    assert meta["system"] == "Be brief." and meta["history"] == DIALOGUE[1:3] and meta["extra_turns"] == 2
    # the same last question after another conversation is another question; a single exchange keeps its ids
    assert long["question_id"] == make_id("Be brief.", "Capital of France?", "Paris.", "And Italy?")
    assert (short["question_id"], short["sample_id"]) == (make_id("And Italy?"), make_id("And Italy?", "Rome."))
    assert "history" not in json.loads(short["meta"])


def test_the_same_last_question_after_other_turns_gets_another_question_id(tmp_path):
    """ShareGPT turns in a real file: the question id covers the conversation up to the scored turn."""
    sharegpt = {"system": "system", "user": "human", "assistant": "gpt"}
    spain = [DIALOGUE[0], {"role": "user", "content": "Capital of Spain?"},
             {"role": "assistant", "content": "Madrid."}, *DIALOGUE[3:]]
    no_system = DIALOGUE[1:]
    rows = [{"conversations": [{"from": sharegpt[t["role"]], "value": t["content"]} for t in turns]}
            for turns in (DIALOGUE, spain, no_system, DIALOGUE[3:])]
    path = tmp_path / "sharegpt.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest_split([SourceConfig(path=str(path), source="chat")], tmp_path / "pool", "pool", 10000, 10)
    france, madrid, unprompted, alone = read_shard(list_shards(tmp_path / "pool")[0]).to_pylist()
    assert {(r["prompt"], r["response"]) for r in (france, madrid, unprompted, alone)} == {("And Italy?", "Rome.")}
    assert len({r["question_id"] for r in (france, madrid, unprompted, alone)}) == 4
    assert france["question_id"] == make_id("Be brief.", "Capital of France?", "Paris.", "And Italy?")
    assert madrid["question_id"] == make_id("Be brief.", "Capital of Spain?", "Madrid.", "And Italy?")
    assert unprompted["question_id"] == make_id("Capital of France?", "Paris.", "And Italy?")
    assert alone["question_id"] == make_id("And Italy?")  # a single exchange keeps the id it always had


def test_the_training_set_renders_the_conversation_and_train_on_all_masks_every_assistant_turn(
        tiny_model_dir, tmp_path):
    import pyarrow as pa

    shards = ingest_rows(tmp_path, [{"messages": DIALOGUE}])
    ids = read_shard(shards[0])["sample_id"].to_pylist()
    write_shard(pa.table({"sample_id": ids, "weight": [1.0], "selected": [True]}), tmp_path / "w.parquet")
    build_train_set(shards, tmp_path / "w.parquet", set(), [], [], [], tmp_path / "train.parquet")
    row = read_shard(tmp_path / "train.parquet").to_pylist()[0]
    assert json.loads(row["context"]) == DIALOGUE[:3]
    tokenizer = load_tokenizer(str(tiny_model_dir))
    args = ([row["prompt"]], [row["response"]], 256, [row["context"]])
    (last,), (every,) = encode_pairs(tokenizer, *args), encode_pairs(tokenizer, *args, train_on="all")
    full = tokenizer.apply_chat_template(DIALOGUE, tokenize=False)
    assert tokenizer.decode(last.prompt_ids + last.response_ids) == full.removesuffix("\n")  # ChatML's last "\n"

    def trained_text(e):
        input_ids, _, mask = collate([e], tokenizer.pad_token_id)
        return tokenizer.decode(input_ids[0][mask[0]])

    assert trained_text(last) == "Rome.<|im_end|>"
    assert trained_text(every) == "Paris.<|im_end|>\nRome.<|im_end|>"


def test_single_exchanges_encode_exactly_as_without_contexts(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    plain = encode_pairs(tokenizer, ["Hi?", "Add 2 and 3."], ["Hello.", "5."], 64)
    assert encode_pairs(tokenizer, ["Hi?", "Add 2 and 3."], ["Hello.", "5."], 64, ["", ""], "all") == plain
