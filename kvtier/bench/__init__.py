"""Benchmarks run by ``python -m kvtier bench NAME``."""
