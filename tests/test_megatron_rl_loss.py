"""The RL loss through Megatron's schedules equals the single-rank loss of the whole global batch.

Reference: one process, the same tiny Llama, ONE forward of the whole global batch, naive FP32
``log_softmax`` log-probs and entropy, ``policy_loss`` with its default (whole-call) denominators,
``loss.backward()``. No schedule, no DDP, no vocabulary-parallel code, no global counts.

Under test: real Megatron ranks (gloo) at TP=2, PP=2, DP=2 and TP=2 × DP=2: the global batch split
over DP ranks and into several micro-batches with ragged response lengths (one response empty),
``train_step`` through ``forward_backward_func`` and Megatron DDP, gradients gathered per parameter
from ``main_grad`` with the bridge's export. Also forward-only ``compute_logprobs`` against a
transformers forward pass of the HF checkpoint.
"""
import pytest
import torch

from megatron_rlfp16.losses import PolicyLossConfig, policy_loss
from megatron_rlfp16.testing.distributed import run_on_ranks

pytestmark = pytest.mark.ranks

NUM_SEQS, SEQ_LEN, MICRO_BATCH = 8, 12, 2
RUNS = [  # (loss config, temperature)
    (PolicyLossConfig(loss="ppo_clip", agg="token-mean", correction="token_tis", kl_coef=0.05,
                      entropy_coef=0.01), 1.0),
    (PolicyLossConfig(loss="pg", correction="seq_tis", correction_cap=2.0, agg="seq-mean-token-sum-norm",
                      norm_length=16.0), 0.7),
    (PolicyLossConfig(loss="gspo", clip_low=3e-4, clip_high=4e-4, agg="seq-mean-token-mean"), 1.0),
    # Removal and batch normalization need the whole step before its first micro-batch.
    (PolicyLossConfig(loss="ppo_clip", correction="seq_tis", correction_cap=1.5, correction_normalize=True,
                      rejection={"token_k2": 0.01}, rejection_mode="remove", agg="token-mean"), 1.0),
]
REMOVE_RUN = 3


def kept_counts(batch: dict) -> tuple:
    """(tokens, sequences) left by REMOVE_RUN's rejection, ½(log π_old − log μ)² <= 0.01, counted
    with Python loops."""
    mask, old, mu = (batch[k].tolist() for k in ("loss_mask", "old_logprobs", "rollout_logprobs"))
    kept = [[m and 0.5 * (o - u) ** 2 <= 0.01 for m, o, u in zip(*row)] for row in zip(mask, old, mu)]
    return sum(map(sum, kept)), sum(any(row) for row in kept)
LAYOUTS = {  # name: (world size, tp, pp)
    "tp2": (2, 2, 1),
    "pp2": (2, 1, 2),
    "dp2": (2, 1, 1),
    "tp2_dp2": (4, 2, 1),
}
RECOMPUTE_TEMPERATURES = (1.0, 0.7)


