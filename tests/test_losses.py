"""megatron_rlfp16.losses against an independent per-token reference written with Python loops.

The reference (``naive_loss``) walks b and t with Python floats and ``math.exp`` for every detached
quantity, and 0-dim torch scalars only where θ enters, so autograd gives the reference gradient. It
imports nothing from the package. Everything runs in float64 on CPU.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from megatron_rlfp16.losses import (
    PolicyLossConfig,
    PolicyTerms,
    compute_advantages,
    policy_loss,
    register_correction,
    register_policy_loss,
)

LOSSES = ["ppo_clip", "gspo", "pg", "cispo"]
CORRECTIONS = [None, "token_tis", "token_mis", "seq_tis", "seq_mis", "geo_seq_tis", "geo_seq_mis", "icepop"]
AGGS = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
B, T = 5, 7
LENGTHS = [7, 3, 0, 5, 1]  # ragged, with one fully padded row


# ----------------------------------------------------------------------------- naive reference


def _val(x) -> float:
    return x.item() if isinstance(x, torch.Tensor) else float(x)


def _max(a, b):
    return a if _val(a) >= _val(b) else b


def _min(a, b):
    return a if _val(a) <= _val(b) else b


def _clip(x, lo, hi):
    """clip() whose clamped branches are constants, as the clamp's gradient is 0 there."""
    v = _val(x)
    return lo if v < lo else hi if v > hi else x


def naive_loss(lp, old, mu, adv, mask, cfg, ref=None, ent=None, num_tokens=None, num_seqs=None):
    """The loss spelled out per token. ``lp`` is a leaf tensor; every other input a nested list."""
    b_rows, t_cols = len(mask), len(mask[0])
    old = mu if old is None else old
    adv_at = (lambda b, t: adv[b]) if not isinstance(adv[0], list) else (lambda b, t: adv[b][t])
    lo, hi = 1 - cfg["clip_low"], 1 + cfg["clip_high"]
    loss_name, corr = cfg["loss"], cfg.get("correction")
    icepop = corr == "icepop"  # IcePop's paper band [0.5, 5] when none is given
    cap, floor = cfg.get("cap", 5.0 if icepop else 2.0), cfg.get("floor", 0.5 if icepop else 0.0)

    def given_ts(b):
        return [t for t in range(t_cols) if mask[b][t]]

    def weight_at(prox):
        """Every token's weight (a dict (b, t) -> float) when the proximal log-prob is prox(b, t)."""
        def log_rho(b, t):
            return prox(b, t) - mu[b][t]

        def seq_rho(b):
            return math.exp(sum(log_rho(b, t) for t in given_ts(b)))

        def geo_rho(b):  # the geometric mean of the token ratios
            ts = given_ts(b)
            return math.exp(sum(log_rho(b, t) for t in ts) / len(ts))

        def vetoed(b):
            tau = cfg.get("veto")
            return tau is not None and any(math.exp(log_rho(b, t)) < tau for t in given_ts(b))

        def outside(x, est, bound):  # is the statistic x outside the criterion's bound?
            if est != "k1":
                return x > bound
            low, high = (1 / bound, bound) if not isinstance(bound, tuple) else bound
            return (low > 0 and x < math.log(low)) or (high != math.inf and x > math.log(high))

        def rejected(b, t):
            for criterion, bound in (cfg.get("rejection") or {}).items():
                level, est = criterion.rsplit("_", 1)

                def k(u):
                    x = log_rho(b, u)
                    return {"k1": x, "k2": x * x / 2, "k3": math.exp(x) - 1 - x}[est]

                ts = given_ts(b)
                if level == "token":
                    bad = outside(k(t), est, bound)
                elif level == "seq_sum":
                    bad = outside(sum(k(u) for u in ts), est, bound)
                elif level == "seq_mean":
                    bad = outside(sum(k(u) for u in ts) / len(ts), est, bound)
                elif est == "k1":  # seq_max_k1: every token inside the band
                    bad = any(outside(k(u), est, bound) for u in ts)
                else:
                    bad = outside(max(k(u) for u in ts), est, bound)
                if bad:
                    return True
            return False

        def corrected(b, t):
            rho_t = math.exp(log_rho(b, t))
            if corr is None:
                return 1.0
            if corr == "token_tis":
                return min(rho_t, cap)
            if corr == "token_mis":
                return rho_t if floor <= rho_t <= cap else 0.0
            if corr == "seq_tis":
                return min(seq_rho(b), cap)
            if corr == "seq_mis":
                return seq_rho(b) if floor <= seq_rho(b) <= cap else 0.0
            if corr == "geo_seq_tis":
                return min(geo_rho(b), cap)
            if corr == "geo_seq_mis":
                return geo_rho(b) if floor <= geo_rho(b) <= cap else 0.0
            if corr == "icepop":
                return rho_t if floor <= rho_t <= cap else 0.0
            raise AssertionError(corr)

        return {(b, t): 0.0 if vetoed(b) or rejected(b, t) else corrected(b, t)
                for b in range(b_rows) for t in given_ts(b)}

    current = lambda b, t: lp[b, t].item()  # noqa: E731
    before = lambda b, t: old[b][t]  # noqa: E731
    weights = weight_at(current if loss_name == "pg" else before)
    removed = set()
    if cfg.get("rejection_mode") == "remove":  # decided on π_old
        removed = {bt for bt, w in weight_at(before).items() if w == 0}

    def masked_ts(b):
        return [t for t in given_ts(b) if (b, t) not in removed]

    if cfg.get("normalize"):
        seq_level = corr in ("seq_tis", "seq_mis", "geo_seq_tis", "geo_seq_mis")
        if seq_level:
            rows = [[weights[b, t] for t in masked_ts(b)] for b in range(b_rows)]
            means = [sum(r) / len(r) for r in rows if r]
        else:
            means = [weights[b, t] for b in range(b_rows) for t in masked_ts(b)]
        mean = sum(means) / len(means)
        weights = {bt: w / mean for bt, w in weights.items()}

    def weight(b, t):
        return weights[b, t]

    def objective(b, t):
        x, a = lp[b, t], adv_at(b, t)
        if loss_name == "ppo_clip":
            r = torch.exp(x - old[b][t])
            out = _max(-a * r, -a * _clip(r, lo, hi))
            if cfg.get("dual_clip") is not None and a < 0:
                out = _min(out, -cfg["dual_clip"] * a)
            return out
        if loss_name == "gspo":
            ts = masked_ts(b)
            s = math.exp(sum(lp[b, u].item() - old[b][u] for u in ts) / len(ts))
            s_t = s * torch.exp(x - x.detach())
            return _max(-a * s_t, -a * _clip(s_t, lo, hi))
        if loss_name == "pg":
            return -a * x
        if loss_name == "cispo":
            r = math.exp(x.item() - old[b][t])
            return -min(max(r, lo), hi) * a * x
        raise AssertionError(loss_name)

    def token(b, t):
        out = weight(b, t) * objective(b, t)
        if cfg.get("kl_coef", 0.0):
            d = lp[b, t] - ref[b][t]
            kl = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d}[cfg.get("kl_estimator", "k3")]
            out = out + cfg["kl_coef"] * kl
        if cfg.get("entropy_coef", 0.0):
            out = out - cfg["entropy_coef"] * ent[b][t]
        return out

    sums, counts = [], []
    for b in range(b_rows):
        total = torch.zeros((), dtype=torch.float64)
        for t in masked_ts(b):
            total = total + token(b, t)
        sums.append(total)
        counts.append(len(masked_ts(b)))
    n_tok = sum(counts) if num_tokens is None else num_tokens
    n_seq = sum(1 for c in counts if c > 0) if num_seqs is None else num_seqs
    agg = cfg.get("agg", "token-mean")
    if agg == "token-mean":
        return sum(sums) / n_tok
    if agg == "seq-mean-token-sum":
        return sum(sums) / n_seq
    if agg == "seq-mean-token-mean":
        return sum(s / c if c else s * 0 for s, c in zip(sums, counts)) / n_seq
    if agg == "seq-mean-token-sum-norm":
        return sum(sums) / (n_seq * (cfg.get("norm_length") or t_cols))
    raise AssertionError(agg)


