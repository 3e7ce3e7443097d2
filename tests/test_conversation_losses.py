"""Every loss of a run sees a multi-turn row's conversation, as training does: scoring (loss, IFD, SPPL), BDS,
IterIT and evaluation, against a slow reference that renders the whole conversation by hand and sums the log-probs
of the scored tokens; `train.train_on: all` adds the earlier assistant turns.
`pytest tests/test_conversation_losses.py`"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from flows.config import BDSConfig, SourceConfig, TrainConfig
from storage.shards import list_shards, read_shard, write_shard
from tasks.bds import run_bds
from tasks.conversation import contexts_of
from tasks.evaluate import split_loss
from tasks.ingest import ingest_split
from tasks.models import ModelSpec, load_model
from tasks.score import compute_scores
from tasks.sppl import EXEMPLAR_INTRO, EXEMPLAR_OUTRO

SYSTEM = {"role": "system", "content": "Be brief."}
FRANCE = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]
SPAIN = [{"role": "user", "content": "Capital of Spain?"}, {"role": "assistant", "content": "Madrid, in the middle."}]
LAST = [{"role": "user", "content": "And Italy?"}, {"role": "assistant", "content": "Rome."}]
# one last exchange after two different histories, and alone
CONVERSATIONS = {"france": [SYSTEM, *FRANCE, *LAST], "spain": [SYSTEM, *SPAIN, *LAST], "alone": LAST}


def hand_rendered(turns: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """tests/tiny.py's ChatML written out by hand: the text, and the character range that the loss covers of each
    assistant turn. The last reply's ends with its <|im_end|> (the end of turn appended to every response); an
    earlier one's runs to where the next turn opens, the template's "\n" after <|im_end|> included, as
    tasks/conversation.assistant_spans (and tests/test_conversation.py) have it."""
    text, replies = "", []
    for turn in turns:
        text += f"<|im_start|>{turn['role']}\n"
        start = len(text)
        text += turn["content"] + "<|im_end|>\n"
        if turn["role"] == "assistant":
            replies.append((start, len(text)))
    replies[-1] = (replies[-1][0], len(text) - 1)  # the last reply: no "\n"
    return text, replies


def reference_loss(model, tokenizer, turns: list[dict], train_on: str) -> tuple[float, int]:
    """(mean NLL, tokens): the whole conversation tokenized at once, full logits in float64, and every token whose
    text starts inside a scored reply (the last one, or all with train_on "all") predicted from all before it."""
    text, replies = hand_rendered(turns)
    assert text == tokenizer.apply_chat_template(turns, tokenize=False)  # the hand rendering is the template's
    scored = replies if train_on == "all" else replies[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    positions = [t for t, (start, _) in enumerate(encoded["offset_mapping"]) if any(a <= start < b for a, b in scored)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(-logp[t - 1, ids[t]].item() for t in positions) / len(positions), len(positions)


def ingest_conversations(directory, names) -> list:
    """The named conversations as a real JSONL file in the `messages` format, ingested."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATIONS[n]}) + "\n" for n in names))
    ingest_split([SourceConfig(path=str(path), source="chat")], directory / "split", directory.name, 10000, 10)
    return list_shards(directory / "split")


def pool_rows(directory, names) -> tuple[list[str], list[str], list[str]]:
    """(questions, responses, contexts) of the named conversations, ingested from a real file."""
    table = read_shard(ingest_conversations(directory, names)[0])
    return table["prompt"].to_pylist(), table["response"].to_pylist(), contexts_of(table)


@pytest.mark.parametrize("train_on", ["last", "all"])
def test_scores_of_a_conversation_match_the_hand_rendered_reference(tiny_model_dir, tmp_path, train_on):
    names = ["france", "spain", "alone"]
    questions, responses, contexts = pool_rows(tmp_path, names)
    exemplars = ["Five.", "Waves and foam."]
    got = compute_scores(ModelSpec(str(tiny_model_dir), "fp32", None, 256), questions, responses=responses,
                         metrics=["loss", "ifd", "sppl"], batch_tokens=64, exemplars=exemplars, sppl_k=1,
                         contexts=contexts, train_on=train_on)
    model, tokenizer = load_model(str(tiny_model_dir))
    for i, name in enumerate(names):
        turns = CONVERSATIONS[name]
        loss, n_tokens = reference_loss(model, tokenizer, turns, train_on)
        # IFD's unconditioned score drops the question only: the earlier turns stay
        alone, _ = reference_loss(model, tokenizer, [*turns[:-2], {"role": "user", "content": ""}, turns[-1]],
                                  train_on)
        shown = f"Example 1:\n{exemplars[(i + 1) % 2]}"
        primed_question = f"{turns[-2]['content']}\n\n{EXEMPLAR_INTRO}\n\n{shown}\n\n{EXEMPLAR_OUTRO}"
        primed, _ = reference_loss(model, tokenizer, [*turns[:-2], {"role": "user", "content": primed_question},
                                                      turns[-1]], train_on)
        assert got["n_tokens"][i] == n_tokens
        assert got["loss"][i] == pytest.approx(loss, abs=1e-5)
        assert got["ifd"][i] == pytest.approx(loss / alone, abs=1e-5)
        assert got["sppl"][i] == pytest.approx(np.exp(primed), rel=1e-5)
    assert len(set(got["loss"].tolist())) == 3  # the same last exchange scores differently after each history


