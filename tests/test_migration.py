"""Every row of docs/losses.md's migration table ("Coming from verl, slime, NeMo-RL or TRL") checked.

Each row's id maps to a check below. Where a row maps a formula, the check writes the other
framework's formula out with Python loops and compares it with what the mapped config computes;
where it maps a name, the check parses the flags the row gives and compares the config fields. A row
without a check (or a check without a row) fails ``test_every_row_has_a_check``.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import re
import sys

import pytest
import torch

from megatron_rlfp16.losses import PolicyLossConfig, compute_advantages, policy_loss
from megatron_rlfp16.losses.correction import rollout_weights
from megatron_rlfp16.losses.registry import AGGREGATIONS, KL_ESTIMATORS
from megatron_rlfp16.losses.shaping import overlong_penalty
from megatron_rlfp16.megatron import add_rl_args, loss_config_from_args, rl_config_from_args


ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| ([^|]+) \|")
B, T = 6, 9
LENGTHS = [9, 4, 7, 1, 6, 3]


def rows() -> list:
    text = (ROOT / "docs" / "losses.md").read_text(encoding="utf-8")
    section = text.split("## Coming from verl, slime, NeMo-RL or TRL", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in map(ROW.match, section.splitlines()) if m]


def rl(argv):
    parser = add_rl_args(argparse.ArgumentParser())
    return rl_config_from_args(parser.parse_args(argv))


def loss_cfg(argv) -> PolicyLossConfig:
    return loss_config_from_args(add_rl_args(argparse.ArgumentParser()).parse_args(argv))


def batch(seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = -1.0 - torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.tensor([[t < n for t in range(T)] for n in LENGTHS])
    return dict(
        lp=old + spread * torch.randn(B, T, generator=g, dtype=torch.float64),
        old=old, mu=old + spread * torch.randn(B, T, generator=g, dtype=torch.float64),
        adv=torch.randn(B, generator=g, dtype=torch.float64), mask=mask,
    )


def ours(data, config, **kw):
    loss, metrics = policy_loss(data["lp"], data["old"], data["mu"], data["adv"], data["mask"], config, **kw)
    return loss.item(), metrics


def masked(data):
    """[(b, [t...])] of the rows and their tokens."""
    return [(b, [t for t in range(T) if data["mask"][b, t]]) for b in range(B)]


def ppo_token(data, b, t, lo=0.2, hi=0.2, dual=None):
    """One token's PPO loss as verl's compute_policy_loss writes it (dual clip for A < 0)."""
    a = data["adv"][b].item()
    r = math.exp(data["lp"][b, t].item() - data["old"][b, t].item())
    loss1 = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
    if dual is not None and a < 0:
        return min(loss1, -a * dual)
    return loss1


def token_mean(values_by_row):
    flat = [v for row in values_by_row for v in row]
    return sum(flat) / len(flat)


def seq_mean_token_mean(values_by_row):
    rows_ = [row for row in values_by_row if row]
    return sum(sum(r) / len(r) for r in rows_) / len(rows_)


# ----------------------------------------------------------------------------- checks


def check_clip_flags(row):
    argv = {"verl-clip": ["--rl-clip-low", "0.2", "--rl-clip-high", "0.28"],
            "slime-clip": ["--rl-clip-low", "0.2", "--rl-clip-high", "0.28", "--rl-dual-clip", "3"],
            "nemo-clip": ["--rl-clip-low", "0.2", "--rl-clip-high", "0.28", "--rl-dual-clip", "3"],
            "trl-clip": ["--rl-clip-low", "0.2", "--rl-clip-high", "0.28"]}[row]
    cfg = loss_cfg(argv)
    assert (cfg.clip_low, cfg.clip_high) == (0.2, 0.28)
    if "--rl-dual-clip" in argv:
        assert cfg.dual_clip == 3.0
    data = batch(seed=1)  # the asymmetric clip against the hand-written one
    want = token_mean([[ppo_token(data, b, t, 0.2, 0.28, cfg.dual_clip) for t in ts] for b, ts in masked(data)])
    assert ours(data, cfg)[0] == pytest.approx(want, rel=1e-12)


def check_verl_dual_clip(row):
    data = batch(seed=2, spread=1.0)  # large ratios: the dual clip binds
    want = token_mean([[ppo_token(data, b, t, dual=3.0) for t in ts] for b, ts in masked(data)])
    assert ours(data, PolicyLossConfig(dual_clip=3.0))[0] == pytest.approx(want, rel=1e-12)
    assert ours(data, PolicyLossConfig())[0] != pytest.approx(want, rel=1e-6), "the default here has no dual clip"


def check_agg(row):
    data = batch(seed=3)
    per = [[ppo_token(data, b, t) for t in ts] for b, ts in masked(data)]
    n_seqs = sum(1 for r in per if r)
    expected = {
        "token-mean": token_mean(per),
        "seq-mean-token-mean": seq_mean_token_mean(per),
        "seq-mean-token-sum": sum(map(sum, per)) / n_seqs,
        "seq-mean-token-sum-norm": sum(map(sum, per)) / (n_seqs * 32),  # TRL's dr_grpo: / (B · L_max)
    }
    if row in ("verl-agg",):
        assert set(expected) <= set(AGGREGATIONS.names())
        names = list(expected)
    elif row in ("slime-agg", "nemo-agg"):
        names = ["token-mean", "seq-mean-token-mean"]
    else:  # trl-loss-type: grpo, dr_grpo, dapo
        names = ["seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean"]
    for name in names:
        got = ours(data, PolicyLossConfig(agg=name, norm_length=32.0))[0]
        assert got == pytest.approx(expected[name], rel=1e-12), name


def check_k3(row):
    """verl's low_var_kl, NeMo-RL's and TRL's KL penalty: exp(ref − lp) − (ref − lp) − 1 per token."""
    delta = torch.linspace(-3, 3, 13, dtype=torch.float64)  # Δ = lp − ref, inside verl's clamp
    want = [math.exp(-d) - (-d) - 1 for d in delta.tolist()]
    assert KL_ESTIMATORS.get("k3")(delta).tolist() == pytest.approx(want, rel=1e-12, abs=1e-15)
    argv = {"verl-kl": ["--rl-kl-coef", "0.001", "--rl-kl-estimator", "k3"],
            "nemo-kl": ["--rl-kl-coef", "0.01"], "trl-beta": ["--rl-kl-coef", "0.04"]}[row]
    cfg = loss_cfg(argv)
    assert cfg.kl_estimator == "k3" and cfg.kl_coef == float(argv[1])