# ----------------------------------------------------------------------------- helpers


def make_batch(seed=0, lengths=LENGTHS, token_adv=False, float_mask=False, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    shape = (len(lengths), T)

    def randn(scale=1.0):
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    old = -1.0 - randn(0.5).abs()
    mask = torch.tensor([[t < n for t in range(T)] for n in lengths])
    batch = dict(
        logprobs=old + randn(spread),
        old_logprobs=old,
        rollout_logprobs=old + randn(spread),
        advantages=randn() if token_adv else torch.randn(shape[0], generator=g, dtype=torch.float64),
        mask=mask.to(torch.float64) if float_mask else mask,
        ref_logprobs=old + randn(spread),
        entropy=randn().abs(),
    )
    # Padding holds junk: it must reach neither loss nor gradient.
    for key, junk in (("logprobs", 40.0), ("old_logprobs", -40.0), ("rollout_logprobs", -60.0),
                      ("ref_logprobs", 50.0), ("entropy", float("nan"))):
        batch[key] = batch[key].masked_fill(~mask, junk)
    return batch


def run_both(batch, cfg: dict, bypass=False, num_tokens=None, num_seqs=None):
    """(package loss, package grad, naive loss, naive grad) for one batch and config."""
    config = _config(cfg)

    lp = batch["logprobs"].clone().requires_grad_(True)
    old = None if bypass else batch["old_logprobs"]
    loss, metrics = policy_loss(
        lp, old, batch["rollout_logprobs"], batch["advantages"], batch["mask"], config,
        ref_logprobs=batch["ref_logprobs"], entropy=batch["entropy"],
        num_tokens=num_tokens, num_seqs=num_seqs,
    )
    loss.backward()

    ref_lp = batch["logprobs"].clone().requires_grad_(True)
    as_list = lambda x: None if x is None else x.tolist()  # noqa: E731
    ref_loss = naive_loss(
        ref_lp, as_list(old), as_list(batch["rollout_logprobs"]), batch["advantages"].tolist(),
        [[bool(v) for v in row] for row in batch["mask"].tolist()], cfg,
        ref=as_list(batch["ref_logprobs"]), ent=as_list(batch["entropy"]),
        num_tokens=_val(num_tokens) if num_tokens is not None else None,
        num_seqs=_val(num_seqs) if num_seqs is not None else None,
    )
    if ref_loss.requires_grad:  # not when every remaining token sits on a clipped (constant) branch
        ref_loss.backward()
    return loss, lp.grad, ref_loss, _grad(ref_lp), metrics


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def assert_matches(batch, cfg, **kw):
    loss, grad, ref_loss, ref_grad, _ = run_both(batch, cfg, **kw)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)
    assert torch.all(grad[~batch["mask"].bool()] == 0)


