"""Prefect tasks: small idempotent units of work over one shard. They pass paths and keys, never data."""