def check_slime_kl(row):
    delta = torch.linspace(-2, 2, 9, dtype=torch.float64)
    for name, fn in (("k1", lambda d: d), ("k2", lambda d: d * d / 2), ("k3", lambda d: math.exp(-d) - 1 + d)):
        assert KL_ESTIMATORS.get(name)(delta).tolist() == pytest.approx([fn(d) for d in delta.tolist()], abs=1e-15)
        assert loss_cfg(["--rl-kl-coef", "0.01", "--rl-kl-estimator", name]).kl_estimator == name


def check_entropy(row):
    assert loss_cfg(["--rl-entropy-coef", "0.001"]).entropy_coef == 0.001


def check_advantages(row):
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.25], dtype=torch.float64)
    groups = [rewards[i:i + 4].tolist() for i in (0, 4)]

    def grpo(g):
        m = sum(g) / len(g)
        std = math.sqrt(sum((x - m) ** 2 for x in g) / (len(g) - 1))  # torch.std: unbiased
        return [(x - m) / (std + 1e-6) for x in g]

    naive = {"grpo": grpo, "drgrpo": lambda g: [x - sum(g) / len(g) for x in g],
             "rloo": lambda g: [x - (sum(g) - x) / (len(g) - 1) for x in g]}
    names = {"verl-adv": ["grpo", "rloo", "drgrpo"], "slime-drgrpo": ["drgrpo"], "trl-scale": ["drgrpo"],
             "nemo-loo": ["rloo"]}[row]
    for name in names:
        want = [a for g in groups for a in naive[name](g)]
        assert compute_advantages(rewards, 4, name).tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert rl(["--rl-advantage-estimator", name]).advantage_estimator == name


def check_group_size(row):
    assert rl(["--rl-group-size", "16"]).group_size == 16


def _rho(data, b, t):
    return math.exp(data["old"][b, t].item() - data["mu"][b, t].item())


def _weights(data, config):
    log_rho = (data["old"] - data["mu"]).masked_fill(~data["mask"], 0.0)
    return rollout_weights(log_rho, data["mask"], config)[0]