# ----------------------------------------------------------------------------- value and gradient


def _both_sides(values, inside) -> bool:
    return any(inside(v) for v in values) and not all(inside(v) for v in values)


def exercises_every_branch(batch, cfg) -> bool:
    """Whether, on the masked tokens, both sides of the clip and of the correction's cap occur."""
    mask, lp, old, mu = (batch[k].tolist() for k in ("mask", "logprobs", "old_logprobs", "rollout_logprobs"))
    rows = [[t for t in range(T) if mask[b][t]] for b in range(len(mask))]
    rows = [(b, ts) for b, ts in enumerate(rows) if ts]
    lo, hi, floor = 1 - cfg["clip_low"], 1 + cfg["clip_high"], cfg["floor"]
    cap = 5.0 if cfg["correction"] == "icepop" else 2.0
    prox = lp if cfg["loss"] == "pg" else old
    in_clip = lambda r: lo <= r <= hi  # noqa: E731
    if cfg["loss"] in ("ppo_clip", "cispo"):
        ok = _both_sides([math.exp(lp[b][t] - old[b][t]) for b, ts in rows for t in ts], in_clip)
    elif cfg["loss"] == "gspo":
        ok = _both_sides([math.exp(sum(lp[b][t] - old[b][t] for t in ts) / len(ts)) for b, ts in rows], in_clip)
    else:
        ok = True
    token_rho = [math.exp(prox[b][t] - mu[b][t]) for b, ts in rows for t in ts]
    seq_rho = [math.exp(sum(prox[b][t] - mu[b][t] for t in ts)) for b, ts in rows]
    geo_rho = [math.exp(sum(prox[b][t] - mu[b][t] for t in ts) / len(ts)) for b, ts in rows]
    below_cap = lambda r: r <= cap  # noqa: E731
    in_band = lambda r: floor <= r <= cap  # noqa: E731
    corr = cfg["correction"]
    if corr == "token_tis":
        ok &= _both_sides(token_rho, below_cap)
    elif corr == "token_mis":
        ok &= _both_sides(token_rho, in_band)
    elif corr == "seq_tis":
        ok &= _both_sides(seq_rho, below_cap)
    elif corr == "seq_mis":
        ok &= _both_sides(seq_rho, in_band)
    elif corr == "geo_seq_tis":
        ok &= _both_sides(geo_rho, below_cap)
    elif corr == "geo_seq_mis":
        ok &= _both_sides(geo_rho, in_band)
    elif corr == "icepop":
        ok &= _both_sides(token_rho, lambda r: floor <= r <= cap)
    return ok


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("loss", LOSSES)
def test_matrix_matches_naive_loop(loss, correction, agg):
    cfg = dict(loss=loss, correction=correction, agg=agg, clip_low=0.2, clip_high=0.28, floor=0.8)
    base = 1000 * LOSSES.index(loss) + 100 * CORRECTIONS.index(correction) + 10 * AGGS.index(agg)
    # Choose data on which every clip / cap branch is taken, so each comparison covers them all.
    batch = next(b for b in (make_batch(seed=s, spread=0.5) for s in range(base, base + 500))
                 if exercises_every_branch(b, cfg))
    assert_matches(batch, cfg)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("correction", [None, "token_tis", "seq_mis"])
def test_token_advantages_float_mask_bypass(loss, correction):
    batch = make_batch(seed=3, token_adv=True, float_mask=True)
    cfg = dict(loss=loss, correction=correction, agg="seq-mean-token-mean", clip_low=0.1, clip_high=0.3)
    assert_matches(batch, cfg)
    assert_matches(batch, cfg, bypass=True)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("loss", LOSSES)
def test_kl_and_entropy(loss, estimator):
    cfg = dict(loss=loss, correction="token_tis", kl_coef=0.1, kl_estimator=estimator, entropy_coef=0.01,
               clip_low=0.2, clip_high=0.2)
    assert_matches(make_batch(seed=4), cfg)


