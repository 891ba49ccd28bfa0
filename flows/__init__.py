"""Prefect flows (one per stage, plus the pipeline) and the `d2l` command line."""
