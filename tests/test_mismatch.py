"""mismatch_metrics against a naive reference: Python loops over plain floats and math.exp."""
import math

import pytest
import torch

from megatron_rlfp16.mismatch import METRIC_NAMES, mismatch_metrics


def naive_metrics(train, rollout, mask):
    """The docstring's formulas, one token at a time, on the exact values the tensors hold."""
    train = train.double().tolist()
    rollout = rollout.double().tolist()
    mask = [[bool(v) for v in row] for row in mask.tolist()]
    diffs, pts, prs, seq_abs, seq_sq_ratio, ppl_diff = [], [], [], [], [], []
    for tr_row, ro_row, m_row in zip(train, rollout, mask):
        seq, nll_train, nll_roll = 0.0, 0.0, 0.0
        for tr, ro, keep in zip(tr_row, ro_row, m_row):
            if keep:
                diffs.append(tr - ro)
                pts.append(math.exp(tr))
                prs.append(math.exp(ro))
                seq += tr - ro
                nll_train, nll_roll = nll_train - tr, nll_roll - ro
        if any(m_row):
            length = sum(m_row)
            seq_abs.append(abs(seq))
            seq_sq_ratio.append(math.prod(math.exp(tr - ro) for tr, ro, k in zip(tr_row, ro_row, m_row) if k) ** 2)
            ppl_diff.append(abs(nll_train / length - nll_roll / length))  # |log ppl(π) − log ppl(μ)|
    n = len(diffs)
    prob_diffs = [abs(a - b) for a, b in zip(pts, prs)]
    mean_t, mean_r = sum(pts) / n, sum(prs) / n
    cov = sum((a - mean_t) * (b - mean_r) for a, b in zip(pts, prs))
    var_t = sum((a - mean_t) ** 2 for a in pts)
    var_r = sum((b - mean_r) ** 2 for b in prs)
    return {
        "prob_diff_mean": sum(prob_diffs) / n,
        "prob_diff_max": max(prob_diffs),
        "logprob_diff_abs_mean": sum(abs(d) for d in diffs) / n,
        "kl_k1": sum(-d for d in diffs) / n,
        "kl_k3": sum(math.exp(d) - 1 - d for d in diffs) / n,
        "ratio_max": max(math.exp(d) for d in diffs),
        "ratio_min": min(math.exp(d) for d in diffs),
        "seq_log_ratio_abs_mean": sum(seq_abs) / len(seq_abs),
        "seq_log_ratio_abs_max": max(seq_abs),
        "pearson_prob": cov / math.sqrt(var_t * var_r),
        "chi2_token": sum(math.exp(d) ** 2 for d in diffs) / n - 1,
        "chi2_seq": sum(seq_sq_ratio) / len(seq_sq_ratio) - 1,
        "log_ppl_abs_diff": sum(ppl_diff) / len(ppl_diff),
        "num_tokens": float(n),
        "num_sequences": float(len(seq_abs)),
    }


def make_batch(lengths, seq_len=12, noise=0.05, seed=0, dtype=torch.float32):
    """Rollout log-probs of sampled tokens and a trainer's slightly perturbed copy."""
    g = torch.Generator().manual_seed(seed)
    rollout = torch.log(torch.rand(len(lengths), seq_len, generator=g).clamp_min(1e-3))
    train = rollout + noise * torch.randn(len(lengths), seq_len, generator=g)
    train = train.clamp_max(0.0)  # still a log-probability
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.bool)
    for row, length in enumerate(lengths):
        mask[row, :length] = True
    return train.to(dtype), rollout.to(dtype), mask


def assert_matches(got, want, rel=1e-9):
    assert set(got) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        value = got[name]
        assert value.dim() == 0, name
        assert value.dtype == torch.float64, name
        assert value.item() == pytest.approx(want[name], rel=rel, abs=1e-12), name


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.int64, torch.uint8])
def test_ragged_masks_match_naive_loop(mask_dtype):
    # Row 2 is fully masked out: it must not count as a sequence nor dilute the means.
    train, rollout, mask = make_batch([12, 5, 0, 1, 9])
    got = mismatch_metrics(train, rollout, mask.to(mask_dtype))
    assert_matches(got, naive_metrics(train, rollout, mask))
    assert got["num_sequences"].item() == 4
    assert got["num_tokens"].item() == 27


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_measured_in_float64(dtype):
    train, rollout, mask = make_batch([12, 7, 3], noise=0.01, seed=1, dtype=dtype)
    got = mismatch_metrics(train, rollout, mask)
    # The reference reads the exact values the 16-bit tensors hold, so agreement is float64-tight:
    # nothing was rounded to 16 bits after the inputs were.
    assert_matches(got, naive_metrics(train, rollout, mask))