@pytest.mark.parametrize("agg", AGGS)
def test_dual_clip(agg):
    batch = make_batch(seed=5, token_adv=True, spread=1.0)  # large ratios so the dual clip binds
    cfg = dict(loss="ppo_clip", dual_clip=1.5, agg=agg, clip_low=0.2, clip_high=0.2)
    loss, _, _, _, metrics = run_both(batch, cfg)
    assert_matches(batch, cfg)
    no_dual = run_both(batch, dict(cfg, dual_clip=None))[0]
    assert not torch.isclose(loss, no_dual), "the data must make the dual clip matter"


@pytest.mark.parametrize("correction", ["token_tis", "token_mis", "seq_tis", "seq_mis", "icepop"])
@pytest.mark.parametrize("loss", ["pg", "ppo_clip"])
def test_uncapped_correction(loss, correction):
    """cap = inf is the plain importance weight (pg + seq_tis is the FP16 paper's PG-Seq-IS)."""
    cfg = dict(loss=loss, correction=correction, cap=float("inf"), clip_low=0.2, clip_high=0.2)
    assert_matches(make_batch(seed=6, spread=0.6), cfg)


@pytest.mark.parametrize("correction", [None, "token_tis", "geo_seq_mis"])
@pytest.mark.parametrize("loss", ["pg", "ppo_clip"])
def test_veto_rejects_a_sequence_with_one_unlikely_token(loss, correction):
    """A sequence with any token whose ratio is below τ gets weight 0 (on top of the correction)."""
    cfg = dict(loss=loss, correction=correction, veto=0.5, clip_low=0.2, clip_high=0.2, floor=0.5)

    def partly_vetoed(batch):  # data on which some sequences are vetoed and some are not
        return 0 < float(run_both(batch, cfg)[4]["correction_zeroed_frac"]) < 1

    batch = next(b for b in (make_batch(seed=s, spread=0.4) for s in range(11, 200)) if partly_vetoed(b))
    loss_value = run_both(batch, cfg)[0]
    assert_matches(batch, cfg)
    assert not torch.isclose(loss_value, run_both(batch, dict(cfg, veto=None))[0]), "the veto must bind here"


def test_veto_and_floor_are_checked():
    with pytest.raises(ValueError, match=r"PolicyLossConfig.correction_veto=1.5 is invalid; valid: None or a number in \(0, 1\)"):
        PolicyLossConfig(correction_veto=1.5)
    with pytest.raises(ValueError, match="rollout_logprobs is None but config.correction_veto=0.1 needs it"):
        x = torch.zeros(1, 2)
        policy_loss(x, x, None, torch.ones(1), torch.ones(1, 2, dtype=torch.bool), PolicyLossConfig(correction_veto=0.1))


def test_icepop_floor_and_norm_length():
    cfg = dict(loss="ppo_clip", correction="icepop", cap=1.3, floor=0.7, clip_low=0.2, clip_high=0.2,
               agg="seq-mean-token-sum-norm", norm_length=16)
    assert_matches(make_batch(seed=7, spread=0.5), cfg)


def test_icepop_defaults_to_the_papers_band():
    """IcePop without a band uses [α, β] = [0.5, 5] (Ring-1T); the other corrections keep (0, 2)."""
    assert PolicyLossConfig(correction="icepop").band() == (0.5, 5.0)
    assert PolicyLossConfig(correction="token_mis").band() == (0.0, 2.0)
    assert PolicyLossConfig(correction="icepop", correction_floor=0.8).band() == (0.8, 5.0)
    batch = next(b for b in (make_batch(seed=s, spread=0.9) for s in range(40, 400))
                 if exercises_every_branch(b, dict(loss="ppo_clip", correction="icepop", floor=0.5,
                                                   clip_low=0.2, clip_high=0.2)))
    cfg = dict(loss="ppo_clip", correction="icepop", clip_low=0.2, clip_high=0.2)
    assert_matches(batch, cfg)
    explicit = run_both(batch, dict(cfg, cap=5.0, floor=0.5))[0]
    torch.testing.assert_close(run_both(batch, cfg)[0], explicit, rtol=0, atol=0)


# Bounds that reject some but not all tokens / sequences of make_batch(spread=0.4) data.
REJECTION_BOUNDS = {
    "token_k1": 1.4, "token_k2": 0.08, "token_k3": 0.08,
    "seq_sum_k1": (0.5, 1.8), "seq_sum_k2": 0.25, "seq_sum_k3": 0.25,
    "seq_mean_k1": 1.25, "seq_mean_k2": 0.06, "seq_mean_k3": 0.06,
    "seq_max_k1": (0.55, 1.6), "seq_max_k2": 0.15, "seq_max_k3": 0.15,
}


def _config(cfg: dict) -> PolicyLossConfig:
    fields = dict(cfg)
    for short, full in (("cap", "correction_cap"), ("floor", "correction_floor"), ("veto", "correction_veto"),
                        ("normalize", "correction_normalize")):
        if short in fields:
            fields[full] = fields.pop(short)
    return PolicyLossConfig(**fields)


def _partly(batch, cfg, key) -> bool:
    """Whether the package's metric ``key`` is strictly between 0 and 1 on ``batch``."""
    args = ("logprobs", "old_logprobs", "rollout_logprobs", "advantages", "mask")
    return 0 < float(policy_loss(*(batch[a] for a in args), _config(cfg))[1][key]) < 1