def global_batch(seed: int = 0) -> dict:
    """8 sequences of 12 tokens: prompts of 1-4 tokens, responses of 0 to all remaining tokens.
    Per-token tensors are [B, S-1], aligned with the targets input_ids[:, 1:]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (NUM_SEQS, SEQ_LEN), generator=g)
    prompt = torch.randint(1, 5, (NUM_SEQS,), generator=g)
    response = [int(torch.randint(1, SEQ_LEN - int(p) + 1, (1,), generator=g)) for p in prompt]
    response[3] = 0  # a sequence without any response token: counts for no token and no sequence
    response[5] = SEQ_LEN - int(prompt[5])  # one that runs to the end of the padded length
    target_pos = torch.arange(1, SEQ_LEN)  # position in input_ids of each target
    mask = torch.stack([(target_pos >= p) & (target_pos < p + r) for p, r in zip(prompt.tolist(), response)])
    shape = (NUM_SEQS, SEQ_LEN - 1)
    old = -5.7 + 0.3 * torch.randn(shape, generator=g)
    rollout = old + 0.1 * torch.randn(shape, generator=g)
    ref = old + 0.2 * torch.randn(shape, generator=g)
    # Padding holds garbage: everything must be masked out, not just be harmless.
    old, rollout = old.masked_fill(~mask, float("inf")), rollout.masked_fill(~mask, -1e4)
    return dict(input_ids=ids, loss_mask=mask, old_logprobs=old, rollout_logprobs=rollout,
                ref_logprobs=ref, advantages=torch.randn(NUM_SEQS, generator=g))


def _model(hf_dir):
    from megatron_rlfp16.bridge import load_hf_checkpoint
    from megatron_rlfp16.models import build_model, read_config_json

    model, arch = build_model(read_config_json(hf_dir))
    load_hf_checkpoint(model, arch, hf_dir)
    return model, arch


def _full_grads(model, arch, grads):
    """{hf_name: full gradient}, gathered over TP and PP by the bridge (collective)."""
    from megatron_rlfp16.bridge import Bridge, ShardContext, export_hf_weights

    named = [(name, grads(p)) for name, p in model.named_parameters()]
    ctx = ShardContext.from_megatron(model)
    return {n: t.clone() for n, t in export_hf_weights(named, Bridge(arch), ctx)}


def _reference_worker(hf_dir):
    from megatron_rlfp16.megatron import train_step
    from megatron_rlfp16.models import causal_mask
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig())
    model, arch = _model(hf_dir)
    batch = global_batch()
    ids = batch["input_ids"]
    out = {}
    for k, (config, temperature) in enumerate(RUNS):
        model.zero_grad(set_to_none=True)
        logits = model(ids, torch.arange(SEQ_LEN).expand_as(ids), attention_mask=causal_mask(SEQ_LEN))
        logp = torch.log_softmax(logits[..., :arch.vocab_size].float() / temperature, dim=-1)
        lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)[:, :-1]
        loss, _ = policy_loss(lp, batch["old_logprobs"], batch["rollout_logprobs"], batch["advantages"],
                              batch["loss_mask"], config, ref_logprobs=batch["ref_logprobs"], entropy=ent)
        loss.backward()
        out[k] = dict(loss=loss.item(), grads=_full_grads(model, arch, lambda p: p.grad))
    try:  # a bare model (no DDP, no per-token flag) is refused, not silently mis-scaled
        train_step(model, [batch], RUNS[0][0], vocab_size=arch.vocab_size)
        out["bare_model_error"] = None
    except ValueError as err:
        out["bare_model_error"] = str(err)
    return out


def _layout_worker(hf_dir, tp, pp):
    from megatron.core import parallel_state as ps

    from megatron_rlfp16.megatron import compute_logprobs, split, train_step, wrap_ddp
    from megatron_rlfp16.runtime import ParallelConfig, init_runtime

    init_runtime(ParallelConfig(tp=tp, pp=pp))
    model, arch = _model(hf_dir)
    ddp = wrap_ddp(model)
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    rows = NUM_SEQS // dp
    mine = {k: v[dp_rank * rows:(dp_rank + 1) * rows] for k, v in global_batch().items()}
    micro = split(mine, MICRO_BATCH)
    out = {"dp_rank": dp_rank, "num_micro_batches": len(micro), "recompute": {}}
    for k, (config, temperature) in enumerate(RUNS):
        metrics = train_step(ddp, micro, config, vocab_size=arch.vocab_size, temperature=temperature)
        out[k] = dict(metrics=metrics, grads=_full_grads(model, arch, lambda p: p.main_grad))
    for temperature in RECOMPUTE_TEMPERATURES:
        lp, ent = compute_logprobs(ddp, micro, vocab_size=arch.vocab_size, temperature=temperature,
                                   with_entropy=True)
        out["recompute"][temperature] = (lp, ent)
    out["head_removed"] = "compute_language_model_loss" not in vars(model)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_rlfp16.testing.tiny import make_tiny_model

    return make_tiny_model("llama", str(tmp_path_factory.mktemp("tiny_llama")), seed=0)


@pytest.fixture(scope="module")
def reference(hf_dir):
    return run_on_ranks(_reference_worker, 1, hf_dir, timeout=300)[0]


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, hf_dir):
    world, tp, pp = LAYOUTS[request.param]
    return request.param, run_on_ranks(_layout_worker, world, hf_dir, tp, pp, timeout=300)


def test_loss_and_gradients_equal_single_rank_global_batch(reference, layout):
    name, ranks = layout
    batch = global_batch()
    for k in range(len(RUNS)):
        ref = reference[k]
        for rank, out in enumerate(ranks):
            metrics = out[k]["metrics"]
            assert abs(metrics["loss"] - ref["loss"]) <= 1e-5, (name, k, rank, metrics["loss"], ref["loss"])
            if k == REMOVE_RUN:
                tokens, seqs = kept_counts(batch)
                assert 0 < tokens < batch["loss_mask"].sum().item()
                assert metrics["correction_removed_frac"] == pytest.approx(
                    1 - tokens / batch["loss_mask"].sum().item(), rel=1e-6)
            else:
                tokens, seqs = batch["loss_mask"].sum().item(), batch["loss_mask"].any(-1).sum().item()
            assert (metrics["num_tokens"], metrics["num_seqs"]) == (tokens, seqs)
            grads = out[k]["grads"]
            assert sorted(grads) == sorted(ref["grads"])
            for hf_name, expected in ref["grads"].items():
                assert expected.abs().max() > 0, hf_name
                diff = (grads[hf_name] - expected).abs().max().item()
                assert diff <= 1e-5, f"{name} run {k} rank {rank} {hf_name}: max |Δgrad| = {diff:.3g}"
    assert max(out["num_micro_batches"] for out in ranks) >= 2
    assert all(out["head_removed"] for out in ranks), "logprobs_head must restore the model"


@pytest.fixture(scope="module")
def transformers_logits(hf_dir):
    from megatron_rlfp16.testing.tiny import hf_logits

    return hf_logits(hf_dir, global_batch()["input_ids"]).float()


def test_recompute_equals_transformers_forward(transformers_logits, layout):
    _, ranks = layout
    ids = global_batch()["input_ids"]
    logits = transformers_logits
    dp = max(out["dp_rank"] for out in ranks) + 1
    rows = NUM_SEQS // dp
    for temperature in RECOMPUTE_TEMPERATURES:
        logp = torch.log_softmax(logits / temperature, dim=-1)
        lp = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        ent = -(logp.exp() * logp).sum(-1)[:, :-1]
        for out in ranks:  # every rank (all TP and PP ranks) returns its DP shard's log-probs
            got_lp, got_ent = out["recompute"][temperature]
            sl = slice(out["dp_rank"] * rows, (out["dp_rank"] + 1) * rows)
            torch.testing.assert_close(got_lp, lp[sl], atol=1e-4, rtol=0)
            torch.testing.assert_close(got_ent, ent[sl], atol=1e-4, rtol=0)


def test_bare_model_is_refused(reference):
    assert "DistributedDataParallel" in reference["bare_model_error"]


def test_global_counts_and_micro_batch_checks():
    from megatron_rlfp16.megatron import check_micro_batches, global_counts, split

    micro = split(global_batch(), MICRO_BATCH)
    counts = global_counts(micro)  # no DP group: this process's micro-batches are the whole step
    mask = global_batch()["loss_mask"]
    assert counts.num_tokens.item() == mask.sum().item()
    assert counts.num_seqs.item() == mask.any(-1).sum().item() == NUM_SEQS - 1
    assert check_micro_batches(micro, training=True) == (MICRO_BATCH, SEQ_LEN)

    bad = [dict(m) for m in micro]
    bad[1]["input_ids"] = bad[1]["input_ids"][:, :-1]
    with pytest.raises(ValueError, match="micro-batch 1: input_ids has shape"):
        check_micro_batches(bad, training=True)
    bad = [dict(m) for m in micro]
    bad[2]["old_logprobs"] = torch.zeros(MICRO_BATCH, SEQ_LEN)  # [B, S] instead of [B, S-1]
    with pytest.raises(ValueError, match=r"micro-batch 2: old_logprobs has shape .*input_ids\[:, 1:\]"):
        check_micro_batches(bad, training=True)
    bad = [{k: v for k, v in m.items() if k != "advantages"} for m in micro]
    with pytest.raises(ValueError, match="no 'advantages'"):
        check_micro_batches(bad, training=True)
    check_micro_batches(bad, training=False)  # recompute needs input_ids only
    with pytest.raises(ValueError, match="empty"):
        check_micro_batches([], training=False)
