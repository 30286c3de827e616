"""Shared helpers for the interop suites (see broker.py)."""