@pytest.mark.parametrize("mode", ["zero", "remove"])
@pytest.mark.parametrize("loss", ["ppo_clip", "pg", "gspo"])
@pytest.mark.parametrize("criterion", sorted(REJECTION_BOUNDS))
def test_rejection_matches_naive_loop(criterion, loss, mode):
    """Each k1/k2/k3 criterion, per token and per sequence (sum/mean/max), zeroing or removing."""
    cfg = dict(loss=loss, correction="token_tis", rejection={criterion: REJECTION_BOUNDS[criterion]},
               rejection_mode=mode, clip_low=0.2, clip_high=0.2, agg="seq-mean-token-mean")
    key = "correction_removed_frac" if mode == "remove" else "correction_zeroed_frac"
    seeds = range(300 * sorted(REJECTION_BOUNDS).index(criterion), 300 * sorted(REJECTION_BOUNDS).index(criterion) + 300)
    batch = next(b for b in (make_batch(seed=s, spread=0.4) for s in seeds) if _partly(b, cfg, key))
    assert_matches(batch, cfg)
    assert not torch.isclose(run_both(batch, cfg)[0], run_both(batch, dict(cfg, rejection=None))[0])


@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("correction", ["token_mis", "seq_mis", "geo_seq_mis", "icepop"])
def test_remove_takes_rejected_tokens_out_of_the_denominators(correction, agg):
    """verl's rejection: the masks' rejected tokens leave the mask, so they count in no denominator."""
    cfg = dict(loss="ppo_clip", correction=correction, floor=0.8, cap=1.3, rejection_mode="remove",
               clip_low=0.2, clip_high=0.2, agg=agg)
    batch = next(b for b in (make_batch(seed=s, spread=0.4) for s in range(900, 1200))
                 if _partly(b, cfg, "correction_removed_frac"))
    assert_matches(batch, cfg)
    zeroed = run_both(batch, dict(cfg, rejection_mode="zero"))[0]
    # Sequence counts change only when whole sequences go; token counts whenever a token does.
    if agg in ("token-mean", "seq-mean-token-mean") or correction in ("seq_mis", "geo_seq_mis"):
        assert not torch.isclose(run_both(batch, cfg)[0], zeroed), "the denominators must change here"


def test_remove_with_pg_decides_on_old_and_needs_it():
    cfg = dict(loss="pg", correction="token_mis", floor=0.8, cap=1.3, rejection_mode="remove",
               clip_low=0.2, clip_high=0.2)
    assert_matches(make_batch(seed=21, spread=0.4), cfg)
    with pytest.raises(ValueError, match="rejection_mode='remove' decides on π_old.*loss='pg'.*bypass"):
        run_both(make_batch(seed=21), cfg, bypass=True)


@pytest.mark.parametrize("mode", ["zero", "remove"])
@pytest.mark.parametrize("correction", ["token_tis", "seq_tis", "geo_seq_mis", "icepop"])
@pytest.mark.parametrize("loss", ["ppo_clip", "pg"])
def test_batch_normalized_weights(loss, correction, mode):
    """Weights divided by their batch mean (tokens, or sequences for sequence weights) average 1."""
    cfg = dict(loss=loss, correction=correction, normalize=True, rejection_mode=mode, floor=0.8,
               clip_low=0.2, clip_high=0.2)
    batch = make_batch(seed=22, spread=0.4)
    assert_matches(batch, cfg)
    metrics = run_both(batch, cfg)[4]
    if correction in ("token_tis", "icepop"):  # token weights: their mean over the loss's tokens is 1
        assert metrics["correction_weight_mean"].item() == pytest.approx(1.0, rel=1e-12)


def test_normalization_with_the_steps_mean_splits_into_micro_batches():
    """Micro-batches given the whole batch's weight mean and denominators sum to the full loss."""
    from megatron_rlfp16.losses.correction import rollout_weights, weight_sums

    batch = make_batch(seed=23, spread=0.4)
    config = PolicyLossConfig(loss="ppo_clip", correction="seq_tis", correction_cap=1.5, correction_normalize=True)
    args = ("logprobs", "old_logprobs", "rollout_logprobs", "advantages", "mask")
    full, _ = policy_loss(*(batch[a] for a in args), config)
    halves = [slice(0, 2), slice(2, B)]
    mask = batch["mask"]
    log_rho = (batch["old_logprobs"] - batch["rollout_logprobs"]).masked_fill(~mask, 0)
    sums = sum(weight_sums(rollout_weights(log_rho[h], mask[h], config)[0], mask[h], True) for h in halves)
    mean = sums[0] / sums[1]
    n_tok, n_seq = mask.sum(), (mask.sum(-1) > 0).sum()
    parts = sum(policy_loss(*(batch[a][h] for a in args), config, num_tokens=n_tok, num_seqs=n_seq,
                            weight_mean=mean)[0] for h in halves)
    torch.testing.assert_close(parts, full)
    local = sum(policy_loss(*(batch[a][h] for a in args), config, num_tokens=n_tok, num_seqs=n_seq)[0]
                for h in halves)
    assert not torch.isclose(local, full), "each half's own mean must differ from the batch's here"


