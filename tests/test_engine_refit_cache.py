"""The rollout engine against Megatron after a refit, where its caches could go stale, and at a
sampling temperature other than 1.

- Prefix cache: vLLM keeps the KV of every full block of a prompt it has seen. The engine here runs
  with 32-token blocks (the smallest vLLM-CPU attention takes) and a 72-token prompt, so two blocks
  are cached (asserted through vLLM's own ``num_cached_tokens``); after the weights change, the engine's log-probs for that prompt must
  be the new model's (Megatron's, fp32), which holds only if the refit dropped the cached blocks.
- Temperature: at T = 0.7 the engine's log-probs of its own samples (``processed_logprobs``) equal
  Megatron's tempered ones, token by token.
- ``load_format="dummy"`` (the trainer's engines start without reading the checkpoint): after the
  first refit the engine's greedy log-probs equal those of an engine that loaded the checkpoint.
- A weight loader that fails on one rank during a refit makes every rank raise within seconds (the
  others would otherwise wait for it in the export's next broadcast until the process-group timeout).
- A refit scoped to the data-parallel replica (what the trainer does) sends no byte across replicas.
"""
import pytest
import torch

from megatron_rlfp16.testing.distributed import run_on_ranks
from megatron_rlfp16.testing.tiny import make_tiny_model

pytestmark = pytest.mark.vllm

PROMPT = [(7 * i + 3) % 90 + 4 for i in range(72)]
PROBES = [PROMPT[:5], PROMPT[10:30], PROMPT[:50]]


def _megatron_logprobs(model, arch, batch, temperature):
    from megatron_rlfp16.megatron.recompute import compute_logprobs

    tokens, mask, _ = batch.to_tensors(pad_id=0)
    lp = compute_logprobs(model, [dict(input_ids=tokens)], vocab_size=arch.vocab_size, temperature=temperature)
    return [lp[i][mask[i].bool()].tolist() for i in range(len(batch))]


def engine_job(hf_dir):
    from vllm import SamplingParams, TokensPrompt

    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig())
    model, arch = build_model(read_config_json(hf_dir))
    model.eval()
    load_hf_checkpoint(model, arch, hf_dir)
    engine = RolloutEngine(hf_dir, RolloutConfig(dtype="float32", max_model_len=96),
                           engine_kwargs=dict(block_size=32, enable_prefix_caching=True))
    out = {}
    out["loaded"] = engine.generate(PROBES, temperature=0.0, max_tokens=6).logprobs
    # Temperature 0.7: sampled responses, the engine's log-probs against Megatron's tempered ones.
    sampled = engine.generate([PROMPT[:9], PROMPT[:23]], n=4, temperature=0.7, max_tokens=8, seed=5)
    out["t07"] = (sampled.logprobs, _megatron_logprobs(model, arch, sampled, 0.7))
    out["t07_raw"] = _megatron_logprobs(model, arch, sampled, 1.0)

    # Prefix cache: the prompt's full blocks are cached by the first request ...
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    engine.llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)
    again = engine.llm.generate([TokensPrompt(prompt_token_ids=PROMPT)], params, use_tqdm=False)
    out["cached_tokens"] = again[0].num_cached_tokens
    # ... then every weight moves and the engine is refitted.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.05 * torch.randn_like(p))
    engine.update_weights(export_hf(model, arch, bucket_bytes=32 << 10))
    after = engine.generate([PROMPT], temperature=0.0, max_tokens=6)
    out["after"] = (after.logprobs, _megatron_logprobs(model, arch, after, 1.0))
    engine.close()
    return out


def dummy_job(hf_dir):
    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig())
    model, arch = build_model(read_config_json(hf_dir))
    model.eval()
    load_hf_checkpoint(model, arch, hf_dir)
    engine = RolloutEngine(hf_dir, RolloutConfig(dtype="float32", max_model_len=96, load_format="dummy"))
    before = engine.generate(PROBES, temperature=0.0, max_tokens=6).logprobs
    engine.update_weights(export_hf(model, arch))
    after = engine.generate(PROBES, temperature=0.0, max_tokens=6).logprobs
    engine.close()
    return dict(before=before, after=after)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("m") / "llama"), seed=4)


@pytest.fixture(scope="module")
def job(hf_dir):
    return run_on_ranks(engine_job, 1, hf_dir, timeout=600)[0]


