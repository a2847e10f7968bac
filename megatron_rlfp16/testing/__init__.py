"""Helpers for tests and benchmarks: real local ranks, tiny Hugging Face models made at run time."""