@pytest.mark.parametrize("agg", AGGS)
def test_explicit_global_denominators(agg):
    """Micro-batches with the global denominators sum to the full-batch loss; local ones do not."""
    batch = make_batch(seed=8)
    cfg = dict(loss="ppo_clip", correction="token_tis", agg=agg, clip_low=0.2, clip_high=0.2)
    for num_tokens, num_seqs in ((100, 9), (torch.tensor(37.0, dtype=torch.float64), torch.tensor(6))):
        assert_matches(batch, cfg, num_tokens=num_tokens, num_seqs=num_seqs)

    config = PolicyLossConfig(**cfg)
    args = ("logprobs", "old_logprobs", "rollout_logprobs", "advantages", "mask")
    full, _ = policy_loss(*(batch[a] for a in args), config)
    mask = batch["mask"]
    n_tok, n_seq = mask.sum(), (mask.sum(-1) > 0).sum()
    halves = [slice(0, 1), slice(1, B)]  # unequal halves: 7 vs 9 tokens, 1 vs 3 sequences
    glob = sum(policy_loss(*(batch[a][s] for a in args), config, num_tokens=n_tok, num_seqs=n_seq)[0]
               for s in halves)
    local = sum(policy_loss(*(batch[a][s] for a in args), config)[0] for s in halves)
    torch.testing.assert_close(glob, full)
    assert not torch.isclose(local / 2, full)


# ----------------------------------------------------------------------------- metrics and numerics


def test_metrics_match_naive_counts():
    batch = make_batch(seed=9, spread=0.5)
    mask = batch["mask"]
    config = PolicyLossConfig(loss="ppo_clip", correction="token_mis", clip_low=0.2, clip_high=0.2, dual_clip=1.1)
    _, metrics = policy_loss(
        batch["logprobs"], batch["old_logprobs"], batch["rollout_logprobs"], batch["advantages"], mask,
        config, ref_logprobs=batch["ref_logprobs"], entropy=batch["entropy"],
    )
    ratios, clipped, lower, weights, kls, ents = [], [], [], [], [], []
    for b in range(B):
        a = batch["advantages"][b].item()
        for t in range(T):
            if not mask[b, t]:
                continue
            r = math.exp(batch["logprobs"][b, t].item() - batch["old_logprobs"][b, t].item())
            ratios.append(r)
            clipped.append(-a * min(max(r, 0.8), 1.2) > -a * r)
            lower.append(a < 0 and max(-a * r, -a * min(max(r, 0.8), 1.2)) > -1.1 * a)  # the dual clip binds
            rho = math.exp(batch["old_logprobs"][b, t].item() - batch["rollout_logprobs"][b, t].item())
            weights.append(rho if rho <= 2.0 else 0.0)
            d = batch["logprobs"][b, t].item() - batch["ref_logprobs"][b, t].item()
            kls.append(math.exp(-d) - 1 + d)
            ents.append(batch["entropy"][b, t].item())
    n = len(ratios)
    expected = {
        "clip_frac": sum(clipped) / n, "lower_clip_frac": sum(lower) / n, "correction_removed_frac": 0.0,
        "ratio_mean": sum(ratios) / n, "ratio_max": max(ratios),
        "correction_weight_mean": sum(weights) / n, "correction_weight_max": max(weights),
        "correction_zeroed_frac": sum(w == 0 for w in weights) / n, "kl": sum(kls) / n,
        "entropy": sum(ents) / n,
    }
    assert 0 < expected["clip_frac"] < 1 and 0 < expected["correction_zeroed_frac"] < 1
    assert 0 < expected["lower_clip_frac"] < 1
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert isinstance(metrics[key], torch.Tensor) and metrics[key].dim() == 0, key
        assert not metrics[key].requires_grad, key
        assert metrics[key].item() == pytest.approx(value, rel=1e-10), key


def test_huge_sequence_ratio_stays_finite():
    """A sequence log-ratio far past exp's range gives weight C (TIS) or 0 (MIS), never inf or NaN."""
    batch = make_batch(seed=10)
    batch["rollout_logprobs"] = batch["rollout_logprobs"] - 500.0 * batch["mask"].double()
    for correction, expected in (("seq_tis", 2.0), ("seq_mis", 0.0)):
        config = PolicyLossConfig(loss="pg", correction=correction)
        lp = batch["logprobs"].float().requires_grad_(True)
        loss, metrics = policy_loss(lp, None, batch["rollout_logprobs"].float(), batch["advantages"].float(),
                                    batch["mask"], config)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all()
        assert metrics["correction_weight_max"].item() == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_float32(dtype):
    batch = make_batch(seed=11)
    lp = batch["logprobs"].to(dtype).requires_grad_(True)
    config = PolicyLossConfig(loss="gspo", correction="seq_tis")
    loss, metrics = policy_loss(lp, batch["old_logprobs"].to(dtype), batch["rollout_logprobs"].to(dtype),
                                batch["advantages"].to(dtype), batch["mask"], config)
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == dtype
    assert all(v.dtype == torch.float32 for v in metrics.values())


