"""Parquet shard store and DuckDB catalog."""
