"""`dtype: auto` and `bds.autocast: auto`: bf16 only where the hardware has bf16 units (tasks/precision.py), and
the resolved value is what the stages run and record."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from flows.config import BDSConfig, ConfigError, ModelConfig, parse_config
from tasks import precision

AVX2_ONLY = "processor : 0\nflags : fpu sse2 avx avx2 fma bmi2\n"
SAPPHIRE_RAPIDS = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_cpu_flags_decide_whether_bf16_is_native():
    assert not precision.cpu_has_native_bf16(AVX2_ONLY)
    assert precision.cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert precision.cpu_has_native_bf16("flags : avx2 amx_bf16\n")
    assert not precision.cpu_has_native_bf16("flags : avx512f avx512_bf16x\n")  # whole flags only


@pytest.mark.parametrize("native", [True, False])
def test_auto_resolves_by_hardware_and_explicit_values_are_kept(monkeypatch, native):
    monkeypatch.setattr(precision, "native_bf16", lambda: native)
    assert precision.resolve_dtype("auto") == ("bf16" if native else "fp32")
    assert precision.resolve_dtype("fp32") == "fp32" and precision.resolve_dtype("bf16") == "bf16"
    assert precision.resolve_autocast("auto") is native
    assert precision.resolve_autocast(True) is True and precision.resolve_autocast(False) is False


def test_the_stages_get_the_resolved_dtype_not_auto(monkeypatch):
    import flows.config

    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert ModelConfig(dtype="auto").spec("adapter").dtype == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert flows.config.ModelConfig(dtype="auto").spec().dtype == "bf16"
    assert ModelConfig(dtype="fp32").spec().dtype == "fp32"


def test_autocast_takes_a_bool_or_auto_and_defaults_to_auto():
    base = {"run_id": "x", "data": {"pool": "p.jsonl", "validation": "v.jsonl"}}
    assert BDSConfig().autocast == "auto"
    for value in (True, False, "auto"):
        assert parse_config({**base, "select": {"bds": {"autocast": value}}}).select.bds.autocast == value
    with pytest.raises(ConfigError, match="select.bds.autocast"):
        parse_config({**base, "select": {"bds": {"autocast": "yes"}}})
    with pytest.raises(ConfigError, match="model.dtype"):
        parse_config({**base, "model": {"dtype": "fp16"}})


def test_bds_runs_and_records_the_resolved_autocast(monkeypatch, tmp_path, tiny_model_dir):
    """autocast auto on a machine without bf16 units runs (and records) autocast False: the same weights as an
    explicit `autocast: false` run, and a machine where auto means True sees different recorded inputs."""
    from storage.shards import read_manifest, read_shard
    from tasks.bds import run_bds
    from tasks.models import ModelSpec
    from tests.test_bds import BDS, LORA, _synthetic

    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    pool, validation, _ = _synthetic(tmp_path)
    model = ModelSpec(str(tiny_model_dir), max_seq_len=128)
    for name, autocast in (("auto", "auto"), ("off", False)):
        run_bds(pool, validation, out_dir=tmp_path / name, weights_path=tmp_path / f"{name}.parquet", model=model,
                bds=SimpleNamespace(**{**vars(BDS), "epochs": 1, "autocast": autocast}), lora=LORA, budget=0.5,
                seed=0)
    auto, off = (read_manifest(tmp_path / f"{name}.parquet")["inputs"] for name in ("auto", "off"))
    assert auto["settings"]["bds"]["autocast"] is False and auto == off
    assert read_shard(tmp_path / "auto.parquet").equals(read_shard(tmp_path / "off.parquet"))