def test_train_on_all_adds_the_earlier_replies_tokens_and_single_exchanges_score_as_without_contexts(
        tiny_model_dir, tmp_path):
    questions, responses, contexts = pool_rows(tmp_path, ["france", "spain", "alone"])
    model = ModelSpec(str(tiny_model_dir), "fp32", None, 256)
    args = dict(metrics=["loss", "ifd"], batch_tokens=64)
    last = compute_scores(model, questions, responses=responses, **args, contexts=contexts, train_on="last")
    every = compute_scores(model, questions, responses=responses, **args, contexts=contexts, train_on="all")
    _, tokenizer = load_model(str(tiny_model_dir))
    for i, reply in enumerate(["Paris.", "Madrid, in the middle."]):
        # the earlier reply, its <|im_end|> and the template's "\n" after it
        assert every["n_tokens"][i] - last["n_tokens"][i] == len(tokenizer(reply)["input_ids"]) + 2
        assert every["loss"][i] != last["loss"][i]
    plain = compute_scores(model, questions[2:], responses=responses[2:], **args)
    for metric in ("loss", "ifd", "n_tokens"):  # no history: bit for bit what a call without contexts gives
        assert every[metric][2:].tobytes() == last[metric][2:].tobytes() == plain[metric].tobytes()


@pytest.mark.parametrize("train_on", ["last", "all"])
def test_the_evaluation_loss_sees_the_history(tiny_model_dir, tmp_path, train_on):
    model, tokenizer = load_model(str(tiny_model_dir))
    losses = {}
    for name in CONVERSATIONS:
        shards = ingest_conversations(tmp_path / name, [name])
        losses[name] = split_loss(shards, ModelSpec(str(tiny_model_dir), "fp32", None, 256), batch_tokens=512,
                                  train_on=train_on)
        expected, _ = reference_loss(model, tokenizer, CONVERSATIONS[name], train_on)
        assert losses[name] == pytest.approx(expected, abs=1e-5)
    assert len(set(losses.values())) == 3


@pytest.mark.parametrize("train_on", ["last", "all"])
def test_bds_pool_losses_see_the_history(tiny_model_dir, tmp_path, train_on):
    """With a zero step size theta stays the base model, so the epoch's per-sample losses are the base model's."""
    names = list(CONVERSATIONS)
    pool = ingest_conversations(tmp_path / "pool", names)
    validation = ingest_conversations(tmp_path / "validation", ["spain"])
    bds = BDSConfig(epochs=1, learning_rate=0.0, value_function=False, warmup_epochs=0,
                    autocast=False, batch_size=2)
    run_bds(pool, validation, out_dir=tmp_path / "bds", weights_path=tmp_path / "weights.parquet",
            model=ModelSpec(str(tiny_model_dir), "fp32", None, 256), bds=bds, lora=TrainConfig(), budget=0.5, seed=0,
            train_on=train_on)
    epoch = read_shard(tmp_path / "bds" / "epoch-001.parquet")
    model, tokenizer = load_model(str(tiny_model_dir))
    histories = [json.loads(m).get("history") for m in read_shard(pool[0])["meta"].to_pylist()]
    assert histories == [FRANCE, SPAIN, None]  # pool order: france, spain, alone
    for i, name in enumerate(names):
        expected, _ = reference_loss(model, tokenizer, CONVERSATIONS[name], train_on)
        assert epoch["epoch_loss"][i].as_py() == pytest.approx(expected, abs=1e-5)
    assert len(set(epoch["epoch_loss"].to_pylist())) == 3


def test_bds_validation_pairs_render_the_history(tiny_model_dir, tmp_path):
    from tasks.bds import _validation_pairs

    _, tokenizer = load_model(str(tiny_model_dir))
    validation = ingest_conversations(tmp_path / "validation", ["france"])
    (last,) = _validation_pairs(validation, tokenizer, 256, 0)
    (every,) = _validation_pairs(validation, tokenizer, 256, 0, "all")
    text, replies = hand_rendered(CONVERSATIONS["france"])
    assert tokenizer.decode(last.prompt_ids + last.response_ids) == text.removesuffix("\n")
    assert last.context_spans == [] and len(every.context_spans) == 1
    start, end = every.context_spans[0]
    assert tokenizer.decode(every.prompt_ids[start:end]) == text[replies[0][0]: replies[0][1]] == "Paris.<|im_end|>\n"


