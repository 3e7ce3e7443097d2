"""The run summary's selection figures: each source's kept share and the kept weights' range."""
from __future__ import annotations

import pyarrow as pa

from storage.shards import write_shard
from tasks.coverage import selection_summary
from tasks.select import WEIGHTS_SCHEMA


def test_kept_share_per_source_and_the_range_of_the_kept_weights(tmp_path):
    rows = [("a", 1.4, True), ("a", 0.2, False), ("a", 0.9, True), ("a", 0.5, False), ("b", 1.1, True),
            ("b", 0.0, False), ("c", 0.3, False)]
    ids = [f"s{i}" for i in range(len(rows))]
    table = pa.table({"sample_id": ids, "question_id": ids,
                      "source": [r[0] for r in rows], "weight": [r[1] for r in rows],
                      "selected": [r[2] for r in rows], "reason": [None if r[2] else "dropped" for r in rows],
                      "method": ["bds"] * len(rows), "rank": list(range(len(rows)))}, schema=WEIGHTS_SCHEMA)
    write_shard(table, tmp_path / "weights.parquet", "test")
    summary = selection_summary(tmp_path / "weights.parquet")
    assert summary["kept_share"] == {"a": 0.5, "b": 0.5, "c": 0.0}
    assert summary["weight_range"] == [0.9, 1.4]
