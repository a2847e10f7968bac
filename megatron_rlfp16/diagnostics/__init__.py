"""Diagnostics: the training-inference mismatch report (``tools/measure_mismatch.py``)."""