def test_fully_padded_batch_gives_zero_loss():
    batch = make_batch(seed=12, lengths=[0, 0])
    for agg in AGGS:
        config = PolicyLossConfig(loss="gspo", correction="seq_mis", agg=agg)
        lp = batch["logprobs"].clone().requires_grad_(True)
        loss, metrics = policy_loss(lp, batch["old_logprobs"], batch["rollout_logprobs"], batch["advantages"],
                                    batch["mask"], config)
        loss.backward()
        assert loss.item() == 0 and torch.all(lp.grad == 0)
        assert all(torch.isfinite(v) for v in metrics.values())


def test_package_imports_no_megatron():
    code = ("import sys, megatron_rlfp16.losses; "
            "bad = [m for m in sys.modules if m == 'megatron' or m.startswith('megatron.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- advantages


def test_advantages_known_example():
    rewards = torch.tensor([1, 0, 0, 1, 1, 1, 1, 1])
    k = 0.5 / math.sqrt(1 / 3)  # group 1: mean 0.5, unbiased std sqrt(1/3)
    torch.testing.assert_close(compute_advantages(rewards, 4), torch.tensor([k, -k, -k, k, 0, 0, 0, 0]))
    torch.testing.assert_close(compute_advantages(rewards, 4, "drgrpo"),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    torch.testing.assert_close(compute_advantages(rewards, 4, "rloo"),
                               torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))


@pytest.mark.parametrize("group_size", [2, 3, 6])
def test_advantages_match_hand_loops(group_size):
    rewards = torch.randn(12, generator=torch.Generator().manual_seed(group_size), dtype=torch.float64)
    values, eps = rewards.tolist(), 1e-6
    grpo, drgrpo, rloo = [], [], []
    for start in range(0, len(values), group_size):
        group = values[start:start + group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        for i, r in enumerate(group):
            grpo.append((r - mean) / (std + eps))
            drgrpo.append(r - mean)
            rloo.append(r - sum(group[j] for j in range(group_size) if j != i) / (group_size - 1))
    for name, expected in (("grpo", grpo), ("drgrpo", drgrpo), ("rloo", rloo)):
        got = compute_advantages(rewards, group_size, name, eps=eps)
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kwargs, words", [
    (dict(rewards=torch.zeros(6), group_size=4), ["N=6", "group_size=4"]),
    (dict(rewards=torch.zeros(4), group_size=1), ["grpo", "group_size=1"]),
    (dict(rewards=torch.zeros(4), group_size=1, estimator="rloo"), ["rloo", "group_size=1"]),
    (dict(rewards=torch.zeros(4), group_size=2, estimator="ppo"), ["'ppo'", "drgrpo", "grpo", "rloo"]),
    (dict(rewards=torch.zeros(2, 2), group_size=2), ["1-D", "(2, 2)"]),
    (dict(rewards=torch.zeros(4), group_size=0), ["group_size", "0"]),
])
def test_advantages_errors(kwargs, words):
    with pytest.raises(ValueError) as err:
        compute_advantages(**kwargs)
    for word in words:
        assert word in str(err.value)


# ----------------------------------------------------------------------------- config and input errors


@pytest.mark.parametrize("field, value, words", [
    ("loss", "ppo", ["ppo_clip", "gspo", "pg", "cispo"]),
    ("correction", "tis", ["token_tis", "seq_mis", "icepop"]),
    ("agg", "mean", ["token-mean", "seq-mean-token-sum-norm"]),
    ("kl_estimator", "k4", ["k1", "k2", "k3"]),
    ("correction_cap", 0.0, ["> 0"]),
    ("correction_cap", -1.0, ["> 0"]),
    ("correction_cap", float("nan"), ["> 0"]),
    ("clip_low", -0.1, ["clip_low < 1"]),
    ("clip_low", 1.0, ["clip_low < 1"]),
    ("clip_high", -0.1, [">= 0"]),
    ("dual_clip", 1.0, ["> 1"]),
    ("dual_clip", 0.5, ["> 1"]),
    ("norm_length", 0, ["> 0"]),
    ("correction_floor", -0.1, ["0 <= correction_floor <= the cap"]),
    ("correction_floor", 3.0, ["the cap (= 2.0)"]),
    ("rejection", {"seq_mean_k4": 0.1}, ["'seq_mean_k4'", "token_k1", "seq_max_k3"]),
    ("rejection", {"token_k2": -1.0}, ["rejection['token_k2']=-1.0", "an upper bound > 0"]),
    ("rejection", {"token_k3": (0.1, 0.2)}, ["rejection['token_k3']=(0.1, 0.2)", "one number"]),
    ("rejection", {"token_k1": 0.5}, ["rejection['token_k1']=0.5", "U >= 1", "(L, U)"]),
    ("rejection", {"seq_sum_k1": (2.0, 1.0)}, ["rejection['seq_sum_k1']=(2.0, 1.0)", "0 <= L <= U"]),
    ("rejection", {}, ["non-empty mapping"]),
    ("rejection_mode", "drop", ["'zero'", "'remove'"]),
    ("correction_normalize", "yes", ["True or False"]),
])
def test_config_errors_name_field_and_value(field, value, words):
    with pytest.raises(ValueError) as err:
        PolicyLossConfig(**{field: value})
    message = str(err.value)
    assert f"PolicyLossConfig.{field}" in message
    shown = [repr(x) for item in value.items() for x in item] if isinstance(value, dict) else [repr(value)]
    assert all(text in message for text in shown), message
    for word in words:
        assert word in message


