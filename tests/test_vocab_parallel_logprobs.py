"""Vocabulary-parallel log-probs / entropy against ``torch.log_softmax`` on the gathered logits.

The reference is autograd through the naive computation: upcast the full, unpadded logits to FP32,
divide by T, ``log_softmax``, gather; entropy −Σ p log p. TP ranks are real processes (gloo); each
gets its column shard of the same padded logits, with garbage in the padded columns.
"""
import pytest
import torch

from megatron_rlfp16.logprobs import next_token_logprobs, vocab_parallel_logprobs
from megatron_rlfp16.testing.distributed import run_on_ranks

# dtype -> tolerance on log-probs / entropy (FP32 maths on rounded inputs: tight for every dtype)
# and on gradients (rounded to the logits' dtype on the way out).
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
CASES = [
    # dtype, temperature, chunk_size (21 tokens: 4 and 5 do not divide it), with_entropy
    (torch.float32, 1.0, 4, True),
    (torch.float32, 0.7, None, True),
    (torch.bfloat16, 1.0, 5, True),
    (torch.bfloat16, 1.3, 4, False),
    (torch.float16, 0.6, 4, True),
    (torch.float16, 1.0, 21, False),
]


def _logits(vocab: int, padded: int, dtype, seed: int = 0, shape=(3, 7)):
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(*shape, padded, generator=g) * 4.0
    full[..., vocab:] = 40.0  # padded columns: large enough to dominate if they were not excluded
    target = torch.randint(0, vocab, shape, generator=g)
    g1, g2 = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    return full.to(dtype), target, g1, g2


