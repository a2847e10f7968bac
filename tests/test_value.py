"""PPO's critic maths (``losses.value``) against Python loops: GAE by the reverse-time recursion
written per row over the response tokens only, the clipped value loss and its gradient per token."""
import math

import pytest
import torch

from megatron_rlfp16.losses import compute_advantages
from megatron_rlfp16.losses.value import gae, kl_penalized, moments, token_rewards, value_loss, whiten

T = 10
SPANS = [(2, 9), (0, 10), (5, 6), (3, 3), (1, 4)]  # (first, end) response positions; one empty row


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[a <= t < b for t in range(T)] for a, b in SPANS])
    values = torch.randn(len(SPANS), T, generator=g, dtype=torch.float64)
    rewards = torch.randn(len(SPANS), generator=g, dtype=torch.float64)
    junk = torch.full_like(values, 1e6)  # padding holds junk; it must not leak in
    return mask, torch.where(mask, values, junk), rewards


def naive_gae(rewards, values, mask, gamma, lam):
    """Per row: the response positions in order, the reward on the last one, A by the recursion."""
    adv = [[0.0] * T for _ in mask]
    ret = [[0.0] * T for _ in mask]
    for b, row in enumerate(mask.tolist()):
        ts = [t for t in range(T) if row[t]]
        running = 0.0
        for i in reversed(range(len(ts))):
            t = ts[i]
            r = rewards[b].item() if i == len(ts) - 1 else 0.0
            v_next = values[b, ts[i + 1]].item() if i + 1 < len(ts) else 0.0
            delta = r + gamma * v_next - values[b, t].item()
            running = delta + gamma * lam * running
            adv[b][t] = running
            ret[b][t] = running + values[b, t].item()
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (1.0, 0.5)])
def test_gae_matches_reverse_time_loop(gamma, lam):
    mask, values, rewards = make()
    adv, ret = gae(token_rewards(rewards, mask), values, mask, gamma, lam)
    want_adv, want_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, want_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, want_ret, rtol=1e-12, atol=1e-12)


def test_gae_with_unit_discount_is_reward_minus_value():
    """γ = λ = 1 and one outcome reward: A_t = R − V_t on every response token (Monte Carlo)."""
    mask, values, rewards = make(1)
    adv, ret = gae(token_rewards(rewards, mask), values, mask, 1.0, 1.0)
    for b, (a, e) in enumerate(SPANS):
        for t in range(a, e):
            assert adv[b, t].item() == pytest.approx(rewards[b].item() - values[b, t].item(), rel=1e-12)
            assert ret[b, t].item() == pytest.approx(rewards[b].item(), rel=1e-12)
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)


def test_token_rewards_put_the_outcome_on_the_last_token():
    mask, _, rewards = make(2)
    out = token_rewards(rewards, mask)
    for b, (a, e) in enumerate(SPANS):
        for t in range(T):
            assert out[b, t].item() == (rewards[b].item() if a < e and t == e - 1 else 0.0)


def test_kl_in_the_rewards_is_subtracted_per_token():
    mask, values, rewards = make(6)
    g = torch.Generator().manual_seed(7)
    lp, ref = values * 0.1 - 1, values * 0.1 - 1 + 0.05 * torch.randn(values.shape, generator=g, dtype=torch.float64)
    out = kl_penalized(token_rewards(rewards, mask), lp, ref, mask, beta=0.2)
    for b, (a, e) in enumerate(SPANS):
        for t in range(T):
            want = 0.0
            if a <= t < e:
                want = (rewards[b].item() if t == e - 1 else 0.0) - 0.2 * (lp[b, t].item() - ref[b, t].item())
            assert out[b, t].item() == pytest.approx(want, rel=1e-12, abs=1e-15)


def test_whiten_matches_the_masked_statistics():
    mask, values, _ = make(3)
    xs = [values[b, t].item() for b in range(len(SPANS)) for t in range(T) if mask[b, t]]
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    out = whiten(values, mask)
    for b in range(len(SPANS)):
        for t in range(T):
            want = (values[b, t].item() - mean) / (std + 1e-8) if mask[b, t] else 0.0
            assert out[b, t].item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    halves = moments(values[:2], mask[:2]) + moments(values[2:], mask[2:])  # split like DP ranks
    torch.testing.assert_close(whiten(values[:2], mask[:2], sums=halves), out[:2])


@pytest.mark.parametrize("clip", [None, 0.2])
def test_value_loss_matches_formula_and_gradient(clip):
    mask, old, _ = make(4)
    g = torch.Generator().manual_seed(5)
    v = (old + 0.5 * torch.randn(old.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    returns = old + torch.randn(old.shape, generator=g, dtype=torch.float64)
    loss, metrics = value_loss(v, old, returns, mask, clip=clip, num_tokens=40)
    loss.backward()

    ref_v = v.detach().clone().requires_grad_(True)
    total, clipped, n = torch.zeros((), dtype=torch.float64), 0, 0
    for b in range(len(SPANS)):
        for t in range(T):
            if not mask[b, t]:
                continue
            n += 1
            err = (ref_v[b, t] - returns[b, t]) ** 2
            if clip is not None:
                o = old[b, t].item()
                d = ref_v[b, t] - o
                v_clip = o + (d if -clip <= d.item() <= clip else math.copysign(clip, d.item()))
                err_c = (v_clip - returns[b, t]) ** 2
                if err_c.item() > err.item():
                    err, clipped = err_c, clipped + 1
            total = total + 0.5 * err
    (total / 40).backward()
    assert loss.item() == pytest.approx(total.item() / 40, rel=1e-12)
    torch.testing.assert_close(v.grad, ref_v.grad, rtol=1e-12, atol=1e-14)
    assert metrics["value_clip_frac"].item() == pytest.approx(clipped / n)
    if clip is not None:
        assert 0 < clipped < n


def test_gae_is_not_a_group_estimator_and_bad_input_is_named():
    with pytest.raises(ValueError, match="'gae' works per token with a critic"):
        compute_advantages(torch.zeros(4), 2, "gae")
    mask, values, rewards = make()
    with pytest.raises(ValueError, match=r"values has shape \(5, 9\); expected \(5, 10\)"):
        gae(token_rewards(rewards, mask), values[:, :-1], mask)
    with pytest.raises(ValueError, match=r"gamma=1.5"):
        gae(token_rewards(rewards, mask), values, mask, gamma=1.5)
    with pytest.raises(ValueError, match=r"clip=0"):
        value_loss(values, values, values, mask, clip=0)
