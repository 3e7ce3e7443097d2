"""Shared fixtures. Run the suite with `make test` (or `.venv/bin/python -m pytest tests`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.tiny import build_model_dir, build_trained_model_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def trained_tiny_model_dir(tmp_path_factory):
    """A tiny model that already knows the chat format and the corpus' answers, as an instruct model would."""
    return build_trained_model_dir(tmp_path_factory.mktemp("trained-tiny-model"))


REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo"


def write_tiny_run(directory: Path, model_dir: Path, run_id: str = "tiny", iterations: int = 2,
                   root: Path | None = None, **sections) -> Path:
    """A small real run: 40 demo Alpaca rows (3 malformed among them) + 10 HH-RLHF rows, on the tiny model.
    Data and config go to `directory`, outputs to `root` (default directory/root)."""
    directory.mkdir(parents=True, exist_ok=True)
    alpaca = json.loads((DEMO / "pool_alpaca.json").read_text())
    picked = alpaca[:37] + [alpaca[40], alpaca[120], alpaca[200]]  # the three malformed demo rows
    (directory / "pool.json").write_text(json.dumps(picked))
    harmful = (DEMO / "pool_hh_harmful.jsonl").read_text().splitlines()[:10]
    (directory / "harmful.jsonl").write_text("\n".join(harmful) + "\n")
    config = {
        "run_id": run_id, "root": str(root or directory / "root"), "iterations": iterations, "seed": 3,
        "model": {"name": str(model_dir), "max_seq_len": 128},
        "data": {"pool": [{"path": "pool.json", "source": "alpaca"}, {"path": "harmful.jsonl", "source": "hh"}],
                 "validation": str(DEMO / "validation.jsonl"), "test": str(DEMO / "test.jsonl"), "shard_rows": 16,
                 "harmful_prompts": str(DEMO / "harmful_test.jsonl")},
        "evaluate": {"max_new_tokens": 8},
        "select": {"method": "topk", "budget": 0.75},
        "generate": {"fraction": 0.2, "num_responses": 2, "max_new_tokens": 8},
        "train": {"batch_size": 8},
    }
    for key, value in sections.items():  # e.g. score={...} replaces or extends a section
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    path = directory / f"config-{abs(hash(config['root'] + run_id)):x}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_curated_root(root: Path, run_id: str = "r1") -> Path:
    """A run's on-disk outputs and catalog rows without a model: a real ingest of 5 rows (1 malformed), one
    iteration's weights (one sample dropped, one weighted 2) and its train set, recorded as completed."""
    from flows.config import parse_config
    from storage.catalog import Catalog
    from storage.layout import RunPaths
    from storage.shards import list_shards, read_shard, write_shard
    from tasks.ingest import ingest_split
    from tasks.train import build_train_set
    import pyarrow as pa

    paths = RunPaths(root, run_id)
    data = root.parent / f"{root.name}-data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": f"Add 1 and {i}.", "output": str(i + 1)} for i in range(3)]
    (data / "alpaca.json").write_text(json.dumps(rows + [{"instruction": "No answer."}]))
    (data / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                                              {"role": "assistant", "content": "Hello."}]}) + "\n")
    cfg = parse_config({"run_id": run_id, "root": str(root), "data": {
        "pool": [{"path": "alpaca.json", "source": "alpaca"}, {"path": "chat.jsonl", "source": "chat"}],
        "validation": "chat.jsonl"}, "select": {"budget": 0.75}}, data)
    ingest_split(cfg.data.pool, paths.split_dir("pool"), "pool", max_chars=1000, shard_rows=2)
    pool = list_shards(paths.split_dir("pool"))
    ids = [s for p in pool for s in read_shard(p)["sample_id"].to_pylist()]
    weights = pa.table({"sample_id": ids, "weight": [2.0, 1.0, 0.0, 1.0], "selected": [True, True, False, True],
                        "reason": ["", "", "budget", ""], "method": ["topk"] * 4})
    write_shard(weights, paths.weights(1))
    build_train_set(pool, paths.weights(1), set(), [], [], [], paths.train_set(1))
    catalog = Catalog(paths.catalog)
    catalog.upsert_run(run_id, cfg.to_dict(), cfg.fingerprint(), str(root), "completed", None)
    catalog.upsert_iteration(run_id, 1, "fp", str(paths.adapter(1)), "completed", None)
    catalog.record_weights(run_id, 1, 1, paths.weights(1))
    catalog.refresh_parquet_views()
    return root