def _reference(full, target, vocab, temperature, g1, g2):
    """Naive FP32 log_softmax on the unpadded logits; gradient w.r.t. the full (padded) logits."""
    x = full.detach().float().requires_grad_()
    logp = torch.log_softmax(x[..., :vocab] / temperature, dim=-1)
    lp = logp.gather(-1, target[..., None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    (lp * g1 + ent * g2).sum().backward()
    grad_lp_only = torch.autograd.grad((torch.log_softmax(x[..., :vocab] / temperature, -1)
                                        .gather(-1, target[..., None]).squeeze(-1) * g1).sum(), x)[0]
    return lp.detach(), ent.detach(), x.grad, grad_lp_only


def _shard_run(full, target, vocab, temperature, chunk, with_entropy, g1, g2, group=None):
    """Runs one shard (this rank's columns of ``full``); returns values, local grad, inputs intact."""
    import torch.distributed as dist

    size = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    width = full.shape[-1] // size
    local = full[..., rank * width:(rank + 1) * width].clone().requires_grad_()
    before = local.detach().clone()
    out = vocab_parallel_logprobs(local, target, vocab_size=vocab, tp_group=group,
                                  temperature=temperature, chunk_size=chunk, with_entropy=with_entropy)
    lp, ent = out if with_entropy else (out, None)
    loss = (lp * g1).sum() + ((ent * g2).sum() if with_entropy else 0)
    loss.backward()
    return dict(lp=lp.detach(), ent=None if ent is None else ent.detach(), grad=local.grad,
                unchanged=torch.equal(before, local.detach()), dtype_ok=lp.dtype == torch.float32)


def _tp_worker(cases):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    out = []
    for i, (dtype, temperature, chunk, with_entropy, vocab, padded) in enumerate(cases):
        full, target, g1, g2 = _logits(vocab, padded, dtype, seed=i)
        out.append(_shard_run(full, target, vocab, temperature, chunk, with_entropy, g1, g2,
                              group=dist.group.WORLD))
    dist.destroy_process_group()
    return out


def _check(results, i, dtype, temperature, chunk, with_entropy, vocab, padded):
    full, target, g1, g2 = _logits(vocab, padded, dtype, seed=i)
    lp_ref, ent_ref, grad_ref, grad_lp_ref = _reference(full, target, vocab, temperature, g1, g2)
    for r in results:  # every rank has the full answer
        assert r["unchanged"] and r["dtype_ok"]
        torch.testing.assert_close(r["lp"], lp_ref, atol=2e-5, rtol=1e-5)
        if with_entropy:
            torch.testing.assert_close(r["ent"], ent_ref, atol=2e-5, rtol=1e-5)
    grad = torch.cat([r["grad"] for r in results], dim=-1)
    assert grad.dtype == dtype
    expected = grad_ref if with_entropy else grad_lp_ref
    assert torch.all(grad[..., vocab:] == 0), "padded columns must get no gradient"
    torch.testing.assert_close(grad.float(), expected, atol=GRAD_TOL[dtype], rtol=GRAD_TOL[dtype])


@pytest.mark.parametrize("i,case", list(enumerate(CASES)))
def test_single_shard_matches_log_softmax(i, case):
    dtype, temperature, chunk, with_entropy = case
    full, target, g1, g2 = _logits(300, 384, dtype, seed=i)
    res = _shard_run(full, target, 300, temperature, chunk, with_entropy, g1, g2)
    _check([res], i, dtype, temperature, chunk, with_entropy, 300, 384)


@pytest.mark.ranks
def test_tp2_matches_gathered_log_softmax():
    # Megatron's padding (300 -> 384) for the main cases; then a width of 256 for a vocabulary of
    # 100, so that rank 1's shard (columns 128..255) holds no real column at all.
    cases = [case + (300, 384) for case in CASES]
    cases += [(torch.float32, 0.9, 3, True, 100, 256), (torch.bfloat16, 1.0, None, False, 100, 256)]
    results = run_on_ranks(_tp_worker, 2, cases, timeout=120)
    for i, case in enumerate(cases):
        _check([r[i] for r in results], i, *case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_for_backward_is_the_input_plus_per_token_stats(dtype):
    full, target, g1, g2 = _logits(300, 384, dtype)
    x = full.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.data_ptr(), t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = vocab_parallel_logprobs(x, target, vocab_size=300, temperature=0.5, chunk_size=4,
                                          with_entropy=True)
    assert torch.equal(x.detach(), full), "fp32 input must not be modified (no in-place upcast)"
    others = [(n, dt) for ptr, n, dt in saved if ptr != x.data_ptr()]
    assert any(ptr == x.data_ptr() for ptr, _, _ in saved), "the input logits are saved by reference"
    tokens = target.numel()
    assert all(n <= tokens for n, _ in others), f"only per-token tensors besides the input: {others}"
    (lp * g1 + ent * g2).sum().backward()
    assert x.grad.dtype == dtype


def test_next_token_alignment():
    full, ids, _, _ = _logits(300, 384, torch.float32, shape=(2, 6))
    lp, ent = next_token_logprobs(full, ids, vocab_size=300, temperature=0.8, with_entropy=True)
    assert lp.shape == ent.shape == (2, 5)
    logp = torch.log_softmax(full[..., :300] / 0.8, -1)
    for b in range(2):
        for t in range(5):  # entry t is about the target ids[b, t + 1], scored by the logits at t
            torch.testing.assert_close(lp[b, t], logp[b, t, ids[b, t + 1]])
            torch.testing.assert_close(ent[b, t], -(logp[b, t].exp() * logp[b, t]).sum())


def test_next_token_alignment_without_entropy():
    """The branch the trainer's loss takes (no entropy): the same naive loop as above."""
    full, ids, _, _ = _logits(300, 384, torch.float32, shape=(3, 7))
    lp = next_token_logprobs(full, ids, vocab_size=300)
    assert isinstance(lp, torch.Tensor) and lp.shape == (3, 6)
    logp = torch.log_softmax(full[..., :300], -1)
    for b in range(3):
        for t in range(6):
            torch.testing.assert_close(lp[b, t], logp[b, t, ids[b, t + 1]])


def test_bad_arguments_are_named():
    full, target, _, _ = _logits(300, 384, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs(full, target, vocab_size=300, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs(full, target, vocab_size=300, chunk_size=0)
    with pytest.raises(ValueError, match="target has shape"):
        vocab_parallel_logprobs(full, target[:, :3], vocab_size=300)
