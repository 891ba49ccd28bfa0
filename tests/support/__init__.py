"""Helpers the tests share: paths and environments, corpora, tiny models. Tests import from here, never from
conftest.py (which only defines fixtures) or from each other."""