def test_mixed_input_dtypes():
    train, rollout, mask = make_batch([4, 12], seed=2)
    got = mismatch_metrics(train.to(torch.bfloat16), rollout.to(torch.float16), mask)
    want = naive_metrics(train.to(torch.bfloat16), rollout.to(torch.float16), mask)
    assert_matches(got, want)


def test_padding_values_never_reach_the_metrics():
    train, rollout, mask = make_batch([3, 6], seed=3)
    clean = mismatch_metrics(train, rollout, mask)
    dirty_train = train.masked_fill(~mask, float("nan"))
    dirty_rollout = rollout.masked_fill(~mask, float("-inf"))
    dirty = mismatch_metrics(dirty_train, dirty_rollout, mask)
    for name in METRIC_NAMES:
        assert dirty[name].item() == clean[name].item(), name


def test_hand_computed_two_tokens():
    # Token 1: π = 1/2, μ = 1/4.  Token 2: π = μ = 1/2.  One sequence of both.
    train = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    rollout = torch.tensor([[math.log(0.25), math.log(0.5)]], dtype=torch.float64)
    got = mismatch_metrics(train, rollout, torch.ones(1, 2))
    log2 = math.log(2.0)
    assert got["prob_diff_mean"].item() == pytest.approx(0.125)
    assert got["prob_diff_max"].item() == pytest.approx(0.25)
    assert got["logprob_diff_abs_mean"].item() == pytest.approx(log2 / 2)
    assert got["kl_k1"].item() == pytest.approx(-log2 / 2)
    assert got["kl_k3"].item() == pytest.approx((2.0 - 1.0 - log2) / 2)
    assert got["ratio_max"].item() == pytest.approx(2.0)
    assert got["ratio_min"].item() == pytest.approx(1.0)
    assert got["seq_log_ratio_abs_mean"].item() == pytest.approx(log2)
    assert math.isnan(got["pearson_prob"].item())  # π is constant here: correlation is undefined


def test_identical_policies_have_no_mismatch():
    _, rollout, mask = make_batch([12, 4], seed=4)
    got = mismatch_metrics(rollout.clone(), rollout, mask)
    for name in ("prob_diff_mean", "prob_diff_max", "logprob_diff_abs_mean", "kl_k1", "kl_k3",
                 "seq_log_ratio_abs_mean", "seq_log_ratio_abs_max"):
        assert got[name].item() == 0.0, name
    assert got["ratio_max"].item() == got["ratio_min"].item() == 1.0
    assert got["pearson_prob"].item() == pytest.approx(1.0)


def test_sequence_mismatch_grows_with_length_while_token_mismatch_does_not():
    # A constant per-token bias adds up along the response: the paper's point about long traces.
    lengths = [2, 200]
    rollout = torch.full((2, 200), math.log(0.5), dtype=torch.float64)
    train = rollout + 1e-3
    mask = torch.arange(200).expand(2, 200) < torch.tensor(lengths)[:, None]
    short = mismatch_metrics(train[:1], rollout[:1], mask[:1])
    long = mismatch_metrics(train[1:], rollout[1:], mask[1:])
    token_gap = [m["logprob_diff_abs_mean"].item() for m in (short, long)]
    seq_gap = [m["seq_log_ratio_abs_mean"].item() for m in (short, long)]
    assert token_gap[1] == pytest.approx(token_gap[0])
    assert seq_gap[1] == pytest.approx(100 * seq_gap[0])


def test_kl_k3_is_nonnegative_and_gradients_do_not_flow():
    train, rollout, mask = make_batch([12, 12, 6], noise=0.5, seed=5)
    train.requires_grad_(True)
    got = mismatch_metrics(train, rollout, mask)
    assert got["kl_k3"].item() >= 0.0
    assert all(not v.requires_grad for v in got.values())


def test_shape_mismatch_names_both_shapes():
    train, rollout, mask = make_batch([3, 3])
    with pytest.raises(ValueError, match=r"train_logprobs \(2, 12\).*rollout_logprobs \(2, 11\)"):
        mismatch_metrics(train, rollout[:, :11], mask)
    with pytest.raises(ValueError, match=r"mask \(1, 12\)"):
        mismatch_metrics(train, rollout, mask[:1])
    with pytest.raises(ValueError, match="2-D|\\[B, T\\]"):
        mismatch_metrics(train[0], rollout[0], mask[0])


def test_empty_mask_is_an_error():
    train, rollout, mask = make_batch([0, 0])
    with pytest.raises(ValueError, match="no token"):
        mismatch_metrics(train, rollout, mask)


def test_non_binary_mask_is_an_error():
    train, rollout, mask = make_batch([3, 3])
    with pytest.raises(ValueError, match="0 and 1"):
        mismatch_metrics(train, rollout, mask.float() * 0.5)


def test_integer_logprobs_are_an_error():
    train, rollout, mask = make_batch([3, 3])
    with pytest.raises(ValueError, match="floating"):
        mismatch_metrics(train.long(), rollout, mask)