def test_config_accepts_infinite_cap_and_is_keyword_only():
    PolicyLossConfig(correction="seq_tis", correction_cap=float("inf"), correction_floor=5.0)
    with pytest.raises(TypeError):
        PolicyLossConfig("ppo_clip")  # noqa
    config = PolicyLossConfig()
    config.agg = "nope"
    with pytest.raises(ValueError, match="agg"):
        config.validate()


def _call(**overrides):
    batch = make_batch(seed=13)
    kwargs = dict(logprobs=batch["logprobs"], old_logprobs=batch["old_logprobs"],
                  rollout_logprobs=batch["rollout_logprobs"], advantages=batch["advantages"],
                  mask=batch["mask"], config=PolicyLossConfig())
    kwargs.update(overrides)
    return policy_loss(**kwargs)


@pytest.mark.parametrize("name", ["old_logprobs", "rollout_logprobs", "mask", "ref_logprobs", "entropy"])
def test_shape_mismatch_names_argument_and_shapes(name):
    with pytest.raises(ValueError) as err:
        _call(**{name: torch.zeros(B, T + 1)})
    assert name in str(err.value) and f"({B}, {T + 1})" in str(err.value) and f"({B}, {T})" in str(err.value)


@pytest.mark.parametrize("shape", [(B + 1,), (B, T + 1), (B, T, 1)])
def test_bad_advantages_shape(shape):
    with pytest.raises(ValueError) as err:
        _call(advantages=torch.zeros(shape))
    assert "advantages" in str(err.value) and str(tuple(shape)) in str(err.value)


@pytest.mark.parametrize("overrides, words", [
    (dict(logprobs=torch.zeros(T)), ["logprobs", f"({T},)"]),
    (dict(rollout_logprobs=None, config=PolicyLossConfig(correction="token_tis")), ["rollout_logprobs", "token_tis"]),
    (dict(rollout_logprobs=None, old_logprobs=None), ["rollout_logprobs", "old_logprobs"]),
    (dict(config=PolicyLossConfig(kl_coef=0.1)), ["ref_logprobs", "kl_coef"]),
    (dict(config=PolicyLossConfig(entropy_coef=0.1)), ["entropy", "entropy_coef"]),
    (dict(num_tokens=0), ["num_tokens", "0"]),
    (dict(num_seqs=-2), ["num_seqs", "-2"]),
    (dict(num_seqs=torch.ones(2)), ["num_seqs", "(2,)"]),
])
def test_missing_or_bad_arguments(overrides, words):
    with pytest.raises(ValueError) as err:
        _call(**overrides)
    for word in words:
        assert word in str(err.value)


def test_rollout_logprobs_optional_without_correction():
    loss, _ = _call(rollout_logprobs=None)
    assert torch.isfinite(loss)


# ----------------------------------------------------------------------------- registry


@register_policy_loss("test_neg_logprob", proximal="current")
def _neg_logprob(logprobs, old_logprobs, advantages, mask, config):
    return PolicyTerms(-logprobs, torch.ones_like(logprobs), torch.zeros_like(mask))


@register_correction("test_half")
def _half(log_rho, mask, config):
    return torch.full_like(log_rho, 0.5)


def test_registered_extensions_are_valid_config_values():
    batch = make_batch(seed=14)
    config = PolicyLossConfig(loss="test_neg_logprob", correction="test_half", agg="seq-mean-token-sum")
    loss, _ = policy_loss(batch["logprobs"], None, batch["rollout_logprobs"], batch["advantages"],
                          batch["mask"], config)
    mask = batch["mask"]
    expected = -0.5 * batch["logprobs"][mask].sum() / (mask.sum(-1) > 0).sum()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("register, name", [
    (register_policy_loss, "ppo_clip"), (register_correction, "seq_tis"), (register_policy_loss, "test_neg_logprob"),
])
def test_duplicate_registration_raises(register, name):
    with pytest.raises(ValueError, match="already registered"):
        register(name)(lambda *a: None)


def test_unknown_registry_name_lists_valid():
    with pytest.raises(ValueError) as err:
        PolicyLossConfig(loss="test_missing")
    assert "test_neg_logprob" in str(err.value) and "cispo" in str(err.value)
    with pytest.raises(ValueError, match="proximal"):
        register_policy_loss("test_bad_proximal", proximal="ref")