def check_is_weights(row):
    """Token / sequence, truncated / masked importance weights against their formulas."""
    data = batch(seed=4, spread=0.4)
    cap = 1.5

    def seq(b, ts):
        return math.prod(_rho(data, b, t) for t in ts)

    forms = {
        "token_tis": lambda b, t, ts: min(_rho(data, b, t), cap),
        "token_mis": lambda b, t, ts: _rho(data, b, t) if _rho(data, b, t) <= cap else 0.0,
        "seq_tis": lambda b, t, ts: min(seq(b, ts), cap),
        "seq_mis": lambda b, t, ts: seq(b, ts) if seq(b, ts) <= cap else 0.0,
    }
    names = {"verl-rollout-is": ["token_tis", "seq_tis"], "slime-tis": ["token_tis"],
             "trl-vllm-is": list(forms)}[row]
    for name in names:
        config = loss_cfg(["--rl-correction", name, "--rl-correction-cap", str(cap)])
        got = _weights(data, config)
        for b, ts in masked(data):
            for t in ts:
                assert got[b, t].item() == pytest.approx(forms[name](b, t, ts), rel=1e-12), (name, b, t)
    if row == "nemo-is":
        raise AssertionError("nemo-is has its own check")


def check_nemo_is(row):
    """NeMo-RL's correction multiplies each token's loss by the uncapped π_old / μ."""
    data = batch(seed=5, spread=0.4)
    config = PolicyLossConfig(correction="token_tis", correction_cap=float("inf"))
    want = token_mean([[_rho(data, b, t) * ppo_token(data, b, t) for t in ts] for b, ts in masked(data)])
    assert ours(data, config)[0] == pytest.approx(want, rel=1e-12)


def _k(x, est):
    return {"k1": x, "k2": x * x / 2, "k3": math.exp(x) - 1 - x}[est]


def check_verl_rs(row):
    """token_k1 in [0.5, 2] and seq_mean_k3 <= 0.02, the rejected tokens out of the token-mean."""
    config = loss_cfg(["--rl-rejection", "token_k1=0.5_2.0,seq_mean_k3=0.02", "--rl-rejection-mode", "remove"])
    assert config.rejection == {"token_k1": (0.5, 2.0), "seq_mean_k3": 0.02} and config.rejection_mode == "remove"
    data = batch(seed=6, spread=0.3)
    kept = []
    for b, ts in masked(data):
        log_rhos = [math.log(_rho(data, b, t)) for t in ts]
        seq_ok = bool(ts) and sum(_k(x, "k3") for x in log_rhos) / len(ts) <= 0.02
        kept.append([t for t, x in zip(ts, log_rhos) if seq_ok and 0.5 <= math.exp(x) <= 2.0])
    total = sum(len(ts) for _, ts in masked(data))
    assert 0 < sum(map(len, kept)) < total, "the data must reject some tokens and keep others"
    want = token_mean([[ppo_token(data, b, t) for t in ts] for b, ts in enumerate(kept)])
    assert ours(data, config)[0] == pytest.approx(want, rel=1e-12)


def check_verl_seq_mis(row):
    """Sequences with Π ρ outside [1/C, C] leave the loss; the others are weighted by Π ρ."""
    cap = 1.6
    data = batch(seed=7, spread=0.25)
    config = PolicyLossConfig(correction="seq_mis", correction_cap=cap, correction_floor=1 / cap,
                              rejection_mode="remove")
    per, dropped = [], 0
    for b, ts in masked(data):
        rho = math.prod(_rho(data, b, t) for t in ts)
        if 1 / cap <= rho <= cap:
            per.append([rho * ppo_token(data, b, t) for t in ts])
        else:
            dropped += 1
    assert 0 < dropped < B, "the data must drop some sequences and keep others"
    want = token_mean(per)
    assert ours(data, config)[0] == pytest.approx(want, rel=1e-12)
    default = PolicyLossConfig(correction="seq_mis", correction_cap=cap)
    assert default.band() == (0.0, cap) and default.rejection_mode == "zero"
    assert ours(data, default)[0] != pytest.approx(want, rel=1e-6)