def test_an_engine_started_without_the_checkpoint_matches_after_its_first_refit(job, hf_dir):
    dummy = run_on_ranks(dummy_job, 1, hf_dir, timeout=600)[0]
    for loaded, refitted, unloaded in zip(job["loaded"], dummy["after"], dummy["before"]):
        assert refitted == pytest.approx(loaded, abs=1e-5)
        assert unloaded != pytest.approx(loaded, abs=1e-3)  # it really started from other weights


def test_a_refit_drops_the_prefix_cache(job):
    assert job["cached_tokens"] == 64  # two full 32-token blocks of the 72-token prompt were reused
    engine, megatron = job["after"]
    assert len(engine[0]) >= 1
    assert engine[0] == pytest.approx(megatron[0], abs=1e-4)


def test_temperature_scaled_logprobs_match_megatron(job):
    engine, megatron = job["t07"]
    assert len(engine) == 8 and sum(map(len, engine)) > 16
    for a, b in zip(engine, megatron):
        assert a == pytest.approx(b, abs=1e-4)
    # The check has teeth: the untempered log-probs of the same tokens are far off.
    raw = job["t07_raw"]
    assert max(abs(x - y) for a, b in zip(engine, raw) for x, y in zip(a, b)) > 0.05


def refit_job(hf_dir):
    """Two ranks, Megatron data parallel 2 (each rank a whole replica), one engine replica per rank:
    the refit's broadcast traffic with the export scoped to the world and to the replica, then a
    weight loader that fails on rank 1 after two tensors."""
    import time

    import torch.distributed as dist

    from megatron_rlfp16.bridge import export_hf, load_hf_checkpoint
    from megatron_rlfp16.compat import vllm as vllm_compat
    from megatron_rlfp16.models import build_model, read_config_json
    from megatron_rlfp16.rollout import RolloutConfig, RolloutEngine, verify_sync
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=1))
    model, arch = build_model(read_config_json(hf_dir))
    model.eval()
    load_hf_checkpoint(model, arch, hf_dir)
    engine = RolloutEngine(hf_dir, RolloutConfig(dtype="float32", max_model_len=96, tp=1))
    sent = []
    original = dist.broadcast

    def counting(tensor, src, group=None, **kwargs):
        if dist.get_world_size(group) > 1:
            sent.append(tensor.numel() * tensor.element_size())
        return original(tensor, src, group=group, **kwargs)

    dist.broadcast = counting
    out = {}
    for scope, seed in (("world", 1), ("replica", 2)):
        torch.manual_seed(seed)  # the same change on both ranks: the replicas stay equal
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.1).add_(0.02 * torch.randn_like(p))
        sent.clear()
        engine.update_weights(export_hf(model, arch, scope=scope))
        out[scope] = dict(bytes=sum(sent), fresh=verify_sync(engine, model, arch))
    dist.broadcast = original
    if dist.get_rank() == 1:
        def broken(llm, stream):
            for i, _ in enumerate(stream):
                if i == 2:
                    raise OSError("disk quota exceeded (injected)")

        vllm_compat.reload_weights = broken
    start = time.monotonic()
    try:
        engine.update_weights(export_hf(model, arch))
        out["failure"] = "no error"
    except RuntimeError as err:
        out["failure"] = str(err)
    out["failure_seconds"] = time.monotonic() - start
    engine.close()
    from safetensors.torch import load_file

    out["model_bytes"] = sum(t.numel() * t.element_size() for t in load_file(f"{hf_dir}/model.safetensors").values())
    return out


@pytest.fixture(scope="module")
def refits(hf_dir):
    return run_on_ranks(refit_job, 2, hf_dir, timeout=300)


def test_a_refit_inside_each_replica_sends_nothing_across_replicas(refits):
    for out in refits:
        # Scoped to the world every bucket is broadcast to both ranks; scoped to the replica (each
        # rank holds the whole model here) no byte leaves the rank, and the engine is as fresh.
        assert out["world"]["bytes"] == out["model_bytes"]  # every HF tensor once, whole
        assert out["replica"]["bytes"] == 0
        for scope in ("world", "replica"):
            assert out[scope]["fresh"]["logprob_diff_abs_mean"] < 1e-4, (scope, out[scope])


def test_a_loader_failure_on_one_rank_reaches_every_rank_at_once(refits):
    for out in refits:
        assert out["failure"] == ("the weight sync failed on rank(s) [1]; rank 1: OSError: disk quota exceeded "
                                  "(injected)"), out
        assert out["failure_seconds"] < 30
