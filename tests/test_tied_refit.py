"""A refit keeps a tied LM head in step with the embedding, in every precision and rollout TP.

Most small real checkpoints tie the input and output embeddings (Qwen3 0.6B-4B, Qwen2.5 0.5B-3B,
Llama 3.2 1B/3B). vLLM ties its ``lm_head`` to ``embed_tokens`` and receives no separate head
weight; on CPU the head multiplies a packed copy made when the model was first loaded, which the
in-place reload left stale (FP32: mean |Δ log p| 0.26 against the trainer after a refit). Each case
moves every trainer weight, refits, and compares the engine's log-probs with the trainer's, tied next
to untied in the same precision: a tied head must be as close as an untied one.
"""
import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.vllm


def refit_job(hf_dir, precision_name, rollout_tp, export_to=None):
    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine, verify_sync
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=2))
    precision = PrecisionConfig(trainer=precision_name).validate()
    model, arch = build_model(read_config_json(hf_dir), params_dtype=precision.trainer.torch_dtype,
                              config_overrides=precision.transformer_overrides())
    model.eval()
    load_hf_checkpoint(model, arch, hf_dir)
    precision.prepare_model(model)
    engine = RolloutEngine(hf_dir, RolloutConfig(tp=rollout_tp, max_model_len=64),
                           engine_kwargs=precision.vllm_kwargs())
    loaded = verify_sync(engine, model, arch)
    torch.manual_seed(1)  # the same on every rank: replicated weights stay equal
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.05 * torch.randn_like(p))
    stale = verify_sync(engine, model, arch)
    engine.update_weights(export_hf(model, arch, dtype=precision.rollout_precision.torch_dtype))
    fresh = verify_sync(engine, model, arch)
    if export_to is not None:  # the same weights as an HF checkpoint, for a freshly started engine
        _write_export(model, arch, hf_dir, export_to, precision.rollout_precision.torch_dtype)
    engine.close()
    return dict(loaded=loaded, stale=stale, fresh=fresh, tied=arch.tie_embeddings)


def _write_export(model, arch, hf_dir, out_dir, dtype):
    import os
    import shutil

    import torch.distributed as dist

    from megatron_rlfp16.bridge import export_hf
    from megatron_rlfp16.checkpoint.hf_io import write_safetensors_shards

    stream = export_hf(model, arch, dtype=dtype, receivers=0)
    if dist.get_rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_safetensors_shards(stream, out_dir)
        shutil.copy(f"{hf_dir}/config.json", f"{out_dir}/config.json")
    else:
        for _ in stream:  # collective: every rank drives the generator
            pass
    dist.barrier()


def fresh_engine_job(hf_dir, rollout_tp):
    """A freshly started engine and a freshly loaded trainer on the exported weights."""
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.precision import PrecisionConfig
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine, verify_sync
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=2))
    precision = PrecisionConfig(trainer="fp32").validate()
    model, arch = build_model(read_config_json(hf_dir), config_overrides=precision.transformer_overrides())
    model.eval()
    load_hf_checkpoint(model, arch, hf_dir)
    engine = RolloutEngine(hf_dir, RolloutConfig(tp=rollout_tp, max_model_len=64),
                           engine_kwargs=precision.vllm_kwargs())
    out = verify_sync(engine, model, arch)
    engine.close()
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return {tied: make_tiny_model("llama", str(root / f"tied{tied}"), seed=5, tie_word_embeddings=tied)
            for tied in (False, True)}


@pytest.mark.parametrize("rollout_tp", [2, 1])
def test_fp32_tied_head_is_refitted(dirs, rollout_tp, tmp_path):
    # FP32 on both sides: only summation-order noise remains, the bound of the untied sync test
    # (tests/test_rollout_sync.py); before the fix this was 0.98.
    exported = str(tmp_path / "exported")
    tied = run_on_ranks(refit_job, 2, dirs[True], "fp32", rollout_tp, exported, timeout=600)[0]
    assert tied["tied"]
    assert tied["fresh"]["logprob_diff_abs_mean"] < 1e-4, tied
    assert tied["stale"]["logprob_diff_abs_mean"] > 100 * max(tied["fresh"]["logprob_diff_abs_mean"], 1e-7)
    # The refitted engine samples and scores exactly like one started on the exported weights.
    started = run_on_ranks(fresh_engine_job, 2, exported, rollout_tp, timeout=600)[0]
    for key in ("prob_diff_mean", "logprob_diff_abs_mean", "ratio_max"):
        assert tied["fresh"][key] == pytest.approx(started[key], rel=1e-5, abs=1e-9), key


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_tied_head_is_refitted_like_an_untied_one(dirs, precision):
    results = {tied: run_on_ranks(refit_job, 2, dirs[tied], precision, 2, timeout=600)[0]
               for tied in (False, True)}
    untied, tied = results[False], results[True]
    assert tied["tied"] and not untied["tied"]
    # After the refit the tied model is as close to the trainer as the untied one in the same state
    # and precision (a stale head is orders of magnitude off: see the module docstring).
    noise = untied["fresh"]["logprob_diff_abs_mean"]
    assert tied["fresh"]["logprob_diff_abs_mean"] <= 3 * noise + 1e-6, (tied, untied)
    assert tied["stale"]["logprob_diff_abs_mean"] > 30 * tied["fresh"]["logprob_diff_abs_mean"], tied
    # Freshly loaded (before any refit) both start in step with the trainer.
    assert tied["loaded"]["logprob_diff_abs_mean"] <= 3 * untied["loaded"]["logprob_diff_abs_mean"] + 1e-6