def check_veto(row):
    tau = 0.7
    data = batch(seed=8, spread=0.3)
    config = loss_cfg(["--rl-correction-veto", str(tau)])
    want = token_mean([[0.0 if any(_rho(data, b, u) < tau for u in ts) else ppo_token(data, b, t) for t in ts]
                       for b, ts in masked(data)])
    assert ours(data, config)[0] == pytest.approx(want, rel=1e-12)


def check_batch_norm(row):
    data = batch(seed=9, spread=0.3)
    config = loss_cfg(["--rl-correction", "token_tis", "--rl-correction-normalize", "true"])
    weights = [[min(_rho(data, b, t), 2.0) for t in ts] for b, ts in masked(data)]
    mean = token_mean(weights)
    want = token_mean([[w / mean * ppo_token(data, b, t) for w, t in zip(ws, ts)]
                       for (b, ts), ws in zip(masked(data), weights)])
    loss, metrics = ours(data, config)
    assert loss == pytest.approx(want, rel=1e-12)
    assert metrics["correction_weight_mean"].item() == pytest.approx(1.0, rel=1e-12)


def check_bypass(row):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import grpo_train

    parser = grpo_train.build_parser()
    assert parser.parse_args(["--hf-dir", "x", "--no-recompute-old-logprobs"]).recompute_old_logprobs is False
    assert parser.parse_args(["--hf-dir", "x"]).recompute_old_logprobs is True
    data = batch(seed=10)  # bypass: the ratio is taken against μ
    bypassed = policy_loss(data["lp"], None, data["mu"], data["adv"], data["mask"], PolicyLossConfig())[0]
    as_old = policy_loss(data["lp"], data["mu"], data["mu"], data["adv"], data["mask"], PolicyLossConfig())[0]
    assert bypassed.item() == as_old.item()


def check_clipfrac(row):
    data = batch(seed=11, spread=2.0)  # ratios above 3 on negative advantages
    _, metrics = ours(data, PolicyLossConfig(dual_clip=3.0))
    clipped, lower, n = 0, 0, 0
    for b, ts in masked(data):
        a = data["adv"][b].item()
        for t in ts:
            r = math.exp(data["lp"][b, t].item() - data["old"][b, t].item())
            first = max(-a * r, -a * min(max(r, 0.8), 1.2))
            clipped += -a * min(max(r, 0.8), 1.2) > -a * r  # verl's pg_clipfrac
            lower += a < 0 and first > -a * 3.0  # verl's pg_clipfrac_lower
            n += 1
    assert lower > 0
    assert metrics["clip_frac"].item() == pytest.approx(clipped / n)
    assert metrics["lower_clip_frac"].item() == pytest.approx(lower / n)


def check_dynamic_sampling(row):
    cfg = rl(["--rl-dynamic-sampling", "true", "--rl-dynamic-sampling-rounds", "9"])  # their N = 10
    assert cfg.dynamic_sampling is True and cfg.dynamic_sampling_rounds == 9


def check_overlong(row):
    """DAPO's R_length, as verl's and NeMo-RL's overlong buffer compute it."""
    max_len, buffer, factor = 20, 8, 0.5
    cfg = rl(["--rl-overlong-buffer", str(buffer), "--rl-overlong-penalty", str(factor)])
    assert (cfg.overlong_buffer, cfg.overlong_penalty) == (buffer, factor)
    lengths = list(range(0, 24))
    expected_start = max_len - buffer
    want = [factor * (0.0 if n <= expected_start else -1.0 if n > max_len else (expected_start - n) / buffer)
            for n in lengths]
    got = overlong_penalty(torch.tensor(lengths), max_len=max_len, buffer=buffer, factor=factor).tolist()
    assert got == pytest.approx(want, abs=1e-15)


def check_routing(row):
    assert rl(["--rl-routing-replay", "r2"]).routing_replay == "r2"
    assert rl(["--rl-routing-replay", "r3"]).routing_replay == "r3"


def check_gspo(row):
    assert loss_cfg(["--rl-loss", "gspo"]).loss == "gspo"
    data = batch(seed=12, spread=0.1)
    per = []
    for b, ts in masked(data):  # TRL's sequence level: the length-normalized log-ratio, clipped
        s = math.exp(sum(data["lp"][b, t].item() - data["old"][b, t].item() for t in ts) / len(ts))
        a = data["adv"][b].item()
        per.append([max(-a * s, -a * min(max(s, 0.8), 1.2)) for _ in ts])
    assert ours(data, PolicyLossConfig(loss="gspo"))[0] == pytest.approx(token_mean(per), rel=1e-12)


