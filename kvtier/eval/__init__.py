"""Offline accuracy evaluation: real models through the tier, RULER-style tasks, attention fidelity.

Needs the `eval` extra (transformers, gguf); nothing else in kvtier imports this package.
"""
