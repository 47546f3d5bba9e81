"""Helpers for the test suite that are not fixtures (fixtures live in conftest.py)."""