def check_gae(row):
    """verl's compute_gae_advantage_return on full-length responses, written out; the flags."""
    argv = ["--rl-advantage-estimator", "gae", "--rl-gamma", "0.99", "--rl-lam", "0.95"]
    cfg = rl(argv)
    assert (cfg.advantage_estimator, cfg.gamma, cfg.lam) == ("gae", 0.99, 0.95)
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import grpo_train

    from megatron_rlfp16.cli import critic_config_from_args
    from megatron_rlfp16.losses.value import gae

    args = grpo_train.build_parser().parse_args(["--hf-dir", "x", *argv, "--critic-value-clip", "0.5"])
    assert critic_config_from_args(args).value_clip == 0.5
    g = torch.Generator().manual_seed(13)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    want = torch.zeros(3, 5, dtype=torch.float64)
    for b in range(3):
        last = 0.0
        for t in reversed(range(5)):
            nxt = values[b, t + 1].item() if t < 4 else 0.0
            delta = rewards[b, t].item() + 0.99 * nxt - values[b, t].item()
            last = delta + 0.99 * 0.95 * last
            want[b, t] = last
    adv, ret = gae(rewards, values, torch.ones(3, 5, dtype=torch.bool), 0.99, 0.95)
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, want + values, rtol=1e-12, atol=1e-12)


def check_kl_in_reward(row):
    """verl's apply_kl_penalty with kl_penalty='kl': token_level_rewards = scores − β·(old − ref)."""
    from megatron_rlfp16.losses.value import kl_penalized

    cfg = rl(["--rl-advantage-estimator", "gae", "--rl-kl-in-reward", "0.05"])
    assert cfg.kl_in_reward == 0.05
    data = batch(seed=14)
    scores = torch.randn(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = kl_penalized(scores, data["old"], data["mu"], data["mask"], 0.05)
    for b, ts in masked(data):
        for t in ts:
            want = scores[b, t].item() - 0.05 * (data["old"][b, t].item() - data["mu"][b, t].item())
            assert got[b, t].item() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="only the 'gae' estimator uses"):
        rl(["--rl-kl-in-reward", "0.05"])


def check_mask_truncated(row):
    assert rl(["--rl-mask-truncated", "true"]).mask_truncated is True


CHECKS = {
    "verl-clip": check_clip_flags, "slime-clip": check_clip_flags, "nemo-clip": check_clip_flags,
    "trl-clip": check_clip_flags,
    "verl-dual-clip": check_verl_dual_clip,
    "verl-agg": check_agg, "slime-agg": check_agg, "nemo-agg": check_agg, "trl-loss-type": check_agg,
    "verl-kl": check_k3, "nemo-kl": check_k3, "trl-beta": check_k3, "slime-kl": check_slime_kl,
    "verl-entropy": check_entropy,
    "verl-adv": check_advantages, "slime-drgrpo": check_advantages, "trl-scale": check_advantages,
    "nemo-loo": check_advantages,
    "verl-group": check_group_size, "slime-n": check_group_size, "nemo-n": check_group_size,
    "trl-n": check_group_size,
    "verl-rollout-is": check_is_weights, "slime-tis": check_is_weights, "trl-vllm-is": check_is_weights,
    "nemo-is": check_nemo_is,
    "verl-rs": check_verl_rs, "verl-seq-mis": check_verl_seq_mis, "verl-veto": check_veto,
    "verl-batch-norm": check_batch_norm,
    "verl-bypass": check_bypass, "slime-bypass": check_bypass,
    "verl-clipfrac": check_clipfrac,
    "verl-filter-groups": check_dynamic_sampling, "nemo-dynamic": check_dynamic_sampling,
    "verl-overlong": check_overlong, "nemo-overlong": check_overlong,
    "slime-routing": check_routing,
    "trl-seq-level": check_gspo,
    "trl-mask-truncated": check_mask_truncated,
    "verl-gae": check_gae, "slime-ppo": check_gae, "verl-kl-in-reward": check_kl_in_reward,
}


def test_every_row_has_a_check():
    found = rows()
    assert len(found) == len(set(found)), "duplicate row ids"
    assert sorted(found) == sorted(CHECKS)


@pytest.mark.parametrize("row", rows())
def test_row(row):
    CHECKS[row](row)
