"""Online generation strategies (a system prompt, pi_V as the generator) and what the catalog keeps of each
regenerated response. `pytest tests/test_online_strategies.py`"""
from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest

from storage.shards import read_shard, write_shard
from storage.views import create_parquet_views
from tasks.coverage import generation_summary
from tasks.generate import SamplingParams, adapter_in_run, generate_shard, plan_refinement, prompt_ids, sample_responses
from tasks.models import ModelSpec, load_model, load_tokenizer
from tasks.reweight import reweight_shard
from tasks.strategy import Strategy, choose_strategy, generator_spec, strategy_sppl, validation_loss
from tasks.train import train_lora

SAFETY = "You refuse harmful requests."
QUESTION = "What is the capital of France?"
LORA = dict(batch_size=4, lora_r=4, lora_alpha=8, lora_dropout=0.0, max_grad_norm=1.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def _refine_shard(path, questions):
    write_shard(pa.table({"question_id": [f"q{i}" for i in range(len(questions))], "prompt": questions,
                          "source": ["s"] * len(questions), "offline_dropped": [True, False][: len(questions)]}), path)
    return path


def test_a_system_prompt_is_rendered_by_the_chat_template_before_the_question(tiny_model_dir):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    plain, system = (tokenizer.decode(prompt_ids(tokenizer, [QUESTION], system=s)[0]) for s in ("", SAFETY))
    assert SAFETY not in plain and SAFETY in system
    assert system.index(SAFETY) < system.index(QUESTION) and system.endswith(plain[plain.index(QUESTION):])


def test_the_bmo_ratio_of_a_system_prompted_strategy_scores_pi_gen_on_the_prompt_it_generated_from(
        tmp_path, tiny_model_dir):
    """pi_gen's log-prob in the weights is the generation's own logp_gen (system prompt included); pi_V, the
    same model here, sees the plain question, so the ratio is no longer 1; without the system prompt it is."""
    refine = _refine_shard(tmp_path / "refine.parquet", [QUESTION, "Add 2 and 3."])
    model = ModelSpec(str(tiny_model_dir), "fp32", None, 128)
    params = SamplingParams(2, 1.0, 1.0, 10, 2)
    generate_shard(refine, tmp_path / "gen.parquet", model=model, params=params, batch_tokens=4096, seed=1,
                   iteration=1, system=SAFETY, strategy="safety")
    generated = read_shard(tmp_path / "gen.parquet").to_pydict()
    assert set(generated["strategy"]) == {"safety"}
    assert generated["replaced_dropped"] == [True, True, False, False]  # copied from the plan, per question
    reweight_shard(tmp_path / "gen.parquet", tmp_path / "w.parquet", method="sequence", generator=model,
                   system=SAFETY)
    weights = read_shard(tmp_path / "w.parquet").to_pydict()
    assert weights["logp_generator"] == pytest.approx(generated["logp_gen"], rel=1e-4)
    assert weights["logp_aligned"] != pytest.approx(weights["logp_generator"], rel=1e-3)
    reweight_shard(tmp_path / "gen.parquet", tmp_path / "w0.parquet", method="sequence", generator=model)
    plain = read_shard(tmp_path / "w0.parquet").to_pydict()
    assert [r for r, t in zip(plain["ratio"], generated["response"]) if t] == pytest.approx(
        [1.0] * sum(map(bool, generated["response"])), abs=1e-5)


def test_generator_spec_names_the_model_each_strategy_generates_with():
    model = ModelSpec("base", "fp32", "runs/r/iter-001/adapter", 128)
    assert generator_spec(Strategy("self"), model, "pi_v") == model
    assert generator_spec(Strategy("aligned", generator="aligned"), model, "pi_v") == model.with_adapter("pi_v")
    other = generator_spec(Strategy("other", model="other-model"), model, "pi_v")
    assert (other.name, other.adapter, other.max_seq_len) == ("other-model", None, 128)
    with pytest.raises(ValueError, match="'aligned'.*needs a validation-aligned adapter"):
        generator_spec(Strategy("aligned", generator="aligned"), model, None)


def test_an_aligned_strategy_answers_with_pi_v(tmp_path, tiny_model_dir):
    """Its answers are pi_V's samples (base + the aligned adapter), not the current model's."""
    model = ModelSpec(str(tiny_model_dir), "fp32", None, 128)
    write_shard(pa.table({"prompt": [QUESTION] * 4, "response": ["Paris is the capital."] * 4,
                          "weight": [1.0] * 4}), tmp_path / "val.parquet")
    train_lora(tmp_path / "val.parquet", tmp_path / "aligned", model=model, epochs=10, learning_rate=1e-2, seed=0,
               **LORA)
    questions = [QUESTION, "Name a color."]
    strategy = Strategy("aligned", temperature=0.0, generator="aligned")
    _, answers = strategy_sppl(strategy, questions, model=model, exemplars=["Paris."], k=1, max_new_tokens=8,
                               batch_tokens=1024, seed=0, aligned_adapter=str(tmp_path / "aligned"))
    params = SamplingParams(1, 0.0, 1.0, 8, 8)
    for adapter, same in ((str(tmp_path / "aligned"), True), (None, False)):
        generator, tokenizer = load_model(str(tiny_model_dir), "fp32", adapter)
        direct = [g[0] for g in sample_responses(generator, tokenizer, questions, params, 0)]
        assert (direct == answers) is same


def test_plan_marks_questions_whose_offline_responses_were_all_dropped(tmp_path):
    pool = pa.table({"sample_id": ["a1", "a2", "b1"], "question_id": ["a", "a", "b"], "prompt": ["A?", "A?", "B?"],
                     "source": ["s"] * 3})
    write_shard(pool, tmp_path / "pool.parquet")
    # a keeps one of its two responses; b lost its only one
    write_shard(pa.table({"sample_id": ["a1", "a2", "b1"], "question_id": ["a", "a", "b"], "weight": [0.0, 0.7, 0.0],
                          "rank": [3, 1, 2]}), tmp_path / "w.parquet")
    (shard,) = plan_refinement([tmp_path / "pool.parquet"], tmp_path / "w.parquet", tmp_path / "refine", "fixed",
                               1.0, 10, 0)
    plan = read_shard(shard).to_pydict()
    assert dict(zip(plan["question_id"], plan["offline_dropped"])) == {"a": False, "b": True}


def test_generation_summary_counts_refusals_and_the_kish_ess(tmp_path):
    write_shard(pa.table({"response": ["I'm sorry, I can't help with that.", "Sure, here is how.", "Paris.",
                                       "I cannot assist with that."]}), tmp_path / "g.parquet")
    write_shard(pa.table({"weight": [2.0, 0.0, 1.0, 1.0]}), tmp_path / "w.parquet")
    summary = generation_summary([tmp_path / "g.parquet"], [tmp_path / "w.parquet"])
    assert summary["regenerated_refusal_share"] == 0.5
    assert summary["bmo_ess"] == pytest.approx(16 / 6) and summary["bmo_ess_fraction"] == pytest.approx(16 / 24)
    assert generation_summary([], []) == {}


def test_regenerated_view_reads_null_strategy_from_shards_written_before_the_column(tmp_path):
    root = tmp_path / "root"
    old = pa.table({"question_id": ["q"], "response_id": ["r"], "prompt": ["P"], "response": ["R"],
                    "generator": ["g"], "iteration": [1]})
    write_shard(old, root / "runs" / "r1" / "iter-001" / "generations" / "shard-00000.parquet")
    write_shard(pa.table({"response_id": ["r"], "question_id": ["q"], "weight": [1.0], "ratio": [1.0],
                          "method": ["sequence"], "reason": [""]}),
                root / "runs" / "r1" / "iter-001" / "generation_weights" / "shard-00000.parquet")
    con = duckdb.connect()
    con.execute("create table iterations (run_id varchar, iteration int, adapter_path varchar)")
    assert "regenerated" in create_parquet_views(con, root)
    assert con.execute("select strategy, replaced_dropped, weight from regenerated").fetchall() == [(None, None, 1.0)]


def test_strategies_view_names_each_comparisons_run_and_iteration(tmp_path):
    table = pa.table({"strategy": ["current", "system_prompt"], "generator": ["current", "current"],
                      "system_prompt": [False, True], "mean_sppl": [9.5, 9.8], "chosen": [True, False]})
    write_shard(table, tmp_path / "runs" / "r1" / "iter-002" / "strategy.parquet")
    con = duckdb.connect()
    assert "strategies" in create_parquet_views(con, tmp_path)
    assert con.execute("select run_id, iteration, strategy from strategies where chosen").fetchall() == [
        ("r1", 2, "current")]


def test_choose_by_validation_loss_picks_the_strategy_whose_answers_pi_v_endorses(tmp_path, tiny_model_dir):
    """pi_V has learned one answer; the current (untrained) model's samples are noise to it, pi_V's own greedy
    answers are what it expects: by pi_V's loss `aligned` wins, and each row's loss is pi_V's on those answers."""
    model = ModelSpec(str(tiny_model_dir), "fp32", None, 128)
    write_shard(pa.table({"prompt": [QUESTION] * 4, "response": ["Paris is the capital."] * 4,
                          "weight": [1.0] * 4}), tmp_path / "val.parquet")
    train_lora(tmp_path / "val.parquet", tmp_path / "aligned", model=model, epochs=10, learning_rate=1e-2, seed=0,
               **LORA)
    write_shard(pa.table({"response": ["Paris."]}), tmp_path / "exemplars.parquet")
    strategies = [Strategy("current", temperature=1.0), Strategy("aligned", temperature=0.0, generator="aligned")]
    questions = [QUESTION] * 3
    chosen = choose_strategy(strategies, questions, out_path=tmp_path / "strategy.parquet", model=model,
                             exemplars_path=tmp_path / "exemplars.parquet", k=1, max_new_tokens=8,
                             batch_tokens=1024, seed=0, aligned_adapter=str(tmp_path / "aligned"),
                             choose_by="validation_loss")
    table = {r["strategy"]: r for r in read_shard(tmp_path / "strategy.parquet").to_pylist()}
    assert chosen.name == "aligned" and table["aligned"]["chosen"] and not table["current"]["chosen"]
    assert table["aligned"]["mean_validation_loss"] < table["current"]["mean_validation_loss"]
    _, answers = strategy_sppl(strategies[1], questions, model=model, exemplars=["Paris."], k=1, max_new_tokens=8,
                               batch_tokens=1024, seed=0, aligned_adapter=str(tmp_path / "aligned"))
    expected = validation_loss(questions, answers, model=model, aligned_adapter=str(tmp_path / "aligned"),
                               batch_tokens=1024)
    assert table["aligned"]["mean_validation_loss"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_choose_by_validation_loss_without_pi_v_fails_fast(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="'validation_loss' scores the answers under pi_V"):
        choose_strategy([Strategy("current")], [QUESTION], out_path=tmp_path / "s.parquet",
                        model=ModelSpec(str(tiny_model_dir), "fp32", None, 128), exemplars_path=tmp_path / "e.parquet",
                        k=1, max_new_tokens=4, batch_tokens=1024, seed=0, choose_by="validation_loss")


def test_regenerated_names_the_adapter_that_wrote_each_response(tmp_path):
    """pi_V's path for an aligned strategy, NULL for none (''), and for shards written before the column the
    previous iteration's adapter, which wrote every response then."""
    root, rows = tmp_path / "root", []
    for run, adapter in (("aligned", "/a/pi_v"), ("in_run", "reference/adapter"), ("own_model", ""), ("old", None)):
        gen = {"question_id": ["q"], "response_id": [f"r-{run}"], "prompt": ["P"], "response": ["R"],
               "generator": ["g"], "iteration": [2]}
        if adapter is not None:
            gen["generator_adapter"] = [adapter]
        write_shard(pa.table(gen), root / "runs" / run / "iter-002" / "generations" / "shard-00000.parquet")
        write_shard(pa.table({"response_id": [f"r-{run}"], "weight": [1.0], "ratio": [1.0], "method": ["sequence"],
                              "reason": [""]}), root / "runs" / run / "iter-002" / "generation_weights" / "shard-00000.parquet")
        rows.append((run, 1, f"/runs/{run}/iter-001/adapter"))
    con = duckdb.connect()
    con.execute("create table iterations (run_id varchar, iteration int, adapter_path varchar)")
    con.executemany("insert into iterations values (?, ?, ?)", rows)
    create_parquet_views(con, root)
    got = dict(con.execute("select run_id, generated_by_adapter from regenerated").fetchall())
    assert got == {"aligned": "/a/pi_v", "in_run": str(root / "runs" / "in_run" / "reference" / "adapter"),
                   "own_model": None, "old": "/runs/old/iter-001/adapter"}


def test_generate_shard_records_the_generators_adapter(tmp_path, tiny_model_dir):
    refine = _refine_shard(tmp_path / "refine.parquet", [QUESTION])
    params = SamplingParams(1, 0.0, 1.0, 4, 8)
    generate_shard(refine, tmp_path / "base.parquet", model=ModelSpec(str(tiny_model_dir), "fp32", None, 128),
                   params=params, batch_tokens=1024, seed=0, iteration=1)
    assert read_shard(tmp_path / "base.parquet")["generator_adapter"].to_pylist() == [""]


def test_adapter_in_run_is_relative_to_its_run_directory(tmp_path):
    """so that a run's outputs hash the same wherever its root is (the resume test compares two roots)"""
    out = tmp_path / "runs" / "r" / "iter-002" / "generations" / "shard-00000.parquet"
    assert adapter_in_run(str(tmp_path / "runs" / "r" / "iter-001" / "adapter"), out) == "iter-001/adapter"
    assert adapter_in_run(str(tmp_path / "elsewhere"), out) == str(tmp_path / "elsewhere")
    assert adapter_in_run(None, out) == ""
