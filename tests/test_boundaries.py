"""The ownership rules of docs/architecture.md, checked on the source tree (``git grep``-style).

Each rule was broken before the run plan landed; each test below names the owner and fails with
the offending lines if code elsewhere starts re-deriving what the owner decides.
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCANNED = ("megatron_rlfp16", "tools", "examples", "bench")


def _code_lines(path: pathlib.Path):
    """(number, line) of code, skipping comments and docstring/prose lines (no quote-free dtype
    names live in code without ``torch.``)."""
    in_doc = False
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""')
        if in_doc:
            if quotes:
                in_doc = False
            continue
        if stripped.startswith('"""'):
            in_doc = quotes == 1
            continue
        if stripped.startswith("#"):
            continue
        yield i, line


def _offenders(pattern: str, allowed_prefixes):
    regex = re.compile(pattern)
    out = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(rel.startswith(p) for p in allowed_prefixes):
                continue
            out += [f"{rel}:{i}: {line.strip()}" for i, line in _code_lines(path) if regex.search(line)]
    return out


def test_only_precision_spells_a_dtype():
    pattern = r'torch\.(float16|bfloat16|half|float32|float)\b|["\'](float16|bfloat16|float32|fp16|bf16|fp32|half)["\']'
    assert _offenders(pattern, ("megatron_rlfp16/precision/",)) == []


def test_only_models_knows_the_sequence_parallel_rule():
    # A value passed through (``sequence_parallel=sequence_parallel``) decides nothing.
    pattern = r"is_moe\b.*\btp\b|sequence_parallel\s*=\s*(?!plan\.|self\.|uses_sequence_parallel|sequence_parallel\b)"
    assert _offenders(pattern, ("megatron_rlfp16/models/",)) == []


PRIVATE = r"llm_engine|engine_core|model_runner|driver_worker|_init_optimizer_states_with_dummy_values|" \
          r"_get_cuda_rng_state|_set_cuda_rng_state|te_general_gemm|fused_experts|VLLM_[A-Z_]+"


@pytest.mark.parametrize("top", SCANNED)
def test_private_vllm_and_megatron_internals_live_in_compat(top):
    offenders = [o for o in _offenders(PRIVATE, ("megatron_rlfp16/compat/",)) if o.startswith(top)]
    # The runtime calls the compat module's function by its name, which mentions te_general_gemm.
    offenders = [o for o in offenders if "megatron_compat.define_te_general_gemm()" not in o]
    assert offenders == []
