"""Parquet shards, the DuckDB catalog, schemas and content keys. No torch, no Prefect."""