def test_iterit_rescores_and_trains_its_live_model_on_the_conversations(tiny_model_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    import tasks.iterit
    from tasks.iterit import select_iterit

    # four rows: both conversations with history, each with a second last reply so that the ids differ
    table = read_shard(ingest_conversations(tmp_path / "pool", ["france", "spain"])[0])
    other = table.set_column(table.schema.get_field_index("response"), "response",
                             pa.array(["Rome, on the Tiber."] * 2))
    table = pa.concat_tables([table, other])
    table = table.set_column(table.schema.get_field_index("sample_id"), "sample_id", pa.array(["a", "b", "c", "d"]))
    write_shard(table, tmp_path / "pool.parquet")
    write_shard(pa.table({"sample_id": table["sample_id"], "metric": ["iterit"] * 4,
                          "value": pa.array([0.3, 0.4, 0.5, 0.6], pa.float32())}), tmp_path / "scores.parquet")
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs)
        return compute_scores(*args, **kwargs)

    monkeypatch.setattr(tasks.iterit, "compute_scores", recording)
    train = SimpleNamespace(learning_rate=1e-2, batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                            target_modules=["q_proj", "v_proj"], max_grad_norm=1.0)
    iterit = SimpleNamespace(epochs=2, decay=0.1, window=3)
    select_iterit([tmp_path / "pool.parquet"], [tmp_path / "scores.parquet"], out_dir=tmp_path / "iterit",
                  weights_path=tmp_path / "weights.parquet", model=ModelSpec(str(tiny_model_dir), "fp32", None, 256),
                  iterit=iterit, train=train, budget=0.5, batch_tokens=4096, end_of_turn="<|im_end|>", seed=0,
                  train_on="all")
    contexts = contexts_of(table)
    assert all(contexts) and contexts[0] != contexts[1]
    (rescored,) = seen  # round 2 re-scores its window (3 x k=2: the whole pool) with the live model
    assert rescored["train_on"] == "all" and sorted(rescored["contexts"]) == sorted(contexts)
    live_set = read_shard(tmp_path / "iterit" / "train-001.parquet").to_pylist()
    context_of_pair = {(r["prompt"], r["response"]): c for r, c in zip(table.to_pylist(), contexts)}
    assert len(live_set) == 2 and all(r["context"] == context_of_pair[r["prompt"], r["response"]] for r in live_set)


def test_the_davir_reference_trains_on_the_conversations(tmp_path):
    from tasks.train import build_uniform_set

    validation = ingest_conversations(tmp_path / "validation", ["france", "alone"])
    build_uniform_set(validation, tmp_path / "reference.parquet")
    reference = read_shard(tmp_path / "reference.parquet")
    assert reference["context"].to_pylist() == contexts_of(read_shard(validation[0]))
    assert json.loads(reference["context"][0].as_py()) == [SYSTEM, *FRANCE] and reference["context"][1].as_py() == ""


@pytest.mark.slow
def test_the_flow_passes_train_on_to_scoring_and_evaluation(prefect_harness, tiny_model_dir, tmp_path):
    """train.train_on is the run's one setting: the flow's scores and evaluations are those of train_on all."""
    import yaml

    from flows.curate import curate
    from storage.inputs import recorded_inputs

    names = ["france", "spain", "alone"]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": CONVERSATIONS[n]}) + "\n" for n in names))
    config = {"run_id": "turns", "root": str(tmp_path / "root"), "model": {"name": str(tiny_model_dir),
                                                                           "max_seq_len": 128},
              "data": {"pool": "chat.jsonl", "validation": "chat.jsonl"}, "generate": {"enabled": False},
              "select": {"method": "topk", "budget": 0.5}, "train": {"train_on": "all"}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    summary = curate(config_path=str(tmp_path / "config.yaml"))
    run = tmp_path / "root" / "runs" / "turns"
    (pool,) = list_shards(run / "pool")
    (scores,) = list_shards(run / "iter-001" / "scores")
    assert recorded_inputs(scores)["settings"]["train_on"] == "all"
    questions, responses = read_shard(pool)["prompt"].to_pylist(), read_shard(pool)["response"].to_pylist()
    expected = compute_scores(ModelSpec(str(tiny_model_dir), "fp32", None, 128), questions, responses=responses,
                              metrics=["loss"], batch_tokens=4096, contexts=contexts_of(read_shard(pool)),
                              train_on="all")["loss"]
    got = read_shard(scores).to_pylist()
    assert [r["value"] for r in got if r["metric"] == "loss"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert recorded_inputs(run / "iter-000" / "evaluation.parquet")["settings"]["train_on"] == "all"
    assert summary["validation_loss_before"] == pytest.approx(
        split_loss([pool], ModelSpec(str(tiny_model_dir), "fp32", None, 128), batch_tokens=4096, train_on="all"),
        abs=1e-6)
